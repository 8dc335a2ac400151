"""Assemble OUTPUT/manifest.json from the plan and the per-shard stats, once every shard is written."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from . import layout
from .errors import RunError
from .options import SCHEMA_VERSION
from .storage import Location


def _content_duplicates(written: list[dict]) -> list[dict]:
    """Different paths with identical bytes or identical decoded pixels: reported, all copies kept."""
    found, seen_pairs = [], set()
    for kind, field in (("same_content", "source_sha256"), ("same_pixels", "pixel_sha256")):
        groups = defaultdict(list)
        for w in written:
            if w.get(field):
                groups[w[field]].append(w)
        for digest, ws in sorted(groups.items()):
            sources = tuple(sorted(w["source"] for w in ws))
            if len(ws) < 2 or sources in seen_pairs:
                continue
            seen_pairs.add(sources)
            splits = sorted({w["split"] for w in ws})
            found.append({
                "kind": kind, "sha256": digest, "sources": list(sources),
                "rows": sorted(w["row"] for w in ws if w.get("row") is not None),
                "patients": sorted({w["patient_id"] for w in ws}), "splits": splits,
                "action": "kept all copies (reported only)"
                          + ("; WARNING: the copies sit in different splits" if len(splits) > 1 else ""),
            })
    return found


def _label_vocabulary(written: list[dict]) -> dict:
    counts: dict[str, Counter] = defaultdict(Counter)
    missing: Counter = Counter()
    for w in written:
        for col, value in (w.get("labels") or {}).items():
            if value is None:
                missing[col] += 1
            else:
                counts[col][value] += 1
    return {col: {"vocabulary": sorted(counts[col]), "counts": dict(sorted(counts[col].items())),
                  "missing": missing[col]} for col in sorted(set(counts) | set(missing))}


def read_stats(out: Location, plan: dict) -> list[dict]:
    """Every shard's stats, in plan order; RunError naming the shards that are not written yet."""
    stats, missing = [], []
    for shard in plan["shards"]:
        where = layout.shard_stats(shard["split"], shard["name"])
        if out.exists(*where):
            stats.append(json.loads(out.read_bytes(*where)))
        else:
            missing.append(f"{shard['split']}/{shard['name']}")
    if missing:
        raise RunError(f"{len(missing)} shard(s) not written yet ({', '.join(missing[:5])}"
                       f"{' ...' if len(missing) > 5 else ''}): rerun `medssl-shard build` for the missing tasks")
    return stats


def write_manifest(out: Location, plan: dict) -> dict:
    stats = read_stats(out, plan)
    written, skipped = [], list(plan["skipped"])
    splits: dict[str, dict] = {name: {"patients": 0, "images": 0, "samples": 0, "bytes": 0, "shards": [],
                                      "images_per_patient": {}} for name in plan["split_names"]}
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for st in stats:
        split = splits[st["split"]]
        split["shards"].append({k: st[k] for k in ("path", "index", "samples", "images", "bytes", "sha256")})
        for k in ("images", "samples", "bytes"):
            split[k] += st[k]
        for w in st["written"]:
            written.append({**w, "split": st["split"]})
            per_patient[st["split"]][w["patient_id"]] += 1
        skipped.extend(st["skipped"])
    for name, split in splits.items():
        split["patients"] = len(per_patient[name])
        hist = Counter(per_patient[name].values())
        split["images_per_patient"] = {str(k): hist[k] for k in sorted(hist)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool_version": plan["tool_version"],
        "command": plan["command"],
        "options": plan["options"],
        "splits": splits,
        "labels": _label_vocabulary(written),
        "skipped": skipped,
        "duplicates": plan["duplicates"] + _content_duplicates(written),
    }
    # Insertion order is already fixed (splits in plan order), so no sort_keys.
    out.write_bytes(json.dumps(manifest, indent=1).encode(), *layout.MANIFEST)
    return manifest


def load_manifest(url: str) -> tuple[Location, dict]:
    out = Location(url)
    if not out.exists(*layout.MANIFEST):
        raise RunError(f"{url} has no manifest.json: is it a finished `medssl-shard build` OUTPUT?")
    try:
        return out, json.loads(out.read_bytes(*layout.MANIFEST))
    except ValueError as e:
        raise RunError(f"{url}/manifest.json is not valid JSON: {e}") from None
