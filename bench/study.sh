#!/usr/bin/env bash
# The paper's recipe on real data, sized for about 40 minutes on 2 CPU cores (docs/results.md):
#   1. shards of ../shared/data: ham10000_subset (one lesion = one patient, 7 diagnoses in `dx`, 70/15/15 by
#      lesion) and covid_cxr (by patient, 90/10);
#   2. SimCLR on the HAM training images (labels unused), with the kNN monitor on HAM's val lesions;
#   3. MICLe on the covid_cxr patients, initialized from the SimCLR encoder (monitor still on HAM);
#   4. the label-efficiency study (bench/study/study_ham.yaml): linear probe on HAM's 7 classes at 1%, 10%
#      and 100% of the training lesions, 3 seeds, random init against both encoders.
# Both pretraining stages run configs/debug_cpu.yaml's recipe (ResNet-18, LARS with square-root scaling)
# through the real deepspeed launcher on 2 CPU processes, at 64 px, global batch 64.
#
#   bash bench/study.sh                  # everything, into runs/results (reruns resume: shards and finished
#                                        # stages are kept, the study skips finished cells)
#   SIMCLR_STEPS=400 MICLE_STEPS=150 bash bench/study.sh   # a 16-minute version (same stages, shorter pretraining)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT_DIR:-runs/results}
SIMCLR_STEPS=${SIMCLR_STEPS:-1200}
MICLE_STEPS=${MICLE_STEPS:-300}
mkdir -p "$OUT"
TIMES=$OUT/stage_seconds.txt
stage() { echo "$1 $(( $(date +%s) - $2 ))" >> "$TIMES"; }
[ -d "$DATA/ham10000_subset" ] && [ -d "$DATA/covid_cxr" ] || { echo "bench/study.sh: $DATA/ham10000_subset and $DATA/covid_cxr are needed (set DATA=...)" >&2; exit 2; }

t=$(date +%s)
[ -f "$OUT/ham-shards/manifest.json" ] || .venv/bin/medssl-shard build "$DATA/ham10000_subset" "$OUT/ham-shards" \
  --manifest "$DATA/ham10000_subset/metadata.csv" --image-col path --patient-col lesion_id --label-cols dx \
  --splits train=0.7,val=0.15,test=0.15 --max-side 96 --quiet
[ -f "$OUT/cxr-shards/manifest.json" ] || .venv/bin/medssl-shard build "$DATA/covid_cxr" "$OUT/cxr-shards" \
  --manifest "$DATA/covid_cxr/metadata.csv" --image-col path --patient-col patient_id --label-cols finding \
  --splits train=0.9,val=0.1 --max-side 96 --quiet
stage shards "$t"

export DS_ACCELERATOR=cpu
PORT=$(.venv/bin/python -c "from medssl_scale.distributed.launch import free_port; print(free_port(29500))")
COMMON=(model.small_input=false train.global_batch=64 train.log_every=5 train.checkpoint_every=100
        monitor.shards="$OUT/ham-shards" "monitor.task={column: dx}" monitor.max_images=1000 monitor.every=100
        monitor.workers=1 data.workers=1)
pretrain() {  # stage name, then overrides
  local name=$1 t
  shift
  t=$(date +%s)
  .venv/bin/deepspeed --num_gpus 2 --master_port "$PORT" launch/pretrain.py --config configs/debug_cpu.yaml \
    run_dir="$OUT/$name" "${COMMON[@]}" "$@" 2> >(grep -v -e "cpp_extension.py" -e "^\[rank" -e "No CUDA runtime" >&2)
  stage "$name" "$t"
  .venv/bin/medssl-plot "$OUT/$name"
}
# Skin lesions: the dermatology preset (SimCLR's colour distortion, any rotation), at 64 px.
[ -f "$OUT/simclr/encoder.pt" ] || pretrain simclr data.mode=simclr data.shards="$OUT/ham-shards" \
  "augment={preset: dermatology, size: 64}" train.steps="$SIMCLR_STEPS"
# Chest x-rays: the chest_xray preset, two images of one patient, from the SimCLR encoder.
[ -f "$OUT/micle/encoder.pt" ] || pretrain micle data.mode=micle data.shards="$OUT/cxr-shards" \
  "augment={preset: chest_xray, size: 64}" model.init_encoder="$OUT/simclr/encoder.pt" train.steps="$MICLE_STEPS"
.venv/bin/medssl-plot "$OUT/simclr" "$OUT/micle" --out "$OUT/pretraining.png"

t=$(date +%s)
.venv/bin/python launch/study.py --config bench/study/study_ham.yaml study_dir="$OUT/study" \
  base.overrides.data.shards="$OUT/ham-shards" inits.simclr="$OUT/simclr/encoder.pt" inits.micle="$OUT/micle/encoder.pt"
stage study "$t"
cat "$OUT/study/summary.md"
