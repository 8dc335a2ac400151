"""The study's human-facing outputs: summary.md, label_efficiency.png, headline.json and the console tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from .aggregate import Headline, Point

BASELINE_COLOR = "0.35"


def count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def pct(f: float) -> str:
    return f"{100 * f:g}%"


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def mean_std(p: Point | None) -> str:
    if p is None:
        return "n/a"
    spread = f" ± {fmt(p.std)}" if p.std is not None else ""
    seeds = f" ({p.n} of {p.expected} seeds)" if p.n != p.expected else ""
    return f"{fmt(p.mean)}{spread}{seeds}"


def ci(p: Point | None) -> str:
    return "n/a" if p is None or p.low is None or p.high is None else f"[{fmt(p.low)}, {fmt(p.high)}]"


def sentence(h: Headline, metric: str) -> str:
    who = f"**{h.init}** ({h.protocol})"
    if h.target is None:
        return f"{who}: {h.note}"
    if h.init == h.baseline:
        earlier = (f"; its mean reaches that already at {pct(h.reached.fraction)} ({mean_std(h.reached)})"
                   if h.reached and h.reached.fraction < 1 else "")
        return (f"{who} is the baseline: {metric} {mean_std(h.target)} at 100% of the labels, "
                f"95% CI {ci(h.target)}{earlier}")
    target = f"{h.baseline}'s {metric} at 100% of the labels ({mean_std(h.target)}, 95% CI {ci(h.target)})"
    if h.reached is None:
        best = f"; best {mean_std(h.best)} at {pct(h.best.fraction)}" if h.best else ""
        return f"{who}: does not reach {target} at any studied fraction{best}"
    ratio = f", {1 / h.reached.fraction:.3g}x fewer labels" if h.reached.fraction < 1 else ""
    return (f"{who}: reaches {target} with **{pct(h.reached.fraction)}** of the labels{ratio}: "
            f"{mean_std(h.reached)}, 95% CI {ci(h.reached)}")


def fraction_table(points: list[Point], protocol: str, inits: list[str], fractions: list[float]) -> list[list[str]]:
    at = {(p.init, p.fraction): p for p in points if p.protocol == protocol}
    return [[pct(f)] + [mean_std(at.get((i, f))) for i in inits] for f in sorted(fractions)]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(*, study_dir: str, metric: str, inits: list[str], protocols: list[str], fractions: list[float],
             seeds: list[int], baseline: str, points: list[Point], heads: list[Headline], rows: list[dict]) -> str:
    done = sum(r["status"] == "done" for r in rows)
    parts = [f"# Label-efficiency study: {metric}", "",
             f"Study folder `{study_dir}`: {done} of {count(len(rows), 'cell')} done "
             f"({count(len(inits), 'initialization')} x {count(len(protocols), 'protocol')} x "
             f"{count(len(fractions), 'fraction')} x {count(len(seeds), 'seed')}). "
             f"Fractions are of "
             f"the training patients, drawn by patient and stratified. Values are the test-set {metric}: mean ± "
             f"sample standard deviation over seeds; the 95% CIs are the runs' patient-bootstrap intervals "
             f"averaged over seeds (each run's own is in `label_efficiency.csv`).", "",
             f"## Headline: the fraction at which each initialization reaches {baseline} at 100%", ""]
    parts += [f"- {sentence(h, metric)}" for h in heads] + [""]
    parts.append(_md_table(["protocol", "init", "reaches at", f"{metric} there", "95% CI there",
                            f"{baseline} at 100%", "its 95% CI"],
                           [[h.protocol, h.init, pct(h.fraction) if h.fraction else (h.note or "not reached"),
                             mean_std(h.reached), ci(h.reached), mean_std(h.target), ci(h.target)] for h in heads]))
    for protocol in protocols:
        parts += ["", f"## {metric} by label fraction: {protocol}", "",
                  _md_table(["fraction", *inits], fraction_table(points, protocol, inits, fractions))]
    missing = [r for r in rows if r["status"] != "done" or r.get("value") is None]
    if missing:
        parts += ["", f"## Missing cells ({len(missing)})", ""]
        parts += [f"- `{r['cell']}`: {r['status']}" + (f" ({r['error']}); log: `{r['log']}`" if r["error"] else "")
                  for r in missing]
    return "\n".join(parts) + "\n"


def plot(path: Path, points: list[Point], inits: list[str], protocols: list[str], fractions: list[float],
         baseline: str, metric: str) -> None:
    """Metric against label fraction (log axis): one line per init in each protocol's panel, mean over
    seeds with a band of ± one standard deviation; the baseline's mean at 100% as a dashed line."""
    from ..finetune.outputs import _save  # the eval job's PNG writer (Agg canvas, atomic)

    fig = Figure(figsize=(5.0 * len(protocols) + 0.5, 4.2))
    axes = [fig.add_subplot(1, len(protocols), i + 1) for i in range(len(protocols))]
    colors = iter(f"C{i}" for i in range(10 ** 3))
    color = {i: BASELINE_COLOR if i == baseline else next(colors) for i in inits}
    for ax, protocol in zip(axes, protocols):
        for init in inits:
            ps = sorted((p for p in points if p.protocol == protocol and p.init == init), key=lambda p: p.fraction)
            if not ps:
                continue
            x = [p.fraction for p in ps]
            y = [p.mean for p in ps]
            sd = [p.std or 0.0 for p in ps]
            ax.plot(x, y, marker="o", color=color[init], label=init, linestyle="--" if init == baseline else "-")
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=color[init],
                            alpha=0.18, linewidth=0)
        target = next((p for p in points if p.protocol == protocol and p.init == baseline and p.fraction == 1.0), None)
        if target is not None:
            ax.axhline(target.mean, color=BASELINE_COLOR, linewidth=0.8, linestyle=":",
                       label=f"{baseline} at 100%")
        ax.set_xscale("log")
        ticks = sorted(fractions)
        ax.set_xticks(ticks, [pct(f) for f in ticks])
        ax.minorticks_off()
        ax.set_xlabel("label fraction (of the training patients)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(protocol)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished cells", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{metric} against label fraction: mean ± 1 std over seeds", fontsize=10)
    _save(fig, path)


def headline_json(heads: list[Headline], metric: str) -> str:
    def point(p: Point | None):
        return None if p is None else {"fraction": p.fraction, "mean": p.mean, "std": p.std, "n_seeds": p.n,
                                       "ci_low": p.low, "ci_high": p.high}
    return json.dumps({"metric": metric, "headline": [
        {"protocol": h.protocol, "init": h.init, "baseline": h.baseline, "fraction": h.fraction,
         "reached": point(h.reached), "baseline_at_1": point(h.target), "best": point(h.best), "note": h.note,
         "sentence": sentence(h, metric)}
        for h in heads]}, indent=2) + "\n"


def print_tables(heads: list[Headline], points: list[Point], inits: list[str], protocols: list[str],
                 fractions: list[float], metric: str, console: Console | None = None) -> None:
    console = console or Console()
    for protocol in protocols:
        t = Table(title=f"{metric} by label fraction: {protocol} (mean ± std over seeds)")
        t.add_column("fraction", justify="right")
        for i in inits:
            t.add_column(i, justify="right")
        for row in fraction_table(points, protocol, inits, fractions):
            t.add_row(*row)
        console.print(t)
    t = Table(title=f"Headline: the fraction at which each init reaches the baseline's {metric} at 100%")
    for name, justify in (("protocol", "left"), ("init", "left"), ("reaches at", "right"), ("there", "right"),
                          ("baseline at 100%", "right"), ("its 95% CI", "right")):
        t.add_column(name, justify=justify)
    for h in heads:
        t.add_row(h.protocol, h.init, pct(h.fraction) if h.fraction else (h.note or "not reached"),
                  mean_std(h.reached), mean_std(h.target), ci(h.target))
    console.print(t)
