"""The label-efficiency study: the evaluation job over initializations x protocols x label fractions x seeds,
one run folder per cell, then the paper's figure and headline ("a fifth of the labels").

    python launch/study.py --config configs/study_demo.yaml inits.micle=runs/demo/encoder.pt
    python launch/study.py --config S.yaml --workers 2             # 2 cells at a time on this machine
    python launch/study.py --config S.yaml --backend slurm         # a job array, then an aggregation job
    python launch/study.py --config S.yaml --aggregate-only        # the outputs from the cells done so far
    python launch/study.py --config S.yaml --dry-run               # list the cells and which are done
    python launch/study.py run-cell STUDY_DIR INDEX                # one cell of STUDY_DIR/cells.json (Slurm)

Overrides are dotted `key=value` pairs (values parsed as YAML), e.g. `fractions=[0.1,1.0]`,
`base.overrides.data.shards=S`. Finished cells are skipped: rerunning the same command runs only what is
missing. Outputs in study_dir: label_efficiency.csv, label_efficiency.png, summary.md, headline.json.
Exit status: 0 every cell done, 1 some cells failed or are missing (the outputs use the others; a Slurm
submission: 0 once submitted), 2 a user error (one line, before any cell runs), 130 interrupted.
"""

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medssl_scale.cli import fail as _fail  # noqa: E402
from medssl_scale.config import ConfigError  # noqa: E402


def fail(message: str, code: int) -> int:
    return _fail("study", message, code)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-cell"]:
        p = argparse.ArgumentParser(prog="study.py run-cell", description="run one cell of a submitted study")
        p.add_argument("study_dir")
        p.add_argument("index", type=int)
        a = p.parse_args(argv[1:])
        try:
            from medssl_scale.study.driver import run_cell
            return run_cell(a.study_dir, a.index)
        except ConfigError as e:
            return fail(str(e), 2)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML study config, e.g. configs/study_demo.yaml (required)")
    p.add_argument("--backend", choices=("local", "slurm"), help="overrides the config's backend")
    p.add_argument("--workers", type=int, help="local backend: cells at a time (overrides the config's workers)")
    p.add_argument("--aggregate-only", action="store_true", help="run no cell; aggregate the finished ones")
    p.add_argument("--dry-run", action="store_true", help="list the cells and which are done; run nothing")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. inits.micle=runs/demo/encoder.pt")
    a = p.parse_args(argv)
    if not a.config:
        return fail("--config is required: e.g. --config configs/study_demo.yaml", 2)
    overrides = list(a.overrides)
    if a.backend:
        overrides.append(f"backend={a.backend}")
    if a.workers is not None:
        overrides.append(f"workers={a.workers}")
    try:
        from medssl_scale.study.driver import run_study
        from medssl_scale.study.slurm import SubmitError

        return run_study(a.config, overrides, aggregate_only=a.aggregate_only, dry_run=a.dry_run)
    except ConfigError as e:
        return fail(str(e), 2)
    except SubmitError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        print("study: interrupted; rerun the same command to resume (finished cells are skipped)", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
