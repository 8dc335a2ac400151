#!/usr/bin/env bash
# DALI GPU checks for a lent H200 machine: one JSON line per check on stdout, done within 8 minutes.
#
#   bash bench/gpu_check.sh            install DALI, then: throughput (pairs/s at 224 px, simclr, batch 256,
#                                      goal >= 10,000), bf16 output, corrupt-input handling, GPU-vs-CPU semantics,
#                                      and a ResNet-50 bf16 channels-last training step on DALI input (goal >= 2,500)
#   bash bench/gpu_check.sh --stage    only collect the DALI archive parts carried by this call, then exit
#
# The machine has python3 3.12 with torch (cu130), numpy and Pillow, but no DALI and no network. DALI comes
# as wheels in .dali/*.whl or .whl/*.whl (installed with --no-deps into $SITE), or, since DALI and what it
# loads are ~200 MB against 64 MiB a call may carry, as parts made by bench/gpu_pack_dali.py:
# .dali/manifest.json + one .dali/pK per call. Parts are kept in $PARTS on the machine while it stays
# warm; the call that completes the set unpacks them and runs the checks. For N parts:
#   calls 1..N-1:  carry [".dali/manifest.json", ".dali/pK"]   command: bash bench/gpu_check.sh --stage
#   call N:        carry [".dali/manifest.json", ".dali/pN-1"] command: bash bench/gpu_check.sh
# Environment: PYTHON (python3), SITE (/tmp/medssl_site), PARTS (/tmp/medssl_parts), BUDGET_S (480),
# BENCH_ARGS (extra arguments for bench/gpu_dali_bench.py, e.g. "--threads 6 12"), DEVICE (0; "cpu" for a
# dry run of this script without a GPU, e.g. DEVICE=cpu PYTHON=.venv/bin/python
# BENCH_ARGS="--images 64 --size 64 --batch 16 --steps 3 --threads 2" bash bench/gpu_check.sh).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
T0=$(date +%s)
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/medssl_site}
PARTS=${PARTS:-/tmp/medssl_parts}
BUDGET_S=${BUDGET_S:-480}
DEVICE=${DEVICE:-0}
STAGE_ONLY=0
[ "${1:-}" = "--stage" ] && STAGE_ONLY=1
mkdir -p "$SITE" "$PARTS"

json_fail() {  # check name, message
    "$PY" -c 'import json,sys; print(json.dumps({"check": sys.argv[1], "ok": False, "error": sys.argv[2][-2000:]}))' "$1" "$2"
}

# 1. Wheels, if any were carried.
shopt -s nullglob
wheels=(.dali/*.whl .whl/*.whl)
if ((${#wheels[@]})); then
    if log=$("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" 2>&1); then
        "$PY" -c 'import json,sys; print(json.dumps({"check": "install_wheels", "ok": True, "wheels": sys.argv[1:]}))' "${wheels[@]}"
    else
        json_fail install_wheels "$log"
    fi
fi

# 2. Archive parts from bench/gpu_pack_dali.py: collect, and unpack once the set is complete.
if [ -f .dali/manifest.json ]; then
    for p in .dali/p*/site.tar.xz.part*; do cp -f "$p" "$PARTS/"; done
    cp -f .dali/manifest.json "$PARTS/manifest.json"
fi
if [ -f "$PARTS/manifest.json" ]; then
    "$PY" - "$PARTS" "$SITE" "$STAGE_ONLY" <<'EOF'
import hashlib, json, os, subprocess, sys, time
parts_dir, site, stage_only = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = json.load(open(os.path.join(parts_dir, "manifest.json")))
names = [os.path.basename(p) for p in m["parts"]]
have = [n for n in names if os.path.exists(os.path.join(parts_dir, n))]
missing = [n for n in names if n not in have]
marker = os.path.join(site, ".unpacked-" + m["sha256"][:16])
out = {"check": "stage_parts", "have": have, "missing": missing, "unpacked": os.path.exists(marker)}
here = f"{sys.version_info.major}{sys.version_info.minor}"
if m.get("python") and m["python"] != here:
    out["warning"] = f"the parts were packed for CPython {m['python']}, this is {here}: DALI will not import"
if not missing and not os.path.exists(marker):
    t = time.time()
    h = hashlib.sha256()
    for n in names:
        with open(os.path.join(parts_dir, n), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    if h.hexdigest() != m["sha256"]:
        out.update(ok=False, error="sha256 mismatch: parts from different packs?")
    else:
        cat = subprocess.Popen(["cat"] + [os.path.join(parts_dir, n) for n in names], stdout=subprocess.PIPE)
        rc = subprocess.call(["tar", "-xJf", "-", "-C", site], stdin=cat.stdout)
        cat.stdout.close()
        cat.wait()
        if rc == 0:
            open(marker, "w").close()
        out.update(ok=rc == 0, unpacked=rc == 0, unpack_s=round(time.time() - t, 1))
else:
    out["ok"] = not missing or stage_only
print(json.dumps(out))
EOF
fi
[ "$STAGE_ONLY" = 1 ] && exit 0

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# 3. Preflight: what is there, and does DALI import and see the GPU.
if ! "$PY" - "$DEVICE" <<'EOF'
import json, platform, subprocess, sys
info = {"check": "preflight", "python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if sys.argv[1] != "cpu":
        info.update(gpu=torch.cuda.get_device_name(int(sys.argv[1])), gpus=torch.cuda.device_count())
    import numpy, PIL
    info.update(numpy=numpy.__version__, pillow=PIL.__version__)
    import nvidia.dali as dali
    info.update(dali=dali.__version__, dali_path=dali.__file__)
    from nvidia.dali import backend
    info["dali_cuda_driver"] = backend.GetCudaVersion() if hasattr(backend, "GetCudaVersion") else None
    import medssl_scale.augment.dali_backend  # noqa: F401
    info["ok"] = True
except Exception as e:  # noqa: BLE001
    info.update(ok=False, error=f"{type(e).__name__}: {e}")
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # noqa: BLE001
    pass
print(json.dumps(info))
raise SystemExit(0 if info["ok"] else 1)
EOF
then
    exit 1
fi

# 4. The checks, inside what is left of the budget (SIGINT first, so Python prints what it has).
LEFT=$((BUDGET_S - ($(date +%s) - T0)))
if [ "$LEFT" -lt 60 ]; then
    json_fail budget "only ${LEFT}s left after installing"
    exit 1
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
timeout --signal=INT --kill-after=15 "$LEFT" "$PY" -u bench/gpu_dali_bench.py --device "$DEVICE" --images 2000 \
    --size 224 --batch 256 --warmup 10 --steps 60 --threads 6 12 ${BENCH_ARGS:-}
rc=$?
[ "$rc" = 124 ] && json_fail budget "the checks ran past ${LEFT}s and were stopped"
# Training step: ResNet-50 1x, bf16 autocast, channels-last, DALI input (goal >= 2,500 pairs/s).
LEFT=$((BUDGET_S - ($(date +%s) - T0)))
if [ "$LEFT" -ge 60 ] && [ "$DEVICE" != cpu ]; then
    timeout --signal=INT --kill-after=15 "$LEFT" "$PY" -u bench/gpu_train_bench.py --device "$DEVICE" \
        --batch 256 --warmup 5 --steps 30 --threads 12 || rc=$?
elif [ "$DEVICE" = cpu ]; then
    "$PY" -u bench/gpu_train_bench.py --device cpu --depth 18 --size 32 --batch 8 --steps 2 --warmup 1 \
        --images 32 --threads 2 || rc=$?
else
    json_fail train_step "only ${LEFT}s left for the training-step check"
fi
"$PY" -c 'import json,sys; print(json.dumps({"check": "done", "seconds": int(sys.argv[1]), "rc": int(sys.argv[2])}))' \
    "$(($(date +%s) - T0))" "$rc"
exit "$rc"
