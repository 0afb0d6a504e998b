#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, build the worker and the coordinator, show the
# model's predictions for a few facts, sweep the facts this project ships
# (scripts/demo-facts.jsonl: facts SmolLM2 knows, in ROME's known_1000 format) with two
# local workers into Parquet tables, average them into Figure 2, and plot one fact's trace.
#
#   scripts/demo.sh [OUT]         (default OUT: demo-output)
#   CT_DEMO_FACTS=40              facts swept (the file has 69)
#   CT_DEMO_SAMPLES=3             noise samples per restored state (ROME: 10)
#   CT_DEMO_KNOWNS=FILE           another knowns file (e.g. ROME's known_1000.json)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
knowns="${CT_DEMO_KNOWNS:-scripts/demo-facts.jsonl}"
out="${1:-demo-output}"
facts="${CT_DEMO_FACTS:-40}"
samples="${CT_DEMO_SAMPLES:-3}"
model=$(scripts/fetch-model.sh)
cargo build --release --locked -p worker -p coordinator
worker="$CARGO_TARGET_DIR/release/worker"
coordinator="$CARGO_TARGET_DIR/release/coordinator"

for prompt in \
  "The Eiffel Tower is located in the city of" \
  "The capital of Japan is" \
  "The iPhone is produced by"; do
  echo "== $prompt"
  "$worker" predict --model "$model" --prompt "$prompt" --top-k 3
done

echo
echo "== sweep: $facts facts of $knowns, $samples noise samples (ROME: 10; set CT_DEMO_SAMPLES),"
echo "   s3 noise, window 10, 2 local workers; a few minutes on 2 cores"
sweep="demo-$facts-s$samples"
"$coordinator" run --knowns "$knowns" --model "$model" --out "$out/sweeps" \
  --local-workers 2 --limit "$facts" --samples "$samples" --sweep-id "$sweep"

echo
echo "== Figure 2 over the sweep's correctly predicted facts"
"$coordinator" aggregate --results "$out/sweeps/$sweep" --out "$out/figure2"

echo
echo "== causal trace of one fact (10 samples), with heatmaps"
"$worker" trace --model "$model" --prompt "The Eiffel Tower is located in the city of" \
  --subject "The Eiffel Tower" --expect Paris --noise-subjects "$knowns" --plot "$out" > /dev/null
echo
echo "tables:   $out/sweeps/$sweep/{facts,traces/kind=*,errors}/*.parquet, manifest.json"
echo "figure 2: $out/figure2/rollup_{hidden,mlp,attn}.{png,svg}, lines.{png,svg}, summary.parquet"
echo "one fact: $out/trace_{hidden,mlp,attn}.{png,svg}"
echo "duckdb:   duckdb -cmd \"SET VARIABLE results = '$out/sweeps/$sweep'\" -c \".read queries/ate.sql\""
