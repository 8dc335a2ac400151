"""Encoder files on any fsspec path: a plain float32 backbone state_dict, loadable with weights_only."""

from __future__ import annotations

import io

import fsspec
import torch


def save_encoder(state_dict: dict, url: str) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, buf)
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def load_encoder(url: str) -> dict:
    try:
        with fsspec.open(url, "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        from ..config import ConfigError

        raise ConfigError(f"model.init_encoder: {url} not found") from None
