"""What a build holds, as a JSON-able summary and as rich tables for people (`medssl-shard inspect`)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from .skips import reason_kind

_SHOWN_LEAKS = 10


def summarize(manifest: dict) -> dict:
    splits = {name: {k: s[k] for k in ("patients", "images", "samples", "bytes")} | {"shards": len(s["shards"])}
              for name, s in manifest["splits"].items()}
    hist: Counter = Counter()
    for s in manifest["splits"].values():
        hist.update({int(k): v for k, v in s["images_per_patient"].items()})
    return {
        "schema_version": manifest["schema_version"],
        "splits": splits,
        "total": {k: sum(s[k] for s in splits.values()) for k in ("patients", "images", "samples", "bytes", "shards")},
        "images_per_patient": {str(k): hist[k] for k in sorted(hist)},
        "labels": {col: v["counts"] | ({"<missing>": v["missing"]} if v["missing"] else {})
                   for col, v in manifest["labels"].items()},
        "skipped": len(manifest["skipped"]),
        "skipped_reasons": dict(Counter(reason_kind(s["reason"]) for s in manifest["skipped"]).most_common()),
        "duplicates": dict(Counter(d["kind"] for d in manifest["duplicates"])),
        # Copies of one image in two splits leak it from training into evaluation.
        "cross_split_duplicates": [{k: d[k] for k in ("kind", "sources", "splits", "patients")}
                                   for d in manifest["duplicates"] if len(d.get("splits", ())) > 1],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_summary(summary: dict, console: Console, full: bool = True) -> None:
    """The splits table, then (full) the images-per-patient histogram and label tables."""
    t = Table(title="splits")
    for col in ("split", "patients", "images", "samples", "shards", "size"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for name, s in [*summary["splits"].items(), ("total", summary["total"])]:
        t.add_row(name, *(f"{s[k]:,}" for k in ("patients", "images", "samples", "shards")), _mb(s["bytes"]),
                  style="bold" if name == "total" else None)
    console.print(t)
    if full:
        _print_details(summary, console)
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped_reasons"].items())
    console.print(f"skipped: {summary['skipped']}" + (f" ({reasons})" if reasons else ""))
    dups = ", ".join(f"{k}: {v}" for k, v in summary["duplicates"].items())
    console.print(f"duplicates: {sum(summary['duplicates'].values())}" + (f" ({dups})" if dups else ""))
    print_leaks(summary["cross_split_duplicates"], console)


def print_leaks(leaks: list[dict], console: Console, shown: int = _SHOWN_LEAKS) -> None:
    """One warning line for duplicates whose copies sit in different splits, then one line per group."""
    if not leaks:
        return
    console.print(f"[bold yellow]WARNING:[/] {len(leaks)} duplicate group{'s' if len(leaks) > 1 else ''} "
                  "with copies in different splits (a train/evaluation leak; remove the copies or give them "
                  "one patient id):", highlight=False, soft_wrap=True)
    for d in leaks[:shown]:
        console.print(f"  {d['kind']}: " + ", ".join(d["sources"]) + f" -> splits {', '.join(d['splits'])}",
                      highlight=False, markup=False, soft_wrap=True)
    if len(leaks) > shown:
        console.print(f"  ... and {len(leaks) - shown} more: see 'duplicates' in manifest.json", highlight=False)


def _print_details(summary: dict, console: Console) -> None:
    h = Table(title="images per patient")
    h.add_column("images", justify="right")
    h.add_column("patients", justify="right")
    for k, v in summary["images_per_patient"].items():
        h.add_row(k, f"{v:,}")
    console.print(h)
    for col, counts in summary["labels"].items():
        lt = Table(title=f"label {col!r}")
        lt.add_column("value")
        lt.add_column("images", justify="right")
        for value, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            lt.add_row(str(value), f"{n:,}")
        console.print(lt)
