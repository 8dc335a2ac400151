"""The pretraining loop, top to bottom: check, start processes, build, resume, train, checkpoint, export.

    single process:   python launch/pretrain.py --config configs/debug_cpu.yaml
    one node:         deepspeed launch/pretrain.py --config configs/imagenet_simclr.yaml
    several nodes:    deepspeed --hostfile hosts launch/pretrain.py --config ...   (or torchrun, or srun)
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..augment.policy import PolicyError, policy_from_config
from ..config import ConfigError, RunConfig, dump_config
from ..data.loader import make_pair_loader
from ..distributed.env import resolve
from ..distributed.launch import init_process_group
from ..distributed.sync import barrier
from ..optim import lr_at
from .builders import build_model, build_optimizer, peak_lr
from .checkpoint import Checkpoints
from .collapse import SpreadWatch
from .metrics import MetricsLog, StepTimer
from .monitor import check_monitor_config, open_monitor
from .plan import batch_plan, check_combination, deepspeed_config
from .preempt import Preemption
from .rundir import check_run_dir
from .step import ContrastiveStep, autocast_for
from .storage import encoder_arch

log = logging.getLogger("medssl.train")
PREEMPTED_EXIT = 99  # "checkpoint saved after a signal: requeue me" (see launch/slurm/pretrain.sbatch)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is left as it was."""


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT)


class Trainer:
    def __init__(self, cfg: RunConfig):
        # 1. Everything that can be checked without processes or data, first.
        check_combination(cfg)
        check_monitor_config(cfg)
        self.plan = batch_plan(cfg, resolve().world_size)
        try:
            self.policy = policy_from_config(cfg.augment)
        except PolicyError as e:
            raise ConfigError(str(e)) from None
        self.cfg = cfg
        check_run_dir(cfg.run_dir)  # every rank writes there (checkpoint staging): fail before processes start
        # 2. Processes (on CPU each also sets its intra-op thread count: see distributed/launch.py).
        cuda = torch.cuda.is_available()
        self.dist = init_process_group(cuda)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        # 3. Data (shards are checked here, before any step), model, optimizer, engine.
        self.loader = make_pair_loader(cfg.data.shards, cfg.data.split, self.plan.micro_batch, self.policy,
                                       mode=cfg.data.mode, backend=cfg.data.backend, dist=self.dist,
                                       seed=cfg.seed, workers=cfg.data.workers, on_corrupt=cfg.data.on_corrupt)
        # The monitor's shards are opened (and their labels checked) before any model is built.
        self.monitor = open_monitor(cfg, self.policy, self.device, lambda: autocast_for(cfg, self.device))
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(cfg, self.device.type).to(self.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model),
                                                    config=deepspeed_config(cfg, self.plan))
        self.contrastive_step = ContrastiveStep(self.engine, cfg, self.device)
        self.checkpoints = Checkpoints(cfg.train.checkpoint_dir or str(self.run_dir / "checkpoints"),
                                       cfg.train.keep_checkpoints, self.dist.rank,
                                       cfg.content_hash(self.loader.source.shardset.fingerprint),
                                       staging=str(self.run_dir / ".checkpoint-staging"),
                                       local_rank=self.dist.local_rank, encoder_arch=encoder_arch(cfg))
        # 4. Resume where the last complete checkpoint stopped.
        client = self.checkpoints.load(self.engine)
        self.step = client["step"] if client else 0
        self.loader.load_state_dict(client["data"] if client else {"epoch": 0, "step": 0})
        per_epoch = self.loader.source.steps_per_epoch()
        self.total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * per_epoch / self.plan.grad_accum)
        self.peak_lr = peak_lr(cfg)
        if cfg.optim.warmup_steps > self.total_steps:
            raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds the run's "
                              f"{self.total_steps} steps")
        planned = client.get("total_steps", self.total_steps) if client else self.total_steps
        if planned != self.total_steps and not cfg.train.extend:
            raise ConfigError(f"{self.checkpoints.url} holds a run planned for {planned} steps (now at step "
                              f"{self.step}); this config asks for {self.total_steps}: add train.extend=true to "
                              f"continue to {self.total_steps} (the learning-rate schedule is recomputed for it)")
        if self.step > self.total_steps:
            raise ConfigError(f"train.steps={self.total_steps} is below the {self.step} steps already done in "
                              f"{self.checkpoints.url}")
        if self.monitor is not None and self.dist.is_main:
            log.info("%s", self.monitor.describe())
        if client and self.dist.is_main:
            log.info("resumed from step %d (data epoch %d, batch %d)", self.step, client["data"]["epoch"],
                     client["data"]["step"])

    def _set_lr(self) -> float:
        o = self.cfg.optim
        lr = lr_at(self.step, self.peak_lr, o.warmup_steps, self.total_steps, o.final_lr)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _micro_batches(self):
        """Micro-batches forever, epoch after epoch, from the loader's current position."""
        while True:
            yield from self.loader
            state = self.loader.state_dict()
            self.loader.set_epoch(state["epoch"] + 1, 0)

    def _save(self) -> str:
        return self.checkpoints.save(self.engine, self.step, {"step": self.step, "data": self.loader.state_dict(),
                                                              "total_steps": self.total_steps})

    def _measure(self, started: float) -> dict:
        return self.monitor.measure(self.engine.module, time.perf_counter() - started)

    def train(self) -> dict:
        t, main = self.cfg.train, self.dist.is_main
        metrics = MetricsLog(self.run_dir, main, self.total_steps, self.step, t.tensorboard)
        preemption = Preemption()
        spread = SpreadWatch(t.collapse_warning, self.cfg.model.out_dim)
        started = time.perf_counter()
        if self.monitor is not None and self.step == 0:  # the random-init value the run has to beat
            metrics.step({"step": 0, **self._measure(started)}, write=True)
        batches, timer, last_saved = self._micro_batches(), StepTimer(), None
        try:
            while self.step < self.total_steps:
                lr = self._set_lr()
                write = (self.step + 1) % t.log_every == 0 or self.step + 1 == self.total_steps
                loss, acc = self.contrastive_step([next(batches) for _ in range(self.plan.grad_accum)], stats=write)
                if not math.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({loss}) at step {self.step + 1}: stopping; the last "
                                        f"good checkpoint ({last_saved or 'none yet'}) is left untouched")
                self.step += 1
                record = {"step": self.step, "loss": loss, "accuracy": acc, "lr": lr,
                          "pairs_per_s": self.plan.global_batch / timer.lap(), **(self.contrastive_step.collapse or {})}
                if write and main:
                    warning = spread.check(self.step, record["embed_std"])
                    if warning:
                        log.warning("%s", warning)
                # Measured after the step, before its checkpoint: a resumed run never redoes or skips a measurement.
                if self.monitor is not None and self.monitor.due(self.step, self.total_steps):
                    record.update(self._measure(started))
                    timer.lap()  # the monitor's time is not the next step's
                    write = True
                metrics.step(record, write=write)
                stop = preemption.agreed(self.device)
                if stop or self.step % t.checkpoint_every == 0 or self.step == self.total_steps:
                    last_saved = self._save()
                if stop:
                    preemption.saved(last_saved, self.step, main)  # the Slurm template's requeue marker
                    if main:
                        log.warning("%s received (by %d of %d ranks): checkpoint %s saved, exiting with status %d "
                                    "(rerun the same command to resume)", stop, preemption.ranks_received,
                                    self.dist.world_size, last_saved, PREEMPTED_EXIT)
                    raise Preempted()
        finally:
            metrics.close()
            batches.close()  # stops the loader's workers now: they ignore SIGTERM, so none may outlive us
        encoder = self.run_dir / "encoder.pt"
        if main:
            self.checkpoints.export(str(encoder))
        barrier()
        return {"steps": self.step, "encoder": str(encoder), "checkpoint": last_saved,
                "corrupt_skipped": getattr(self.loader, "corrupt_skipped", 0)}
