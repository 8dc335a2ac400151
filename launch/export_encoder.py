"""Export encoder.pt (a plain float32 backbone state_dict) from any checkpoint of a run, ZeRO-3 included.

    python launch/export_encoder.py runs/debug/checkpoints runs/debug/encoder-step20.pt [--tag step00000020]
    torch.load("encoder.pt", weights_only=True) then loads it; OUT may be any fsspec URL.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medssl_scale.config import ConfigError  # noqa: E402
from medssl_scale.train.checkpoint import export_encoder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", help="a run's checkpoint folder (default <run_dir>/checkpoints)")
    p.add_argument("out", help="where to write encoder.pt")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00000020 (default: the latest complete one)")
    a = p.parse_args()
    try:
        encoder = export_encoder(a.checkpoints, a.out, a.tag)
    except ConfigError as e:
        print(f"export_encoder: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(encoder)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
