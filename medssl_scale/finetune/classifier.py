"""The evaluated model as one file, model.pt: encoder weights, head, classes and preprocessing.

Every protocol writes one, so `launch/finetune.py evaluate` can apply any of them to other shards:
  linear    the probe folded into a linear layer (standardization included)
  finetune  the fine-tuned network and its linear layer
  knn       the training features and labels with the chosen k and temperature
"""

from __future__ import annotations

import io

import fsspec
import torch
from torch import nn

from ..config import ConfigError
from ..evaluate.knn import knn_scores
from ..models import build_backbone
from .images import Preprocess

MODEL_FORMAT = "medssl-classifier/1"


class Classifier(nn.Module):
    """backbone -> linear layer; outputs logits (multiclass) or per-label logits (multilabel)."""

    def __init__(self, backbone: nn.Module, num_outputs: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    if task == "multiclass":
        if logits.shape[1] == 1:  # a binary probe's single logit (scikit-learn's parametrization)
            p = torch.sigmoid(logits)
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(logits.float(), dim=1)
    return torch.sigmoid(logits.float())


def save_model(path: str, *, protocol: str, task: str, names: list[str], arch: dict, pre: Preprocess,
               encoder_hash: str, backbone: dict, head: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": MODEL_FORMAT, "protocol": protocol, "task": task, "names": list(names), "arch": arch,
                "preprocess": pre.as_dict(), "encoder_hash": encoder_hash,
                "backbone": {k: v.detach().cpu() for k, v in backbone.items()}, "head": head}, buf)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())


def load_model(path: str) -> dict:
    try:
        with fsspec.open(path, "rb") as f:
            obj = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"classifier={path} not found: name the model.pt of an earlier run") from None
    except Exception as e:  # noqa: BLE001 - not a torch file at all
        raise ConfigError(f"classifier={path} is not a model.pt ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ConfigError(f"classifier={path} is not a model.pt written by launch/finetune.py")
    return obj


class SavedModel(nn.Module):
    """A model.pt as a module: images -> probabilities."""

    def __init__(self, obj: dict):
        super().__init__()
        a = obj["arch"]
        self.task, self.names, self.protocol = obj["task"], obj["names"], obj["protocol"]
        self.backbone = build_backbone(a["depth"], a["width"], small_input=a["small_input"])
        self.backbone.load_state_dict(obj["backbone"])
        self.head = obj["head"]
        if self.protocol != "knn":
            w = self.head["weight"]
            self.linear = nn.Linear(w.shape[1], w.shape[0])
            self.linear.load_state_dict({"weight": w, "bias": self.head["bias"]})
        p = obj["preprocess"]
        self.preprocess = Preprocess(p["size"], p["crop_fraction"], tuple(p["mean"]), tuple(p["std"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x).float()
        if self.protocol == "knn":
            h = self.head
            return knn_scores(h["features"].to(f.device), h["labels"].to(f.device), f, task=self.task,
                              k=int(h["k"]), temperature=float(h["temperature"]), num_classes=len(self.names))
        return probabilities(self.task, self.linear(f))
