"""The end of `make demo`: one table of what each stage wrote and measured, from the run folder alone.

    python launch/demo_report.py runs/demo
"""

import json
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _seconds(root: Path) -> dict:
    path = root / "stage_seconds.txt"
    lines = path.read_text().split("\n") if path.exists() else []
    return {name: int(s) for name, s in (line.split() for line in lines if line.strip())}


def _pretraining(run: Path) -> str:
    records = _records(run)
    losses = [r["loss"] for r in records if "loss" in r]
    tenth = max(1, len(losses) // 10)  # means over a tenth of the logged steps: one step's batch fill is noise
    monitored = [r for r in records if r.get("knn_top1") is not None]
    text = (f"{len(losses)} logged steps; loss (mean of the first / last tenth) "
            f"{statistics.mean(losses[:tenth]):.3f} -> {statistics.mean(losses[-tenth:]):.3f}")
    if monitored:
        first, last = monitored[0], monitored[-1]
        text += (f"\nkNN top-1 step {first['step']} {first['knn_top1']:.3f} -> step {last['step']} "
                 f"{last['knn_top1']:.3f}; AUC {first.get('knn_auc') or float('nan'):.3f} -> "
                 f"{last.get('knn_auc') or float('nan'):.3f}; monitor {100 * last['monitor_share']:.1f}% of the run")
    if losses and "embed_std" in records[-1]:
        text += f"\nembed_std {records[-1]['embed_std']:.4f}"
    return text


def main(root: str) -> int:
    root = Path(root)
    seconds = _seconds(root)
    table = Table(title=f"make demo: {root}/", show_lines=True)
    for column in ("stage", "wrote", "measured", "s"):
        table.add_column(column, justify="right" if column == "s" else "left")
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    splits = ", ".join(f"{name} {s['patients']} patients / {s['images']} images"
                       for name, s in manifest["splits"].items() if s["images"])
    table.add_row("shards", f"{root}/shards", splits, str(seconds.get("shards", "")))
    for i, name in ((1, "simclr"), (2, "micle")):
        run = root / name
        table.add_row(f"{i} {name}", f"{run}/encoder.pt\n{run}/metrics.jsonl\n{run}/metrics.png",
                      _pretraining(run), str(seconds.get(name, "")))
    study = root / "study"
    headline = json.loads((study / "headline.json").read_text())
    said = "\n".join(h["sentence"].replace("**", "") for h in headline.get("headline", []) if h.get("sentence"))
    table.add_row("3 study", f"{study}/label_efficiency.csv\n{study}/label_efficiency.png\n{study}/summary.md",
                  said or json.dumps(headline)[:300], str(seconds.get("study", "")))
    console = Console()
    console.print(table)
    console.print(f"plots: {root}/pretraining.png (both stages), {study}/label_efficiency.png (the study)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
