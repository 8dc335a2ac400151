"""Streaming input: shard sets named by a manifest, split across ranks and workers, MICLe pairs."""
