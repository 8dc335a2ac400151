"""Evaluate or fine-tune an encoder on labelled shards: linear probe, kNN or full fine-tuning (Accelerate).

    python launch/finetune.py --config configs/ham_linear.yaml encoder=R/encoder.pt data.shards=S run_dir=F
    python launch/finetune.py --config configs/ham_linear.yaml label_fraction=0.1 ...
    accelerate launch --cpu --num_processes 2 launch/finetune.py --config configs/ham_finetune.yaml ...
    accelerate launch launch/finetune.py --config configs/cxr_multilabel.yaml ...       # GPUs
    python launch/finetune.py evaluate --config configs/ham_finetune.yaml classifier=F/model.pt \\
        data.shards=OTHER data.test_split=test run_dir=G                                  # out of distribution

Overrides are dotted `key=value` pairs (values parsed as YAML). Outputs in run_dir: metrics.json (with 95%
patient-bootstrap intervals), predictions.csv, confusion_matrix.png, reliability.png, model.pt, config.yaml.
Exit status: 0 done, 2 a user error (one line), 99 a signal arrived during fine-tuning and a checkpoint was
saved: rerun the same command to resume.
"""

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medssl_scale.config import ConfigError  # noqa: E402
from medssl_scale.data.batch import CorruptImage  # noqa: E402
from medssl_scale.data.shardset import ShardSetError  # noqa: E402
from medssl_scale.cli import fail as _fail, launch_rank as _rank  # noqa: E402
from medssl_scale.distributed.env import LaunchError  # noqa: E402

def fail(message: str, code: int) -> int:
    return _fail("finetune", message, code)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "evaluate" if argv[:1] == ["evaluate"] else "run"
    if mode == "evaluate":
        argv = argv[1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML evaluation config, e.g. configs/ham_linear.yaml (required)")
    p.add_argument("overrides", nargs="*", help="key.sub=value; `evaluate` also takes classifier=RUN/model.pt")
    a = p.parse_args(argv)
    if not a.config:
        return fail("--config is required: e.g. --config configs/ham_linear.yaml (configs/ holds the presets)", 2)
    try:
        from medssl_scale.finetune.config import load_eval_config
        from medssl_scale.finetune.job import evaluate_saved, run
        from medssl_scale.evaluate.errors import EvaluationError

        cfg = load_eval_config(a.config, a.overrides)
        if mode == "evaluate":
            if not cfg.classifier:
                raise ConfigError("evaluate needs classifier=<run_dir>/model.pt (the model to apply)")
            result = evaluate_saved(cfg, cfg.classifier)
        else:
            if cfg.classifier:
                raise ConfigError("classifier= is for `launch/finetune.py evaluate`; a training run takes encoder=")
            result = run(cfg)
    except (ConfigError, ShardSetError, LaunchError, EvaluationError, CorruptImage) as e:
        return fail(str(e), 2)
    except KeyboardInterrupt:
        if _rank() == 0:
            print("finetune: interrupted before training; nothing to save", file=sys.stderr)
        return 128 + signal.SIGINT
    if result:
        print(f"finetune: wrote {Path(cfg.run_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
