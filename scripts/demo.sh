#!/usr/bin/env bash
# The main job, as far as the project goes today: fetch SmolLM2-135M-Instruct, build the
# worker, and show its next-token predictions for a few facts of ROME's knowns dataset.
# (The distributed sweep, Parquet tables and Figure 2 plots come with the pipeline issues.)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
model=$(scripts/fetch-model.sh)
cargo build --release --locked -p worker
worker="$CARGO_TARGET_DIR/release/worker"

for prompt in \
  "Joseph Goebbels worked in the city of" \
  "Vinson Massif is located in the continent of" \
  "The Space Needle is located in the city of" \
  "Apple A5 was created by"; do
  echo "== $prompt"
  "$worker" predict --model "$model" --prompt "$prompt" --top-k 3
done
echo
echo "model: $model"
echo "try:   $worker predict --model $model --prompt 'Beats Music is owned by' --json"
