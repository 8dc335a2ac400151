"""Pretraining: configuration checks, DeepSpeed set-up, the training loop, checkpoints and export."""
