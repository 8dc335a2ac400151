"""Pack this venv's DALI (and what it loads) for the GPU machine, in parts small enough to travel.

The nvidia-dali-cuda130 wheel alone is ~199 MB, over the 64 MiB a device call may carry, and DALI also
needs nvImageCodec, nvJPEG (CUDA 13) and the Python packages astunparse, gast, makefun and optree, none of
which the GPU machine has (its python3 is CPython 3.12.3: /work/.library/device/KINDS.md). This script
takes the installed files of those distributions from the local venv, keeps only the target Python's
extension modules, adds the pinned optree wheel for that Python, and writes

    .dali/manifest.json            the parts, their order and the sha256 of the whole archive
    .dali/p0/site.tar.xz.part0     ... one folder per part, each under --part-mib

so each device call carries `.dali/manifest.json` plus one `.dali/pK`; bench/gpu_check.sh collects the parts
on the machine (/tmp/medssl_parts, kept while it stays warm) and unpacks them (Python's tarfile) once all
have arrived.

    .venv/bin/python bench/gpu_pack_dali.py            # fetches optree==0.20.0 for cp312 if missing

optree is compiled, so the local venv's copy (built for this machine's Python) is no use there: the wheel
optree-0.20.0-cp312-cp312-manylinux*_x86_64.whl must be in --wheels (default .dali-wheels, ignored by
git); if it is not, the script runs `pip download` for exactly that file, and stops with an error if that
fails (nvidia.dali.ops imports optree: without it nothing on the GPU machine would run).

`nvidia/` is a namespace package: the GPU machine's torch brings nvidia.cu13, nvidia.cudnn, nvidia.nccl, ...
in its own site-packages. The `nvidia/__init__.py` that nvimgcodec, nvjpeg2k and nvtiff ship would make the
packed `nvidia` a regular package that hides those, so it is not packed.
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
OPTREE_VERSION = "0.20.0"  # the version this venv's DALI 2.4.0 runs with; cp312 wheels exist for it
DISTS = ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13",
         "nvidia-nvtiff-cu13", "astunparse", "gast", "makefun"]
# Not needed at run time by DaliPairLoader: headers, CMake files, CLI tools, caches.
SKIP = re.compile(r"(^|/)(__pycache__|include|cmake|tools)(/|$)|\.pyc$|\.dist-info/|\.a$")
EXT = re.compile(r"\.cpython-(\d+t?)-x86_64-linux-gnu\.so$")
# Namespace packages shared with the GPU machine's own packages: their __init__.py must not travel.
NAMESPACE_INITS = {"nvidia/__init__.py"}


def files_of(dist: str, pytag: str):
    d = metadata.distribution(dist)
    for f in d.files or []:
        rel = str(f)
        if rel.startswith("..") or SKIP.search(rel) or rel in NAMESPACE_INITS:
            continue
        m = EXT.search(rel)
        if m and m.group(1) != pytag:
            continue  # an extension module for another Python version
        path = Path(d.locate_file(f))
        if path.is_file():
            yield rel, path


class PackError(Exception):
    """A pack that would not run on the GPU machine; the message says what to do."""


def optree_wheel(folder: Path, pytag: str, fetch: bool = True) -> Path:
    """The pinned optree wheel for CPython `pytag` (e.g. "312") in folder, downloaded there if missing."""
    pattern = f"optree-{OPTREE_VERSION}-cp{pytag}-cp{pytag}-manylinux*_x86_64.whl"
    found = sorted(folder.glob(pattern))
    if not found and fetch:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               f"{pytag[0]}.{pytag[1:]}", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
               "manylinux2014_x86_64", "-d", str(folder), f"optree=={OPTREE_VERSION}"]
        print("fetching: " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=False, stdout=sys.stderr)
        found = sorted(folder.glob(pattern))
    if not found:
        raise PackError(f"no {pattern} in {folder}: nvidia.dali.ops imports optree and the GPU machine has "
                        f"none; download it with `python3 -m pip download --no-deps --only-binary=:all: "
                        f"--python-version {pytag[0]}.{pytag[1:]} --implementation cp --platform "
                        f"manylinux_2_28_x86_64 -d {folder} optree=={OPTREE_VERSION}`")
    with zipfile.ZipFile(found[-1]) as z:
        exts = [n for n in z.namelist() if EXT.search(n)]
    if not exts or any(EXT.search(n).group(1) != pytag for n in exts):
        raise PackError(f"{found[-1]} holds no CPython {pytag} extension module: it would not import there")
    return found[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".dali")
    ap.add_argument("--python", default="312", help="target CPython version tag (the GPU machine has 3.12)")
    ap.add_argument("--part-mib", type=float, default=56.0,
                    help="part size; the repo (~2 MiB) and one part must stay under the 64 MiB a call carries")
    ap.add_argument("--wheels", default=".dali-wheels",
                    help="folder of wheels to unpack into the site: optree for the target Python (fetched here if "
                         "missing) and any other")
    ap.add_argument("--no-fetch", action="store_true", help="do not run pip download for a missing optree wheel")
    ap.add_argument("--preset", type=int, default=6, help="xz preset")
    args = ap.parse_args()

    members: dict[str, Path] = {}
    try:
        for dist in DISTS:
            try:
                for rel, path in files_of(dist, args.python):
                    members[rel] = path
            except metadata.PackageNotFoundError:
                raise PackError(f"{dist} is not installed in this venv: `pip install nvidia-dali-cuda130` "
                                f"brings it and the rest of {', '.join(DISTS)}") from None
        if not any(rel.startswith(f"nvidia/dali/backend_impl.cpython-{args.python}-") for rel in members):
            raise PackError(f"this venv's DALI has no backend_impl for CPython {args.python}")
        optree = optree_wheel(Path(args.wheels), args.python, fetch=not args.no_fetch)
    except PackError as e:
        print(f"gpu_pack_dali: {e}", file=sys.stderr)
        return 2
    wheel_members: dict[str, bytes] = {}
    for whl in sorted(Path(args.wheels).glob("*.whl")):
        if whl.name.startswith("optree-") and whl != optree:
            continue  # another version or Python: only the pinned one travels
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if not name.endswith("/") and ".dist-info/" not in name and name not in NAMESPACE_INITS:
                    wheel_members[name] = z.read(name)

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
                "python": args.python, "distributions": DISTS, "optree": optree.name,
                "extra_wheels": sorted({n.split("/")[0] for n in wheel_members}),
                "namespace_inits_left_out": sorted(NAMESPACE_INITS)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({"packed_files": len(members) + len(wheel_members),
                      "uncompressed_mib": round(len(raw.getvalue()) / 2**20, 1),
                      "compressed_mib": round(len(data) / 2**20, 1), "parts": parts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
