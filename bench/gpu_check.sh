#!/usr/bin/env bash
# GPU checks for a lent H200 machine: DALI pipeline, training step, evaluation job. One JSON line per check,
# on stdout and in $RESULTS/gpu_check.jsonl (with the full log in $RESULTS/gpu_check.log); about 4 minutes,
# never more than BUDGET_S.
#
#   bash bench/gpu_check.sh            unpack DALI, then: preflight; DALI checks (decode_mode first: is the
#                                      decoder inside a DALI conditional right on the GPU; its choice of
#                                      decode_once is used by every later check), throughput (pairs/s at 224 px,
#                                      simclr, batch 256, goal >= 10,000), bf16 output, corrupt input, GPU-vs-CPU
#                                      semantics; a ResNet-50 bf16 channels-last training step on DALI input
#                                      (goal >= 2,500 pairs/s); the evaluation job's feature extraction and
#                                      fine-tune images/s on a ResNet-50 in bf16 (bench/gpu_eval_bench.py)
#   bash bench/gpu_check.sh --stage    only collect the DALI archive part carried by this call, then exit
#
# ---- How a session with a GPU runs it: exactly these device `run` calls, back to back --------------------
# Here, once (3 min on 2 cores; fetches optree 0.20.0 for CPython 3.12 into .dali-wheels/ if missing):
#     .venv/bin/python bench/gpu_pack_dali.py         # -> .dali/manifest.json, .dali/p0 .. .dali/p2
# It packs this venv's DALI 2.4.0 (~466 MiB unpacked, ~148 MiB xz) in 56 MiB parts: 3 parts, so 3 calls
# (if the pack prints another number of parts, add or drop --stage calls to match: one per part but the last).
# Each call carries the working tree (~3 MiB) plus one part, under the 64 MiB a call may carry:
#     call 1: run(command="bash bench/gpu_check.sh --stage", carry=[".dali/manifest.json", ".dali/p0"],
#                 timeout_s=60)                      starts the machine (a minute or two), stages part 0
#     call 2: run(command="bash bench/gpu_check.sh --stage", carry=[".dali/manifest.json", ".dali/p1"],
#                 timeout_s=60)                      stages part 1 (seconds)
#     call 3: run(command="bash bench/gpu_check.sh", carry=[".dali/manifest.json", ".dali/p2"],
#                 timeout_s=390)                     stages part 2, unpacks, runs every check (~4 min,
#                                                    BUDGET_S=330 at most)
#     then give_back().
# Make calls 2 and 3 as soon as the one before returns, without stopping to read: the machine stays warm
# only 30 s after a call, and the parts live in /tmp/medssl_parts on that machine only. Each stage line names
# the machine's boot_id: three equal ids mean one machine. If a part went missing (a new machine), call 3 says
# so in its stage_parts line, skips the DALI checks and the training step and still runs the evaluation job.
# Device time: ~2 min start + ~1 min staging + ~4 min checks; the 15 minutes a task gets leave room for one
# more full sequence (status first: budget_left_s >= 480). To rerun only some checks on a still-warm machine
# (DALI already unpacked there), carry nothing: run(command="CHECKS='train eval' bash bench/gpu_check.sh").
# The results come back under files_at: results/gpu_check.jsonl and results/gpu_check.log.
# ----------------------------------------------------------------------------------------------------------
#
# The machine has python3 3.12.3 with torch 2.11 (cu130), numpy, Pillow and accelerate, but no DALI and no
# network (/work/.library/device/KINDS.md). DALI comes as the parts above, or as wheels in .dali/*.whl or
# .whl/*.whl (installed with --no-deps into $SITE). The call that completes the set of parts checks the
# sha256 and unpacks them with Python's tarfile (no xz binary needed) into $SITE, which goes first on
# PYTHONPATH; `nvidia` stays a namespace package there (gpu_pack_dali.py leaves its __init__.py out), so
# the machine's own nvidia.* packages (cu13, cudnn, nccl) are still found.
# Environment: PYTHON (python3), SITE (/tmp/medssl_site), PARTS (/tmp/medssl_parts), BUDGET_S (330),
# RESULTS ($OUT/results, or runs/results where OUT is unset), CHECKS ("dali train eval"), BENCH_ARGS
# (extra words for bench/gpu_dali_bench.py, e.g. "--threads 6 12"), EVAL_ARGS (for bench/gpu_eval_bench.py),
# DEVICE (0; "cpu" for a dry run without a GPU, e.g.
#   DEVICE=cpu PYTHON=.venv/bin/python BENCH_ARGS="--images 64 --size 64 --batch 16 --warmup 1 --steps 3
#   --threads 2" bash bench/gpu_check.sh
# where the training step and the evaluation job run at tiny sizes on the CPU).
# Exit status: 0 every check ran and none failed; 1 something failed (see the lines with "ok": false).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
T0=$(date +%s)
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/medssl_site}
PARTS=${PARTS:-/tmp/medssl_parts}
BUDGET_S=${BUDGET_S:-330}
DEVICE=${DEVICE:-0}
CHECKS=${CHECKS:-dali train eval}
if [ -n "${OUT:-}" ]; then RESULTS=${RESULTS:-$OUT/results}; else RESULTS=${RESULTS:-$PWD/runs/results}; fi
STAGE_ONLY=0
[ "${1:-}" = "--stage" ] && STAGE_ONLY=1
mkdir -p "$SITE" "$PARTS" "$RESULTS" || exit 2
JSONL=$RESULTS/gpu_check.jsonl
LOG=$RESULTS/gpu_check.log
: >"$JSONL"
: >"$LOG"
RC=0

say() {  # stdin to stdout and the log; JSON lines also to the results file
    tee -a "$LOG" | awk -v j="$JSONL" '{ print; fflush() } /^\{/ { print >> j; fflush(j) }'
}
json_line() {  # check name, ok (true/false), message
    "$PY" -c 'import json,sys; print(json.dumps({"check": sys.argv[1], "ok": sys.argv[2] == "true",
        "error" if sys.argv[2] != "true" else "note": sys.argv[3][-2000:]}))' "$1" "$2" "$3" | say
    [ "$2" = true ] || RC=1
}
wants() { case " $CHECKS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
step() {  # name, cap in seconds, command...: run it inside min(cap, what is left of BUDGET_S)
    local name=$1 cap=$2 left rc
    shift 2
    left=$((BUDGET_S - ($(date +%s) - T0)))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then
        json_line "$name" false "skipped: only ${left}s of BUDGET_S=${BUDGET_S} left"
        return 1
    fi
    # SIGINT first, so that Python prints what it has; killed 10 s later if it does not stop.
    timeout --signal=INT --kill-after=10 "$cap" "$@" 2>&1 | say
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        json_line "$name" false "stopped after ${cap}s (cap of this step or the end of BUDGET_S)"
    elif [ "$rc" != 0 ]; then
        RC=1
    fi
    return "$rc"
}

# 1. Wheels, if any were carried.
shopt -s nullglob
wheels=(.dali/*.whl .whl/*.whl)
if ((${#wheels[@]})); then
    if log=$("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" 2>&1); then
        "$PY" -c 'import json,sys; print(json.dumps({"check": "install_wheels", "ok": True, "wheels": sys.argv[1:]}))' \
            "${wheels[@]}" | say
    else
        json_line install_wheels false "$log"
    fi
fi

# 2. Archive parts from bench/gpu_pack_dali.py: collect, and unpack once the set is complete.
if [ -f .dali/manifest.json ]; then
    for p in .dali/p*/site.tar.xz.part*; do cp -f "$p" "$PARTS/"; done
    cp -f .dali/manifest.json "$PARTS/manifest.json"
fi
DALI_READY=0
if [ -f "$PARTS/manifest.json" ]; then
    "$PY" - "$PARTS" "$SITE" "$STAGE_ONLY" "$DEVICE" <<'EOF' 2>&1 | say
import hashlib, io, json, os, sys, tarfile, time
parts_dir, site, stage_only, dry_run = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "cpu"
m = json.load(open(os.path.join(parts_dir, "manifest.json")))
names = [os.path.basename(p) for p in m["parts"]]
paths = [os.path.join(parts_dir, n) for n in names]
have = [n for n, p in zip(names, paths) if os.path.exists(p)]
missing = [n for n in names if n not in have]
marker = os.path.join(site, ".unpacked-" + m["sha256"][:16])
try:
    boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
except OSError:
    boot_id = None
out = {"check": "stage_parts", "have": have, "missing": missing, "unpacked": os.path.exists(marker),
       "boot_id": boot_id}
here = f"{sys.version_info.major}{sys.version_info.minor}"
wrong_python = bool(m.get("python")) and m["python"] != here
if wrong_python:
    out["warning"] = (f"the parts were packed for CPython {m['python']}, this is {here}: not unpacked"
                      + (" (a dry run uses this Python's own DALI)" if dry_run else ", DALI will not import"))


class Chain(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, files):
        self.files, self.f = list(files), None

    def readable(self):
        return True

    def readinto(self, buf):
        while True:
            if self.f is None:
                if not self.files:
                    return 0
                self.f = open(self.files.pop(0), "rb")
            n = self.f.readinto(buf)
            if n:
                return n
            self.f.close()
            self.f = None


if wrong_python:
    out["ok"] = None if dry_run else False
elif not missing and not os.path.exists(marker):
    t = time.time()
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    if h.hexdigest() != m["sha256"]:
        out.update(ok=False, error="sha256 mismatch: parts from different packs? repack and carry them again")
    else:
        # Python's tarfile and lzma: no tar or xz binary needed on the machine. "data" filter: no absolute
        # paths, links or devices out of the archive (Python >= 3.12 and the security backports have it).
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        n_files = n_bytes = 0
        try:
            with tarfile.open(fileobj=io.BufferedReader(Chain(paths), 1 << 20), mode="r|xz") as tar:
                for member in tar:
                    tar.extract(member, site, **extra)
                    n_files += member.isfile()
                    n_bytes += member.size if member.isfile() else 0
            ns_init = os.path.join(site, "nvidia", "__init__.py")
            if os.path.exists(ns_init):  # an older pack: it would hide the machine's own nvidia.* packages
                os.remove(ns_init)
                out["removed"] = ns_init
            open(marker, "w").close()
            out.update(ok=True, unpacked=True, files=n_files, unpacked_mib=round(n_bytes / 2**20, 1))
        except (tarfile.TarError, EOFError, OSError) as e:
            out.update(ok=False, error=f"unpack failed: {type(e).__name__}: {e}")
        out["unpack_s"] = round(time.time() - t, 1)
else:
    out["ok"] = not missing or stage_only
print(json.dumps(out))
EOF
    [ -f "$SITE/.unpacked-$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"][:16])' \
        "$PARTS/manifest.json")" ] && DALI_READY=1
fi
((${#wheels[@]})) && DALI_READY=1
[ "$STAGE_ONLY" = 1 ] && exit 0

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# 3. Preflight: what is there; does the evaluation job import; does DALI import and see the GPU.
#    Exit 0: all there; 3: torch and the job are fine but DALI is not; else nothing can run.
"$PY" - "$DEVICE" <<'EOF' 2>&1 | say
import json, platform, subprocess, sys
info, rc = {"check": "preflight", "python": platform.python_version()}, 0
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if sys.argv[1] != "cpu":
        info.update(gpu=torch.cuda.get_device_name(int(sys.argv[1])), gpus=torch.cuda.device_count())
    import accelerate, numpy, PIL
    info.update(numpy=numpy.__version__, pillow=PIL.__version__, accelerate=accelerate.__version__)
    import medssl_scale.finetune.train_loop  # noqa: F401 - the evaluation job's imports
except Exception as e:  # noqa: BLE001
    info.update(error=f"{type(e).__name__}: {e}")
    rc = 1
if rc == 0:
    try:
        import nvidia
        info["nvidia_path"] = list(nvidia.__path__)
        info["nvidia_namespace"] = getattr(nvidia, "__file__", None) is None
        import optree
        info["optree"] = optree.__version__
        import nvidia.dali as dali
        info.update(dali=dali.__version__, dali_path=dali.__file__)
        import medssl_scale.augment.dali_backend  # noqa: F401
        info["dali_ok"] = True
    except Exception as e:  # noqa: BLE001
        info.update(dali_ok=False, dali_error=f"{type(e).__name__}: {e}")
        rc = 3
try:
    import os
    st = os.statvfs("/dev/shm")  # DataLoader workers hand batches over through it
    info["shm_free_mib"] = st.f_bavail * st.f_frsize // 2**20
    info["cpus"] = len(os.sched_getaffinity(0))
except (OSError, AttributeError):
    pass
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # noqa: BLE001
    pass
info["ok"] = rc == 0
print(json.dumps(info))
raise SystemExit(rc)
EOF
pre=$?
if [ "$pre" != 0 ] && [ "$pre" != 3 ]; then
    json_line "done" false "preflight failed (rc $pre): nothing can run"
    exit 1
fi
[ "$pre" = 3 ] && RC=1
if [ "$pre" = 3 ] || { [ "$DALI_READY" = 0 ] && [ "$DEVICE" != cpu ]; }; then
    DALI_OK=0
else
    DALI_OK=1
fi

# 4. DALI checks; decode_mode's choice of decode_once goes on to the training step (and is kept in $PARTS,
#    on the machine, for a rerun of the training step alone).
DECODE_ONCE=$(cat "$PARTS/decode_once" 2>/dev/null || echo off)
if wants dali; then
    if [ "$DALI_OK" = 1 ]; then
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
        step dali 120 "$PY" -u bench/gpu_dali_bench.py --device "$DEVICE" --images 2000 --size 224 --batch 256 \
            --warmup 10 --steps 60 --threads 6 12 ${BENCH_ARGS:-}
        DECODE_ONCE=$("$PY" -c '
import json, sys
choice = "off"
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d.get("check") == "decode_mode" and "decode_once" in d:
        choice = "on" if d["decode_once"] else "off"
print(choice)' "$JSONL" 2>/dev/null || echo off)
        echo "$DECODE_ONCE" >"$PARTS/decode_once"
    else
        json_line dali false "skipped: DALI is not there (see stage_parts and preflight)"
    fi
fi

# 5. Training step: ResNet-50 1x, bf16 autocast, channels-last, DALI input (goal >= 2,500 pairs/s).
if wants train; then
    if [ "$DALI_OK" = 0 ]; then
        json_line train_step false "skipped: DALI is not there (see stage_parts and preflight)"
    elif [ "$DEVICE" = cpu ]; then
        step train_step 75 "$PY" -u bench/gpu_train_bench.py --device cpu --depth 18 --size 32 --batch 8 --steps 2 \
            --warmup 1 --images 32 --threads 2 --decode-once "$DECODE_ONCE"
    else
        step train_step 75 "$PY" -u bench/gpu_train_bench.py --device "$DEVICE" --batch 256 --warmup 5 --steps 30 \
            --threads 12 --decode-once "$DECODE_ONCE"
    fi
fi

# 6. The evaluation job (no DALI): feature extraction and fine-tune images/s, ResNet-50, bf16.
if wants eval; then
    if [ "$DEVICE" = cpu ]; then
        # shellcheck disable=SC2086
        step eval 120 "$PY" -u bench/gpu_eval_bench.py --cpu --small ${EVAL_ARGS:-}
    else
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=$DEVICE step eval 120 "$PY" -u bench/gpu_eval_bench.py ${EVAL_ARGS:-}
    fi
fi

"$PY" - "$JSONL" "$(($(date +%s) - T0))" "$RC" "$DECODE_ONCE" <<'EOF' | say
import json, sys
lines = [json.loads(x) for x in open(sys.argv[1])]
failed = sorted({d["check"] for d in lines if d.get("ok") is False})
print(json.dumps({"check": "done", "ok": int(sys.argv[3]) == 0 and not failed, "seconds": int(sys.argv[2]),
                  "decode_once": sys.argv[4] == "on", "lines": len(lines), "failed": failed}))
EOF
[ "$RC" = 0 ] && ! grep -q '"ok": false' "$JSONL" && exit 0
exit 1
