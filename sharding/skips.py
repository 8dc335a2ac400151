"""Explain skipped inputs: the commonest reasons with counts and examples, and what to fix when none is usable."""

from __future__ import annotations

from collections import Counter

from .options import BuildOptions

_SHOWN_REASONS = 5


def reason_kind(reason: str) -> str:
    """The part of a skip reason that groups alike inputs: "undecodable image: <detail>" -> "undecodable image"."""
    return reason.split(":")[0]


def top_reasons(skips: list[dict], limit: int = _SHOWN_REASONS) -> list[tuple[str, int, list[str]]]:
    """[(reason kind, count, first two sources)] for the most frequent kinds, commonest first."""
    counts = Counter(reason_kind(s["reason"]) for s in skips)
    examples: dict[str, list[str]] = {}
    for s in skips:
        shown = examples.setdefault(reason_kind(s["reason"]), [])
        if len(shown) < 2:
            shown.append(s["source"])
    return [(kind, n, examples[kind]) for kind, n in counts.most_common(limit)]


def _examples(sources: list[str]) -> str:
    return " and ".join(repr(s) for s in sources)


def _fix(opts: BuildOptions, kind: str, n: int, sources: list[str]) -> str:
    """What the user has to change when the commonest skip reason is `kind`."""
    if kind == "path does not match --patient-regex":
        return (f"--patient-regex '{opts.patient_regex}' matched none of the {n} image paths it was searched "
                f"in (each path relative to SOURCE, e.g. {_examples(sources)}): fix it so that its one group "
                "captures the patient id from such a path")
    for flag, level in (("--class-from-folder", opts.class_from_folder),
                        ("--split-from-folder", opts.split_from_folder)):
        if kind == f"{flag} {level}":
            return (f"{flag} {level} names a folder level the images do not have (paths relative to SOURCE "
                    f"such as {_examples(sources)}): count levels from 1 = the first folder below SOURCE, "
                    "or from -1 = the folder holding the image")
    if kind.startswith("not an image file"):
        return (f"no file below SOURCE is a JPEG, PNG, BMP, TIFF, WebP or DICOM image (found e.g. "
                f"{_examples(sources)}): point SOURCE at the folder of images")
    if kind in ("missing file", "path escapes SOURCE"):
        return (f"no --image-col {opts.image_col!r} path names a file below SOURCE (e.g. {_examples(sources)}): "
                "make the manifest paths relative to SOURCE, or give the folder they are relative to as SOURCE")
    return "fix the inputs named below"


def no_usable_images(opts: BuildOptions, skips: list[dict]) -> str:
    """The RunError text for a SOURCE of which nothing is usable: one line, then the commonest reasons."""
    if not skips:
        return f"SOURCE {opts.source} has no usable images: it holds no files (hidden ones are ignored)"
    top = top_reasons(skips)
    kind, n, sources = top[0]
    lines = [f"SOURCE {opts.source} has no usable images (all {len(skips)} inputs skipped): "
             f"{_fix(opts, kind, n, sources)}. Skipped, by reason:"]
    lines += [f"  {count:>7,}  {reason}  (e.g. {_examples(examples)})" for reason, count, examples in top]
    return "\n".join(lines)
