#!/usr/bin/env bash
# The main job, as far as the project goes today: fetch SmolLM2-135M-Instruct, build the
# worker and the coordinator, show the model's predictions for a few facts, run a sweep over
# the first facts of ROME's knowns dataset with two local workers (ROME's settings; Parquet
# tables under demo-output/sweeps/), average it into Figure 2 (demo-output/figure2/), and
# plot the causal trace of one fact.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
knowns="${CT_KNOWNS:-../shared/data/known_1000.json}"
out="${1:-demo-output}"
facts="${CT_DEMO_FACTS:-24}"
model=$(scripts/fetch-model.sh)
cargo build --release --locked -p worker -p coordinator
worker="$CARGO_TARGET_DIR/release/worker"
coordinator="$CARGO_TARGET_DIR/release/coordinator"

for prompt in \
  "Joseph Goebbels worked in the city of" \
  "Vinson Massif is located in the continent of" \
  "Apple A5 was created by"; do
  echo "== $prompt"
  "$worker" predict --model "$model" --prompt "$prompt" --top-k 3
done

echo
echo "== sweep: the first $facts facts, 2 local workers, 10 samples, s3 noise, window 10"
echo "   (facts the model does not predict are recorded, not traced; a few minutes on 2 cores)"
sweep="demo-$facts"
"$coordinator" run --knowns "$knowns" --model "$model" --out "$out/sweeps" \
  --local-workers 2 --limit "$facts" --sweep-id "$sweep"

echo
echo "== Figure 2 over the sweep's correctly predicted facts (few facts: expect wide bands)"
"$coordinator" aggregate --results "$out/sweeps/$sweep" --out "$out/figure2"

echo
echo "== causal trace of one fact, with heatmaps"
"$worker" trace --model "$model" --prompt "Joseph Goebbels worked in the city of" \
  --subject "Joseph Goebbels" --expect Berlin --noise-subjects "$knowns" --plot "$out" > /dev/null
echo "heatmaps: $out/trace_{hidden,mlp,attn}.{png,svg}"
echo "tables:   $out/sweeps/$sweep/{facts,traces/kind=*,errors}/*.parquet, manifest.json"
echo "figure 2: $out/figure2/rollup_{hidden,mlp,attn}.{png,svg}, lines.{png,svg}, summary.parquet"
echo "duckdb:   duckdb -cmd \"SET VARIABLE results = '$out/sweeps/$sweep'\" -c \".read queries/ate.sql\""
echo "model:    $model"
