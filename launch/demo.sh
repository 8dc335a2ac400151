#!/usr/bin/env bash
# The demo on the chest x-ray sample that ships in data/sample_cxr: shard it by patient, verify the
# shards, and show what they hold. (Pretraining joins here once the trainer exists.)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=demo-out/shards
rm -rf "$OUT"  # a fresh build each time; a rerun on the same OUTPUT would resume instead
.venv/bin/medssl-shard build data/sample_cxr "$OUT" \
  --manifest data/sample_cxr/metadata.csv --image-col path --patient-col patient_id \
  --label-cols finding --max-side 256 --shard-size 1MB
.venv/bin/medssl-shard verify "$OUT"
.venv/bin/medssl-shard inspect "$OUT"
