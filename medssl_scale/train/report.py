"""The end-of-run summary for people: what ran and what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(cfg, summary: dict) -> None:
    lines = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    records = [r for r in lines if "loss" in r]
    monitored = [r for r in lines if "monitor_s" in r]
    table = Table(title=f"pretraining run {cfg.run_dir}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("model", f"ResNet-{cfg.model.depth} x{cfg.model.width}"), ("pairs", cfg.data.mode),
            ("global batch", str(cfg.train.global_batch)), ("optimizer", cfg.optim.name),
            ("ZeRO stage / precision", f"{cfg.train.zero_stage} / {cfg.train.precision}"),
            ("steps", str(summary["steps"]))]
    if records:
        rows += [("first / last loss", f"{records[0]['loss']:.4f} / {records[-1]['loss']:.4f}"),
                 ("last contrastive top-1", f"{records[-1]['accuracy']:.3f}"),
                 ("median pairs/s", f"{sorted(r['pairs_per_s'] for r in records)[len(records) // 2]:,.1f}")]
        if "embed_std" in records[-1]:
            rows.append(("last embed_std (spread: 1/sqrt(D))",
                         f"{records[-1]['embed_std']:.4f} ({cfg.model.out_dim ** -0.5:.4f})"))
    for key in ("knn_top1", "knn_bal_acc", "knn_auc", "linear_top1", "linear_auc"):
        seen = [r for r in monitored if r.get(key) is not None]
        if seen:
            rows.append((f"{key}: step {seen[0]['step']} / step {seen[-1]['step']}",
                         f"{seen[0][key]:.3f} / {seen[-1][key]:.3f}"))
    if monitored:
        rows.append(("monitor time (share of the run)",
                     f"{sum(r['monitor_s'] for r in monitored):.1f} s ({100 * monitored[-1]['monitor_share']:.1f}%)"))
    rows += [("corrupt images skipped", str(summary["corrupt_skipped"])), ("encoder", summary["encoder"])]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
