"""Pack this venv's DALI (and what it loads) for the GPU machine, in parts small enough to travel.

The nvidia-dali-cuda130 wheel alone is ~199 MB, over the 64 MiB a device call may carry, and DALI also
needs nvImageCodec, nvJPEG (CUDA 13) and the Python packages astunparse, gast and optree, none of
which the GPU machine has. This script takes the installed files of those distributions from the local
venv, keeps only one Python version's extension modules, and writes

    .dali/manifest.json            the parts, their order and the sha256 of the whole archive
    .dali/p0/site.tar.xz.part0     ... one folder per part, each under --part-mib

so each device call carries `.dali/manifest.json` plus one `.dali/pK`; bench/gpu_check.sh collects the parts
on the machine (/tmp/medssl_parts, kept while it stays warm) and unpacks them once all have arrived.
Compiled packages missing locally for the target Python (optree) are taken from --wheels DIR, e.g.

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .dali-wheels optree
    .venv/bin/python bench/gpu_pack_dali.py --wheels .dali-wheels
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

# nvidia-libnvcomp-cu13 (23 MB) is left out: DALI's libraries do not link it, and only decompression
# operators (not JPEG/PNG decoding) load it.
DISTS = ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13",
         "nvidia-nvtiff-cu13", "astunparse", "gast", "makefun"]
# Not needed at run time by DaliPairLoader: headers, CMake files, CLI tools, caches.
SKIP = re.compile(r"(^|/)(__pycache__|include|cmake|tools)(/|$)|\.pyc$|\.dist-info/|\.a$")
EXT = re.compile(r"\.cpython-(\d+t?)-x86_64-linux-gnu\.so$")


def files_of(dist: str, pytag: str):
    d = metadata.distribution(dist)
    for f in d.files or []:
        rel = str(f)
        if rel.startswith("..") or SKIP.search(rel):
            continue
        m = EXT.search(rel)
        if m and m.group(1) != pytag:
            continue  # an extension module for another Python version
        path = Path(d.locate_file(f))
        if path.is_file():
            yield rel, path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".dali")
    ap.add_argument("--python", default="312", help="target CPython version tag (the GPU machine has 3.12)")
    ap.add_argument("--part-mib", type=float, default=56.0,
                    help="part size; the repo (~2 MiB) and one part must stay under the 64 MiB a call carries")
    ap.add_argument("--wheels", default=None, help="folder of extra wheels to unpack into the site (optree)")
    ap.add_argument("--preset", type=int, default=6, help="xz preset")
    args = ap.parse_args()

    members: dict[str, Path] = {}
    for dist in DISTS:
        try:
            for rel, path in files_of(dist, args.python):
                members[rel] = path
        except metadata.PackageNotFoundError:
            print(f"warning: {dist} is not installed here; skipped", file=sys.stderr)
    wheel_members: dict[str, bytes] = {}
    for whl in sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []:
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if not name.endswith("/") and ".dist-info/" not in name:
                    wheel_members[name] = z.read(name)
    if not any(n.startswith("optree/") for n in wheel_members):
        print("warning: no optree wheel given (--wheels): nvidia.dali.ops imports optree, and the GPU "
              "machine has none", file=sys.stderr)

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for rel in sorted(members):
            tar.add(members[rel], arcname=rel, recursive=False)
        for name in sorted(wheel_members):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(wheel_members[name]), 0o755 if name.endswith(".so") else 0o644
            tar.addfile(info, io.BytesIO(wheel_members[name]))
    if shutil.which("xz"):  # multi-threaded; the lzma module compresses on one core only
        data = subprocess.run(["xz", "-T0", f"-{args.preset}", "-c"], input=raw.getvalue(), stdout=subprocess.PIPE,
                              check=True).stdout
    else:
        data = lzma.compress(raw.getvalue(), preset=args.preset)
    digest = hashlib.sha256(data).hexdigest()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    part_size = int(args.part_mib * 2**20)
    parts = []
    for k, start in enumerate(range(0, len(data), part_size)):
        (out / f"p{k}").mkdir(parents=True)
        name = f"p{k}/site.tar.xz.part{k}"
        (out / name).write_bytes(data[start:start + part_size])
        parts.append(name)
    manifest = {"archive": "site.tar.xz", "sha256": digest, "bytes": len(data), "parts": parts,
                "python": args.python, "distributions": DISTS,
                "extra_wheels": sorted({n.split("/")[0] for n in wheel_members})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({"packed_files": len(members) + len(wheel_members),
                      "uncompressed_mib": round(len(raw.getvalue()) / 2**20, 1),
                      "compressed_mib": round(len(data) / 2**20, 1), "parts": parts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
