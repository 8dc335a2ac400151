"""Fine-tuning with Accelerate: augmented epochs, warmup + cosine, early stopping on validation, exact resume.

Each epoch is a seeded permutation of the training images cut into global batches of
`finetune.batch_size` (the remainder is left out of that epoch, a different one each epoch, as with
DistributedSampler(drop_last)); process r takes the r-th slice of each batch. Augmentations are drawn
from (seed, epoch, image), learning rates are a function of the step, and the checkpoint holds model,
optimizer and the (epoch, step) cursor: a resumed run repeats the uninterrupted one exactly.
A signal (Slurm preemption, Ctrl-C) is agreed by all processes at a step boundary, saved, and the job
exits with status 99 to be rerun.
"""

from __future__ import annotations

import copy
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from ..augment.policy import PolicyError, checked_view
from ..config import ConfigError
from ..evaluate.metrics import metric_arrays
from ..optim import make_optimizer
from ..optim.schedule import lr_at
from ..train.preempt import Preemption
from ..train.storage import atomic_torch_save
from .classifier import Classifier, probabilities
from .config import EvalConfig
from .features import run_over_split
from .images import FINETUNE_VIEW, LabelledImages, Preprocess, batches
from .splits import ImageSet

CHECKPOINT_FORMAT = "medssl-finetune-checkpoint/1"
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


class Stopped(SystemExit):
    """A signal arrived; the checkpoint is saved (exit status 99: rerun the same command to resume)."""

    def __init__(self):
        super().__init__(99)


@dataclass
class FitState:
    epoch: int = 0
    step: int = 0                      # step within the epoch
    best_value: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    done: bool = False
    loss_sum: float = 0.0              # this epoch's losses so far (a resumed epoch reports the whole mean)
    loss_steps: int = 0
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def finetune_view(cfg: EvalConfig):
    aug = dict(cfg.finetune.augment)
    if aug.pop("preset", "finetune") != "finetune":
        raise ConfigError("finetune.augment.preset: only 'finetune' (crop + flip) exists; override its keys "
                          "(crop_scale, flip_p, rotate_deg, brightness, ...) under finetune.augment")
    try:
        return checked_view(aug, FINETUNE_VIEW, "finetune.augment")
    except PolicyError as e:
        raise ConfigError(str(e)) from None


def freeze_before(model: Classifier, train_from: str) -> None:
    """Train `train_from` and everything after it; earlier parts keep their weights and BN statistics."""
    b = model.backbone
    parts = [[b.conv1, b.bn1], [b.layer1], [b.layer2], [b.layer3], [b.layer4]]
    for part in parts[:STAGES.index(train_from)]:
        for m in part:
            m.requires_grad_(False)
    model.frozen_parts = [m for part in parts[:STAGES.index(train_from)] for m in part]


def _train_mode(model: Classifier) -> None:
    model.train()
    for m in getattr(model, "frozen_parts", []):
        m.eval()  # frozen layers keep their BN running statistics


def build_optimizer(cfg: EvalConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    f = cfg.finetune
    # Frozen parameters are left out; BN and biases without weight decay, as in pretraining.
    return make_optimizer(f.optimizer, model, lr=f.lr, weight_decay=f.weight_decay, momentum=f.momentum,
                          trainable_only=True)


def loss_fn(task: str, logits: torch.Tensor, target: torch.Tensor, smoothing: float,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the valid images (an undecodable image, skipped, is invalid) and known labels."""
    ok = torch.ones(len(target), dtype=torch.bool, device=target.device) if valid is None else valid
    if task == "multiclass":
        per = nnf.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction="none")
        return (per * ok).sum() / ok.sum().clamp(min=1)
    known = ~torch.isnan(target) & ok[:, None]  # missing / ignored-uncertain labels are masked out of the loss
    per = nnf.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(target), reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)


class FineTuner:
    def __init__(self, cfg: EvalConfig, accelerator, model: Classifier, train: ImageSet, val: ImageSet,
                 task: str, names: list[str], pre: Preprocess, run_dir: Path, config_hash: str, log=print):
        self.cfg, self.acc, self.task, self.names, self.pre, self.log = cfg, accelerator, task, names, pre, log
        self.train, self.val = train, val
        self.ckpt_path, self.best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
        self.config_hash = config_hash
        world = accelerator.num_processes
        n = train.index.size
        batch = min(cfg.finetune.batch_size, n - n % world)
        if batch < world or batch % world:
            raise ConfigError(f"finetune.batch_size={cfg.finetune.batch_size} must be a multiple of the "
                              f"{world} processes (and {n} training images must fill one batch)")
        self.batch, self.micro = batch, batch // world
        self.steps_per_epoch = n // batch
        self.total_steps = self.steps_per_epoch * cfg.finetune.epochs
        self.warmup = min(int(round(cfg.finetune.warmup_epochs * self.steps_per_epoch)), self.total_steps)
        self.view = finetune_view(cfg)
        freeze_before(model, cfg.finetune.train_from)
        model.to(accelerator.device)
        optimizer = build_optimizer(cfg, model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.state = FitState()
        self.best_state: dict | None = None

    # -- checkpoints ---------------------------------------------------------------------------------
    def _module(self) -> Classifier:
        return self.acc.unwrap_model(self.model)

    def save_checkpoint(self) -> None:
        if self.acc.is_main_process:
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "config_hash": self.config_hash, "state": self.state.as_dict(),
                   "model": self._module().state_dict(), "optimizer": self.optimizer.state_dict()}, self.ckpt_path)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        blob = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if blob.get("config_hash") != self.config_hash:
            raise ConfigError(f"{self.ckpt_path} belongs to a run with another configuration: use a new run_dir "
                              f"or delete that folder's checkpoints")
        self._module().load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state = FitState(**blob["state"])
        if self.best_path.exists():
            self.best_state = torch.load(self.best_path, map_location="cpu", weights_only=True)["model"]
        self.log(f"resumed from {self.ckpt_path} at epoch {self.state.epoch} step {self.state.step}")
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This process's training positions (into records) for the epoch, step-major."""
        perm = np.random.default_rng([self.cfg.seed, 7, epoch]).permutation(self.train.index.size)
        perm = perm[: self.steps_per_epoch * self.batch].reshape(self.steps_per_epoch, self.acc.num_processes,
                                                                 self.micro)
        return perm[:, self.acc.process_index, :].reshape(-1)

    def _targets(self, rows: np.ndarray) -> torch.Tensor:
        y = torch.as_tensor(self.train.labels[rows])
        return y.to(self.acc.device)

    def evaluate(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of the set's images, and which of them decoded (the others have no prediction)."""
        self.model.eval()
        module = self._module()
        out = run_over_split(self.acc, lambda x: probabilities(self.task, module(x)), images.shardset,
                             images.records, self.pre, self.cfg.data.batch_size, self.cfg.data.workers,
                             self.cfg.data.on_corrupt)
        return out.values[images.index], out.present[images.index]

    def _validate(self) -> float:
        scores, ok = self.evaluate(self.val)
        metric = self.cfg.report.select_metric or ("accuracy" if self.task == "multiclass" else "auc_mean")
        values = metric_arrays(self.task, self.val.labels[ok], scores[ok], names=self.names)
        if metric not in values:
            raise ConfigError(f"report.select_metric={metric!r} is not a {self.task} metric ({', '.join(values)})")
        return float(values[metric][0])

    def train_epoch(self, preemption: Preemption | None = None) -> None:
        """The current epoch's remaining steps (from the cursor). A signal agreed by all processes at a
        step boundary saves the checkpoint and raises Stopped."""
        s, f = self.state, self.cfg.finetune
        rows = self._epoch_order(s.epoch)
        positions = self.train.index[rows]
        dataset = LabelledImages(self.train.shardset, self.train.records, positions, self.pre, view=self.view,
                                 seed=self.cfg.seed, epoch=s.epoch, on_corrupt=self.cfg.data.on_corrupt)
        subset = torch.utils.data.Subset(dataset, range(s.step * self.micro, len(dataset)))
        _train_mode(self._module())
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc.device)  # summed on the device: no host sync per step
        for x, _, valid in batches(subset, self.micro, self.cfg.data.workers):
            lr = lr_at(s.epoch * self.steps_per_epoch + s.step, f.lr, self.warmup, self.total_steps, f.final_lr)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            y = self._targets(rows[s.step * self.micro:(s.step + 1) * self.micro])
            with self.acc.autocast():
                logits = self.model(x.to(self.acc.device, non_blocking=True))
            loss = loss_fn(self.task, logits, y, f.label_smoothing, valid.to(self.acc.device))
            self.acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double()
            s.step += 1
            s.loss_steps += 1
            stop = preemption.agreed(self.acc.device) if preemption is not None else None
            if stop:
                s.loss_sum += float(loss_sum)
                self.save_checkpoint()
                self.log(f"{stop} received: checkpoint {self.ckpt_path} saved at epoch {s.epoch} step "
                         f"{s.step}; rerun the same command to resume")
                raise Stopped()
        s.loss_sum += float(loss_sum)

    def fit(self) -> dict:
        s, f = self.state, self.cfg.finetune
        preemption = Preemption()
        lr_peak = f.lr
        while not s.done and s.epoch < f.epochs:
            self.train_epoch(preemption)
            value = self._validate()
            improved = value > s.best_value
            if improved:
                s.best_value, s.best_epoch, s.bad_epochs = value, s.epoch, 0
                self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self._module().state_dict().items()})
                if self.acc.is_main_process:
                    atomic_torch_save({"model": self.best_state, "epoch": s.epoch}, self.best_path)
            else:
                s.bad_epochs += 1
            s.history.append({"epoch": s.epoch, "loss": s.loss_sum / s.loss_steps if s.loss_steps else None,
                              "lr": lr_at(min((s.epoch + 1) * self.steps_per_epoch - 1, self.total_steps - 1),
                                          lr_peak, self.warmup, self.total_steps, f.final_lr),
                              "val": value, "best": improved})
            self.log(f"epoch {s.epoch}: loss {s.history[-1]['loss']:.4f}  val {value:.4f}"
                     f"{'  (best)' if improved else ''}")
            s.epoch, s.step, s.loss_sum, s.loss_steps = s.epoch + 1, 0, 0.0, 0
            if f.patience and s.bad_epochs >= f.patience:
                s.done = True
                self.log(f"early stop: no better validation metric for {f.patience} epochs")
            self.save_checkpoint()
        for sig in Preemption.SIGNALS:  # training is over and saved: a signal now stops the job as usual
            signal.signal(sig, signal.SIG_DFL)
        if self.best_state is not None:
            self._module().load_state_dict(self.best_state)
        return {"epochs_run": s.epoch, "best_epoch": s.best_epoch, "best_val": s.best_value,
                "steps_per_epoch": self.steps_per_epoch, "global_batch": self.batch, "history": s.history}
