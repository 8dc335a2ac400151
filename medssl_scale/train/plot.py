"""`medssl-plot`: draw pretraining runs' metrics.jsonl as one PNG of panels, several runs side by side."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

# (panel name, title, metric keys). A panel is drawn when any of its keys has a finite value somewhere.
PANELS = (
    ("loss", "NT-Xent loss", ("loss",)),
    ("accuracy", "contrastive top-1", ("accuracy",)),
    ("lr", "learning rate", ("lr",)),
    ("pairs_per_s", "pairs/s", ("pairs_per_s",)),
    ("monitor", "kNN / linear probe", ("knn_top1", "knn_bal_acc", "knn_auc",
                                       "linear_top1", "linear_bal_acc", "linear_auc")),
    ("embed_std", "embed_std", ("embed_std",)),
    ("align_uniform", "align / uniform", ("align", "uniform")),
    ("cos", "pos_cos / neg_cos", ("pos_cos", "neg_cos")),
)
# Colour is the run, so the metrics sharing a panel differ by line style (and, for the sparse monitor
# points, by marker: o = kNN, s = linear).
STYLES = {"knn_top1": ("-", "o"), "knn_bal_acc": ("--", "o"), "knn_auc": (":", "o"),
          "linear_top1": ("-", "s"), "linear_bal_acc": ("--", "s"), "linear_auc": (":", "s"),
          "uniform": ("--", None), "neg_cos": ("--", None)}


class PlotError(ValueError):
    """Bad input, said in one line that names what to fix."""


def load_metrics(run_dir: str) -> list[dict]:
    folder = Path(run_dir)
    if not folder.exists():
        raise PlotError(f"run folder {run_dir} does not exist: pass a pretraining run folder")
    if not folder.is_dir():
        raise PlotError(f"{run_dir} is a file, not a run folder: pass the folder that holds metrics.jsonl")
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl: pass a pretraining run folder (one the trainer wrote)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # Python's json reads the NaN that json.dumps writes
        except json.JSONDecodeError as e:
            raise PlotError(f"{path} line {n}: not valid JSON ({e.msg}): fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path} line {n}: not a JSON object with an integer \"step\": fix or delete that line")
        records.append(record)
    if not records:
        raise PlotError(f"{path} is empty: the run has not logged a step yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order, skipping records without it and null / NaN / inf values."""
    points = sorted((r["step"], float(r[key])) for r in records
                    if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
                    and math.isfinite(r[key]))
    return [s for s, _ in points], [v for _, v in points]


SMOOTHED = ("loss", "accuracy", "pos_cos", "neg_cos", "align", "uniform", "pairs_per_s")


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value's centred window (shorter at the ends), as many values as given."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def panels_with_data(records: list[dict]) -> list[str]:
    """Names of the PANELS that have at least one point in `records` (all runs' records together)."""
    return [name for name, _, keys in PANELS if any(series(records, k)[0] for k in keys)]


def out_dim(run_dir: str) -> int | None:
    """model.out_dim from the run's config.yaml; None when unreadable (the reference line is a nicety,
    never a reason not to plot)."""
    try:
        d = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["model"]["out_dim"]
        return d if isinstance(d, int) and d > 0 else None
    except Exception:
        return None


def run_labels(run_dirs: list[str]) -> list[str]:
    """Folder names, with the parent folder prefixed where two runs share a name (a/seed0, b/seed0)."""
    paths = [Path(d).resolve() for d in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def build_figure(runs: list[list[dict]], labels: list[str], dims: list[int | None]):
    # Figure without pyplot: no global state and no GUI backend, so it renders with Agg anywhere.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    shown = panels_with_data([r for records in runs for r in records])
    ncols = min(3, len(shown))
    nrows = -(-len(shown) // ncols)
    fig = Figure(figsize=(5 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        fig.delaxes(ax)
    panels = {name: (title, keys) for name, title, keys in PANELS}
    for ax, name in zip(axes, shown):
        title, keys = panels[name]
        present = [k for k in keys if any(series(records, k)[0] for records in runs)]
        for i, records in enumerate(runs):
            for k in present:
                ls, marker = STYLES.get(k, ("-", None))
                steps, values = series(records, k)
                if k in SMOOTHED and len(values) >= 10:
                    # Per-step losses swing with each batch's fill (an epoch's padded last batch has fewer
                    # keys, so a lower loss): the raw points faint, a centred running mean over them bold.
                    ax.plot(steps, values, color=f"C{i % 10}", lw=0.8, alpha=0.3)
                    steps, values = steps, running_mean(values, max(3, len(values) // 10))
                ax.plot(steps, values, color=f"C{i % 10}", ls=ls, marker=marker, ms=3, lw=1.3)
        handles = [Line2D([], [], color="0.3", ls=STYLES.get(k, ("-", None))[0], ms=3,
                          marker=STYLES.get(k, ("-", None))[1], label=k) for k in present]
        if name == "embed_std":
            for d in sorted({d for d in dims if d}):
                ax.axhline(1 / math.sqrt(d), color="0.5", ls="--", lw=1)
                handles.append(Line2D([], [], color="0.5", ls="--", label=f"1/sqrt(D), D={d}: fully spread"))
        if len(handles) > 1:  # a lone metric is named by the panel title already
            ax.legend(handles=handles, fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        fig.legend(handles=[Line2D([], [], color=f"C{i % 10}", lw=2, label=lab) for i, lab in enumerate(labels)],
                   loc="outside upper center", ncol=min(len(labels), 4))
    else:
        fig.suptitle(labels[0])
    return fig


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> str:
    """Draw the runs' metrics.jsonl into the PNG `out` and return its path; PlotError on bad input."""
    if not run_dirs:
        raise PlotError("no run folder given: pass at least one pretraining run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"--labels has {len(labels)} names for {len(run_dirs)} runs: give one name per run")
    runs = [load_metrics(d) for d in run_dirs]
    if not panels_with_data([r for records in runs for r in records]):
        raise PlotError(f"no plottable values in {', '.join(run_dirs)}: every metric is absent, null or NaN")
    if not Path(out).parent.is_dir():
        raise PlotError(f"--out {out}: the folder {Path(out).parent} does not exist: create it or choose another --out")
    fig = build_figure(runs, labels or run_labels(run_dirs), [out_dim(d) for d in run_dirs])
    try:
        fig.savefig(out, format="png", dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write --out {out} ({e.strerror or e}): choose another --out") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medssl-plot", description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="pretraining run folder(s) with metrics.jsonl")
    p.add_argument("--out", help="PNG to write [RUN_DIR/metrics.png; several runs: "
                                 "the first RUN_DIR/metrics_compared.png]")
    p.add_argument("--labels", help="comma-separated legend names, one per run [folder names]")
    a = p.parse_args(argv)
    out = a.out or str(Path(a.run_dirs[0]) / ("metrics.png" if len(a.run_dirs) == 1 else "metrics_compared.png"))
    labels = [s.strip() for s in a.labels.split(",")] if a.labels is not None else None
    try:
        print(plot_runs(a.run_dirs, out, labels))
    except PlotError as e:
        print(f"medssl-plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
