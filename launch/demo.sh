#!/usr/bin/env bash
# Demo placeholder: shard the bundled sample chest X-rays and inspect the result.
set -euo pipefail
cd "$(dirname "$0")/.."

# Start from an empty output so the inspect step only sees this run's shards.
rm -rf demo-out/shards
.venv/bin/medssl-shard build data/sample_cxr demo-out/shards \
  --manifest data/sample_cxr/metadata.csv --image-col path --patient-col patient_id \
  --label-cols finding --shard-size 2MB
.venv/bin/medssl-shard inspect demo-out/shards
