"""Augmentation: one declared policy, two backends (DALI on GPU or CPU, torchvision v2 on CPU)."""
