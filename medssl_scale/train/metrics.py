"""What people see of a run: metrics.jsonl, a rich progress display and log lines (rank 0 only)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("medssl.train")


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops lines past the checkpoint's step so a
    rerun never leaves two different records of the same step."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, resume_step: int, tensorboard: bool = False):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        self._progress = self._tb = None
        self._last_monitor = ""
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        console = Console(stderr=True)
        self._progress = Progress(TextColumn("[bold]pretraining"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=console, disable=not console.is_terminal)
        self._task = self._progress.add_task("steps", total=total_steps, completed=resume_step, info="")
        self._progress.start()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def step(self, record: dict, write: bool) -> None:
        """Show `record` (a step's, or the step-0 monitor's) and, with `write`, append it (and to TensorBoard)."""
        if not self.enabled:
            return
        if "knn_top1" in record or "knn_auc" in record:
            self._last_monitor = _monitor_info(record)
        info = self._last_monitor
        if "loss" in record:
            info = (f"loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  lr {record['lr']:.3g}  "
                    f"{record['pairs_per_s']:,.0f} pairs/s" + (f"  std {record['embed_std']:.3f}" if "embed_std" in record
                                                              else "") + (f"  {info}" if info else ""))
        self._progress.update(self._task, completed=record["step"], info=info)
        if write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("step %d  %s", record["step"], info)
            if self._tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()


def _monitor_info(record: dict) -> str:
    shown = [(k, record.get(k)) for k in ("knn_top1", "knn_auc", "linear_top1", "linear_auc")]
    return "  ".join(f"{k} {v:.3f}" for k, v in shown if v is not None)


class StepTimer:
    def __init__(self):
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt
