"""`medssl-shard`: build, merge, verify and inspect patient-grouped WebDataset shards."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from rich.console import Console

from .errors import RunError
from .options import DEFAULT_SPLITS, BuildOptions, parse_size, parse_splits

err = Console(stderr=True, log_path=False)
out = Console()


def _slurm_array_defaults() -> tuple[int, int]:
    """(task index, task count) of a Slurm job array; ids may start anywhere (--array=1-8), so rebase."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    task_id = int(os.environ["SLURM_ARRAY_TASK_ID"])
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    return task_id - first, count


def _folder_level(flag: str) -> Callable[[str], int]:
    """argparse type of a folder level: a non-zero whole number, with a message that names the usual slip."""
    def parse(text: str) -> int:
        try:
            level = int(text)
        except ValueError:
            level = 0
        if level == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a folder level: write a whole number, 1 = the first folder below SOURCE, "
                f"-1 = the folder holding the image (put SOURCE and OUTPUT before {flag}, or write {flag}=1)")
        return level
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medssl-shard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    task_index, num_tasks = _slurm_array_defaults()

    b = sub.add_parser("build", help="pack SOURCE images into OUTPUT/<split>/shard-NNNNNN.tar")
    b.add_argument("source", metavar="SOURCE", help="folder of images (local path or fsspec URL)")
    b.add_argument("output", metavar="OUTPUT", help="output folder (local path or fsspec URL)")
    b.add_argument("--manifest", help="CSV or JSONL file listing the images (paths relative to SOURCE)")
    b.add_argument("--image-col", default="path", help="manifest column with the image path [path]")
    b.add_argument("--patient-col", help="manifest column with the patient id")
    b.add_argument("--label-cols", default="", help="comma-separated manifest columns kept as labels")
    b.add_argument("--split-col", help="manifest column naming each row's split (instead of --splits)")
    b.add_argument("--patient-regex", help="folder mode: regex with one group over the relative path giving the patient")
    b.add_argument("--class-from-folder", nargs="?", const=1, type=_folder_level("--class-from-folder"),
                   metavar="LEVEL", help="folder mode: label 'class' = the folder at LEVEL of the relative path "
                   "(1 = first folder below SOURCE, -1 = the image's own folder) [1 when given alone]")
    b.add_argument("--split-from-folder", type=_folder_level("--split-from-folder"), metavar="LEVEL",
                   help="folder mode: each patient's split = the folder at LEVEL (instead of --splits)")
    b.add_argument("--images-per-sample", type=int, default=8, help="most images of one patient per sample [8]")
    b.add_argument("--splits", help=f"patient-level split fractions [{DEFAULT_SPLITS}]")
    b.add_argument("--seed", type=int, default=0, help="seed of the split and order hashes [0]")
    b.add_argument("--max-side", type=int, default=512, help="resize so the long side is at most N; 0 keeps bytes [512]")
    b.add_argument("--check-decode", action="store_true",
                   help="with --max-side 0, decode every image to prove it is intact (resized images always are)")
    b.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs [95]")
    b.add_argument("--shard-size", default="512MB", help="target shard size, e.g. 512MB, 1GiB [512MB]")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes [all cores]")
    b.add_argument("--task-index", type=int, default=task_index, help="this task of a Slurm array [from SLURM_ARRAY_*]")
    b.add_argument("--num-tasks", type=int, default=num_tasks, help="tasks in the array [from SLURM_ARRAY_*]")
    b.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    m = sub.add_parser("merge", help="write OUTPUT/manifest.json once every array task has finished")
    m.add_argument("output", metavar="OUTPUT")
    v = sub.add_parser("verify", help="re-read every shard: sha256, counts, tar integrity")
    v.add_argument("output", metavar="OUTPUT")
    i = sub.add_parser("inspect", help="splits, counts, images per patient, labels")
    i.add_argument("output", metavar="OUTPUT")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def _build_options(a: argparse.Namespace) -> BuildOptions:
    given_split = "--split-col" if a.split_col else "--split-from-folder" if a.split_from_folder is not None else None
    if a.splits is not None and given_split:
        raise RunError(f"--splits and {given_split} both decide the splits: drop one of them")
    return BuildOptions(
        source=a.source, output=a.output, manifest=a.manifest, image_col=a.image_col, patient_col=a.patient_col,
        label_cols=[c.strip() for c in a.label_cols.split(",") if c.strip()], split_col=a.split_col,
        patient_regex=a.patient_regex, class_from_folder=a.class_from_folder, split_from_folder=a.split_from_folder,
        images_per_sample=a.images_per_sample, splits=parse_splits(a.splits or DEFAULT_SPLITS), seed=a.seed,
        max_side=a.max_side, jpeg_quality=a.jpeg_quality, check_decode=a.check_decode,
        shard_size=parse_size(a.shard_size), workers=a.workers, task_index=a.task_index, num_tasks=a.num_tasks,
    ).validate()


def _report(manifest: dict, elapsed: float | None = None) -> None:
    from .summary import print_summary, summarize

    summary = summarize(manifest)
    print_summary(summary, out, full=False)
    if elapsed:
        out.print(f"{summary['total']['images']:,} images in {elapsed:.1f} s "
                  f"({summary['total']['images'] / elapsed:,.0f} images/s)")
    if summary["skipped"]:
        err.print(f"[yellow]warning:[/] {summary['skipped']} inputs skipped (listed under 'skipped' in manifest.json)")


def _run(a: argparse.Namespace) -> int:
    if a.command == "build":
        from .build import build

        opts = _build_options(a)
        started = time.perf_counter()
        manifest = build(opts, show_progress=not a.quiet, log=(lambda m: None) if a.quiet else err.log)
        if manifest is not None and not a.quiet:
            _report(manifest, time.perf_counter() - started)
        return 0
    if a.command == "merge":
        from .build import load_plan
        from .manifest import write_manifest
        from .storage import Location

        loc = Location(a.output)
        _report(write_manifest(loc, load_plan(loc)))
        return 0
    if a.command == "verify":
        from .verify import verify

        checked, broken = verify(a.output)
        for path, problems in broken.items():
            err.print(f"[red]BROKEN[/] {path}: {'; '.join(problems)}", highlight=False)
        out.print(f"{checked - len(broken)}/{checked} shards OK")
        return 1 if broken else 0
    if a.command == "inspect":
        from .manifest import load_manifest
        from .summary import print_summary, summarize

        summary = summarize(load_manifest(a.output)[1])
        if a.json:
            print(json.dumps(summary, indent=1))
        else:
            print_summary(summary, out)
        return 0
    raise AssertionError(a.command)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except RunError as e:
        err.print(f"medssl-shard {args.command}: error: {e}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted: rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
