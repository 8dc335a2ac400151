#!/usr/bin/env bash
# The main job on the chest x-ray sample that ships in data/sample_cxr:
#   1. shard it by patient (medssl-shard build, verify, inspect): 70% of the patients for pretraining, 30%
#      held out as `val`, the labelled images the kNN monitor scores (by view),
#   2. MICLe-pretrain a small ResNet on it with the debug config through the real deepspeed launcher
#      (2 CPU processes with gloo where there is no GPU), writing runs/demo/metrics.jsonl,
#   3. export runs/demo/encoder.pt and print a summary of what ran and what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=demo-out/shards
RUN=runs/demo
rm -rf "$OUT" "$RUN"  # a fresh demo each time; reruns of the same folders would resume instead
.venv/bin/medssl-shard build data/sample_cxr "$OUT" \
  --manifest data/sample_cxr/metadata.csv --image-col path --patient-col patient_id \
  --label-cols finding,view --splits train=0.7,val=0.3 --max-side 256 --shard-size 1MB
.venv/bin/medssl-shard verify "$OUT"
.venv/bin/medssl-shard inspect "$OUT"

# A free rendezvous port (29500, the launcher's default, unless another job holds it).
PORT=$(.venv/bin/python -c "from medssl_scale.distributed.launch import free_port; print(free_port(29500))")
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LAUNCH=(.venv/bin/deepspeed --num_gpus 1 --master_port "$PORT")
else
  # Each process sets its own CPU thread count (cores / processes) when OMP_NUM_THREADS is unset.
  export DS_ACCELERATOR=cpu
  LAUNCH=(.venv/bin/deepspeed --num_gpus 2 --master_port "$PORT")
fi
# Ctrl-C from here on reaches every process of the group; the training processes checkpoint and exit.
# Ignoring it in this shell (and so in the deepspeed command and the stderr filter, which inherit that) keeps
# the filter alive while they write their last line, and the deepspeed command waiting for them.
trap '' INT
status=0
"${LAUNCH[@]}" launch/pretrain.py --config configs/debug_cpu.yaml run_dir="$RUN" data.shards="$OUT" \
  2> >(grep -v -e "cpp_extension.py" -e "^\[rank" -e "No CUDA runtime" >&2) || status=$?
trap - INT
if [ "$status" -ne 0 ]; then
  # A rerun of the demo starts afresh; the same launch line by hand resumes from the last checkpoint.
  echo "demo: training stopped (deepspeed exit status $status); to resume: ${DS_ACCELERATOR:+DS_ACCELERATOR=$DS_ACCELERATOR }${LAUNCH[*]}" \
    "launch/pretrain.py --config configs/debug_cpu.yaml run_dir=$RUN data.shards=$OUT" >&2
  exit "$status"
fi
.venv/bin/python -c "import torch; e = torch.load('$RUN/encoder.pt', weights_only=True); sd, a = e['state_dict'], e['arch']; \
print(f'encoder.pt: ResNet-{a[\"depth\"]} width {a[\"width\"]}, {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values, loads with weights_only=True')"
# Loss, learning rate, throughput, the kNN monitor and the collapse statistics over steps, as one picture.
.venv/bin/medssl-plot "$RUN"
