"""The encoder an evaluation starts from: a pretraining encoder.pt, a torchvision-format state_dict, or random.

An encoder.pt records its architecture and preprocessing (train/storage.py): they fill the model and
preprocess keys left null, and a key set to something else is one line naming both. Nothing is ever
downloaded: a torchvision state_dict is a file the user already has (its `fc.*` classifier is dropped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ..augment.policy import IMAGENET_MEAN, IMAGENET_STD
from ..config import ConfigError
from ..models import build_backbone
from ..train.storage import read_encoder_file
from .config import EvalConfig
from .images import Preprocess


@dataclass
class Encoder:
    backbone: torch.nn.Module
    arch: dict                 # depth, width, small_input, feature_dim (+ what the encoder.pt recorded)
    preprocess: Preprocess
    hash: str                  # sha256 of the weights file, or of the random init's recipe
    source: str                # "encoder.pt", "state_dict" or "random"


def _resolve_arch(cfg: EvalConfig, recorded: dict | None) -> dict:
    wanted = {"depth": cfg.model.depth, "width": cfg.model.width, "small_input": cfg.model.small_input}
    if recorded is not None:
        theirs = {k: recorded.get(k) for k in wanted}
        clash = {k: (v, theirs[k]) for k, v in wanted.items() if v is not None and v != theirs[k]}
        if clash:
            ours = ", ".join(f"model.{k}={a}" for k, (a, _) in clash.items())
            rec = ", ".join(f"{k}={b}" for k, (_, b) in clash.items())
            raise ConfigError(f"encoder={cfg.encoder} is a ResNet with {rec}, but the config asks for {ours}: "
                              f"set those keys to null (taken from the encoder) or pick another encoder")
        return theirs
    return {"depth": wanted["depth"] or 50, "width": wanted["width"] or 1,
            "small_input": bool(wanted["small_input"])}


def _preprocess(cfg: EvalConfig, recorded: dict | None) -> Preprocess:
    rec = recorded or {}
    p = cfg.preprocess
    size = p.size or rec.get("input_size") or 224
    mean = tuple(p.mean or rec.get("mean") or IMAGENET_MEAN)
    std = tuple(p.std or rec.get("std") or IMAGENET_STD)
    return Preprocess(int(size), float(p.crop_fraction), mean, std)


def load_encoder_for_eval(cfg: EvalConfig) -> Encoder:
    """Build and initialize the backbone `cfg` asks for; every mismatch is a ConfigError line."""
    state, recorded, digest, source = None, None, None, "random"
    if cfg.encoder:
        state, recorded, digest = read_encoder_file(cfg.encoder, "encoder")
        source = "encoder.pt" if recorded is not None else "state_dict"
    arch = _resolve_arch(cfg, recorded)
    if arch["depth"] not in (18, 34, 50, 101, 152) or not isinstance(arch["width"], int) or arch["width"] < 1:
        raise ConfigError(f"encoder architecture {arch} is not a ResNet this project builds")
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(arch["depth"], arch["width"], small_input=arch["small_input"])
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # torchvision's classifier
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()
            detail = " ".join(x.strip() for x in first[1:3])[:200]
            raise ConfigError(f"encoder={cfg.encoder} does not fit a ResNet-{arch['depth']} width {arch['width']} "
                              f"(small_input {arch['small_input']}): {detail}; set model.depth/width/small_input "
                              f"to the encoder's") from None
    else:
        digest = hashlib.sha256(json.dumps({"random": arch, "seed": cfg.seed}, sort_keys=True).encode()).hexdigest()
    arch = {**(recorded or {}), **arch, "feature_dim": backbone.feature_dim}
    return Encoder(backbone, arch, _preprocess(cfg, recorded), digest, source)
