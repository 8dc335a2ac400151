"""DeepSpeed checkpoints with our client state, a completion marker, pruning, and encoder export."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..distributed.sync import barrier
from .storage import save_encoder

COMPLETE = "complete.json"   # written by rank 0 after every rank finished saving: the resume point


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoints of one run: a local or shared folder, or any fsspec URL (s3://, gs://).

    DeepSpeed reads and writes files, so a URL is served through a local staging folder: after a save,
    the first rank of each node uploads what its node wrote; before a resume it downloads the tag.
    """

    def __init__(self, directory: str, keep: int, rank: int, config_hash: str, staging: str | None = None,
                 local_rank: int = 0, encoder_arch: dict | None = None):
        self.remote = "://" in directory and not directory.startswith("file://")
        self.url = directory.rstrip("/")
        # One staging folder per node (named by the node's first global rank): a node holds only its own
        # ranks' partitions, even when run_dir is a folder that several nodes share.
        node_staging = Path(staging or ".checkpoint-staging") / f"node{rank - local_rank}"
        self.dir = node_staging if self.remote else Path(directory.removeprefix("file://"))
        self.keep, self.rank, self.local_rank, self.config_hash = keep, rank, local_rank, config_hash
        self.encoder_arch = encoder_arch
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def latest(self) -> dict | None:
        """The last complete checkpoint's marker (tag, step, ...), or None."""
        if self.remote:
            path = f"{self.root}/{COMPLETE}"
            return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None
        marker = self.dir / COMPLETE
        return json.loads(marker.read_text()) if marker.exists() else None

    def save(self, engine, step: int, client_state: dict) -> str:
        """Collective: every rank must call it. A kill at any moment leaves the previous one usable,
        since the marker moves only after all ranks have written."""
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, "config_hash": self.config_hash})
        torch.save(_rng_state(), self.dir / tag / f"rng_rank{self.rank}.pt")
        barrier()
        if self.remote and self.local_rank == 0:
            self.fs.put(str(self.dir / tag), f"{self.root}/{tag}", recursive=True)
        barrier()
        if self.rank == 0:
            marker = json.dumps({"tag": tag, "step": step, "zero_stage": engine.zero_optimization_stage(),
                                 "config_hash": self.config_hash, "encoder_arch": self.encoder_arch})
            if self.remote:  # an object appears whole or not at all
                self.fs.pipe_file(f"{self.root}/{COMPLETE}", marker.encode())
            tmp = self.dir / f".{COMPLETE}.tmp"
            tmp.write_text(marker)
            os.replace(tmp, self.dir / COMPLETE)
            self._prune(keep_tag=tag)
        barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[:-self.keep] if self.keep > 0 else []:
            if old != keep_tag:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        if self.remote:
            remote = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
            remote = [t for t in remote if t.startswith("step")]
            for old in remote[:-self.keep] if self.keep > 0 else []:
                if old != keep_tag:
                    self.fs.rm(f"{self.root}/{old}", recursive=True)

    def load(self, engine) -> dict | None:
        """Resume from the latest complete checkpoint; returns its client state (None: fresh start)."""
        marker = self.latest()
        if marker is None:
            return None
        if marker["config_hash"] != self.config_hash:
            raise ConfigError(f"{self.dir} holds checkpoints of another configuration (hash {marker['config_hash']}, "
                              f"this run {self.config_hash}); use a new run_dir or the same config to resume")
        if self.remote:
            if self.local_rank == 0:
                shutil.rmtree(self.dir / marker["tag"], ignore_errors=True)
                self.fs.get(f"{self.root}/{marker['tag']}", str(self.dir / marker["tag"]), recursive=True)
            barrier()
        path, client = engine.load_checkpoint(str(self.dir), tag=marker["tag"])
        if path is None:
            raise RuntimeError(f"could not load checkpoint {self.dir / marker['tag']}")
        rng = self.dir / marker["tag"] / f"rng_rank{self.rank}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        return client


    def export(self, out_url: str, tag: str | None = None) -> dict:
        """Rank 0 only: write encoder.pt from the complete checkpoint `tag` (default the latest).

        A remote checkpoint is exported from a fresh download of the whole tag, since this node's staging
        folder holds only its own ranks' ZeRO partitions.
        """
        if not self.remote:
            return export_encoder(str(self.dir), out_url, tag)
        marker = self.latest()
        if marker is None:
            raise ConfigError(f"{self.url}: no complete checkpoint to export")
        tag = tag or marker["tag"]
        local = self.dir.parent / "export"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        self.fs.get(f"{self.root}/{tag}", str(local / tag), recursive=True)
        (local / COMPLETE).write_text(json.dumps({**marker, "tag": tag}))
        try:
            return export_encoder(str(local), out_url, tag)
        finally:
            shutil.rmtree(local, ignore_errors=True)


def export_encoder(checkpoint_dir: str, out_url: str, tag: str | None = None) -> dict:
    """Write the backbone of a checkpoint to encoder.pt: float32 tensors (ZeRO-3 consolidated too) and the
    architecture recorded in the checkpoint's marker (see storage.save_encoder)."""
    ckpt = Path(checkpoint_dir)
    marker = json.loads((ckpt / COMPLETE).read_text()) if (ckpt / COMPLETE).exists() else {}
    tag = tag or marker.get("tag")
    if tag is None or not (ckpt / tag).is_dir():
        raise ConfigError(f"{checkpoint_dir}: no checkpoint {tag or '(no complete.json)'} to export")
    if marker.get("zero_stage", 0) == 3 or not (ckpt / tag / "mp_rank_00_model_states.pt").exists():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    else:
        full = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    encoder = {k.removeprefix("backbone."): (v.float() if v.is_floating_point() else v)
               for k, v in full.items() if k.startswith("backbone.")}
    if not encoder:
        raise RuntimeError(f"{checkpoint_dir}/{tag}: no backbone parameters found")
    save_encoder(encoder, out_url, marker.get("encoder_arch"))
    return encoder
