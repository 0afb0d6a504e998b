#!/usr/bin/env bash
# The main job, as far as the project goes today: fetch SmolLM2-135M-Instruct, build the
# worker, show its predictions for a few facts of ROME's knowns dataset, and causal-trace one
# of them with ROME's settings into heatmaps. (The distributed sweep, Parquet tables and the
# averaged Figure 2 come with the pipeline issues.)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
knowns="${CT_KNOWNS:-../shared/data/known_1000.json}"
out="${1:-demo-output}"
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
echo "== causal trace (10 samples, s3 noise, window 10; about a minute on 2 cores)"
"$worker" trace --model "$model" --prompt "Joseph Goebbels worked in the city of" \
  --subject "Joseph Goebbels" --expect Berlin --noise-subjects "$knowns" --plot "$out"
echo
echo "heatmaps: $out/trace_{hidden,mlp,attn}.{png,svg}"
echo "model:    $model"
echo "try:      $worker trace --model $model --prompt 'Beats Music is owned by' --subject 'Beats Music' --noise 0.35 --json"
