"""Offline tools that pack patient-grouped medical images into WebDataset tar shards (imports no torch)."""

__version__ = "0.1.0"
