#!/usr/bin/env bash
# The paper's recipe end to end on the chest x-ray sample that ships in data/sample_cxr, in one run folder
# (runs/demo), on a laptop-class machine in minutes:
#   -  shards: the sample packed by patient (medssl-shard build, verify, inspect), 70% of the patients for
#      pretraining, 30% held out as `val`, labelled by finding and view (the monitor's and the study's labels);
#   1. simclr: SimCLR pretraining (one image, two views), labels unused;
#   2. micle: MICLe pretraining (two images of one patient) initialized from the SimCLR encoder;
#      both stages run configs/debug_cpu.yaml through the real deepspeed launcher (2 CPU processes with gloo
#      where there is no GPU, the GPU where there is one), with its kNN monitor on the held-out patients;
#   3. study: the label-efficiency study (configs/study_demo.yaml: a linear probe at half and all of the
#      training patients, 2 seeds, random init against both encoders);
# then a table of what each stage wrote and measured (launch/demo_report.py).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=runs/demo
SHARDS=$RUN/shards
rm -rf "$RUN" demo-out  # a fresh demo each time; reruns of the same folders would resume instead
mkdir -p "$RUN"
TIMES=$RUN/stage_seconds.txt
stage() { echo "$1 $(( $(date +%s) - $2 ))" >> "$TIMES"; }

t=$(date +%s)
.venv/bin/medssl-shard build data/sample_cxr "$SHARDS" \
  --manifest data/sample_cxr/metadata.csv --image-col path --patient-col patient_id \
  --label-cols finding,view --splits train=0.7,val=0.3 --max-side 256 --shard-size 1MB
.venv/bin/medssl-shard verify "$SHARDS"
.venv/bin/medssl-shard inspect "$SHARDS"
stage shards "$t"

# A free rendezvous port (29500, the launcher's default, unless another job holds it).
PORT=$(.venv/bin/python -c "from medssl_scale.distributed.launch import free_port; print(free_port(29500))")
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LAUNCH=(.venv/bin/deepspeed --num_gpus 1 --master_port "$PORT")
else
  # Each process sets its own CPU thread count (cores / processes) when OMP_NUM_THREADS is unset.
  export DS_ACCELERATOR=cpu
  LAUNCH=(.venv/bin/deepspeed --num_gpus 2 --master_port "$PORT")
fi

pretrain() {  # stage name, then config overrides
  local name=$1
  shift
  local args=(launch/pretrain.py --config configs/debug_cpu.yaml run_dir="$RUN/$name" data.shards="$SHARDS"
              monitor.shards="$SHARDS" "$@")
  local t status=0
  t=$(date +%s)
  # Ctrl-C from here on reaches every process of the group; the training processes checkpoint and exit.
  # Ignoring it in this shell (and so in the deepspeed command and the stderr filter, which inherit that)
  # keeps the filter alive while they write their last line, and the deepspeed command waiting for them.
  trap '' INT
  "${LAUNCH[@]}" "${args[@]}" 2> >(grep -v -e "cpp_extension.py" -e "^\[rank" -e "No CUDA runtime" >&2) || status=$?
  trap - INT
  if [ "$status" -ne 0 ]; then
    # A rerun of the demo starts afresh; the same launch line by hand resumes from the last checkpoint.
    echo "demo: $name stopped (deepspeed exit status $status); to resume:" \
      "${DS_ACCELERATOR:+DS_ACCELERATOR=$DS_ACCELERATOR }${LAUNCH[*]} ${args[*]}" >&2
    exit "$status"
  fi
  stage "$name" "$t"
  # Loss, learning rate, throughput, the kNN monitor and the collapse statistics over steps, as one picture.
  .venv/bin/medssl-plot "$RUN/$name"
}

pretrain simclr data.mode=simclr
pretrain micle data.mode=micle model.init_encoder="$RUN/simclr/encoder.pt"
.venv/bin/medssl-plot "$RUN/simclr" "$RUN/micle" --out "$RUN/pretraining.png"

t=$(date +%s)
.venv/bin/python launch/study.py --config configs/study_demo.yaml
stage study "$t"

.venv/bin/python launch/demo_report.py "$RUN"
