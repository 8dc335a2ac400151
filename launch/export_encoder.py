"""Export encoder.pt (float32 backbone weights and their architecture) from any checkpoint of a run, ZeRO-3 included.

    python launch/export_encoder.py runs/debug/checkpoints runs/debug/encoder-step20.pt [--tag step00000020]
    python launch/export_encoder.py s3://bucket/run/checkpoints encoder.pt
    torch.load("encoder.pt", weights_only=True)["state_dict"] is the state_dict; OUT may be any fsspec URL.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medssl_scale.config import ConfigError  # noqa: E402
from medssl_scale.train.checkpoint import Checkpoints, export_encoder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", help="a run's checkpoint folder (default <run_dir>/checkpoints)")
    p.add_argument("out", help="where to write encoder.pt")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00000020 (default: the latest complete one)")
    a = p.parse_args()
    try:
        if "://" in a.checkpoints and not a.checkpoints.startswith("file://"):
            import tempfile

            with tempfile.TemporaryDirectory() as staging:  # the whole tag is downloaded there, then exported
                encoder = Checkpoints(a.checkpoints, 0, 0, "", staging=staging).export(a.out, a.tag)
        else:
            encoder = export_encoder(a.checkpoints, a.out, a.tag)
    except ConfigError as e:
        print(f"export_encoder: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(encoder)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
