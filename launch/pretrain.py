"""Pretrain a contrastive encoder (SimCLR or MICLe) with DeepSpeed.

    python launch/pretrain.py --config configs/debug_cpu.yaml                      # one process
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/pretrain.py --config configs/debug_cpu.yaml
    deepspeed launch/pretrain.py --config configs/imagenet_simclr.yaml run_dir=runs/simclr
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/cxr_micle.yaml
    srun python launch/pretrain.py --config ...                                    # see launch/slurm/

Overrides are dotted `key=value` pairs (values parsed as YAML): train.steps=20 data.shards=s3://b/s
Exit status: 0 done, 2 a user error (one line), 3 training stopped (non-finite loss), 99 a signal (SIGTERM,
SIGUSR1, SIGINT) arrived and a checkpoint was saved: rerun the same command to resume.
"""

import argparse
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medssl_scale.config import ConfigError, load_config  # noqa: E402
from medssl_scale.data.shardset import ShardSetError  # noqa: E402
from medssl_scale.cli import fail as _fail, launch_rank as _rank  # noqa: E402
from medssl_scale.distributed.env import LaunchError, resolve  # noqa: E402

def fail(message: str, code: int) -> int:
    return _fail("pretrain", message, code)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config, e.g. configs/debug_cpu.yaml (required)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    a = p.parse_args()
    if not a.config:
        return fail("--config is required: name a run config, e.g. --config configs/debug_cpu.yaml "
                    "(configs/ holds one per stage)", 2)
    try:
        cfg = load_config(a.config, a.overrides)
        from medssl_scale.train.trainer import Trainer, TrainingError

        # Rank 0 reports progress; the other ranks only warnings.
        logging.basicConfig(level=logging.INFO if resolve().is_main else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s")
        trainer = Trainer(cfg)
        summary = trainer.train()  # a signal during training: a checkpoint, then SystemExit(99)
    except (ConfigError, ShardSetError, LaunchError) as e:
        return fail(str(e), 2)
    except TrainingError as e:
        return fail(str(e), 3)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save yet
        if _rank() == 0:
            print("pretrain: interrupted before the first step; nothing to save", file=sys.stderr)
        return 128 + signal.SIGINT
    if trainer.dist.is_main:
        from medssl_scale.train.report import print_summary

        print_summary(cfg, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
