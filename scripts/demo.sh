#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct, build the worker and the coordinator, show the
# model's predictions for a few facts, sweep the facts this project ships
# (scripts/demo-facts.jsonl: facts SmolLM2 knows, in ROME's known_1000 format) with two
# local workers into Parquet tables, average them into Figure 2, plot one fact's trace, and
# ask DuckDB for the headline numbers. Each long step says first how long it should take.
#
#   scripts/demo.sh [OUT]         (default OUT: demo-output)
#   CT_DEMO_FACTS=N               facts swept (the file has 69; default: 16 per core, so that
#                                 the sweep takes about 3 minutes on any machine)
#   CT_DEMO_SAMPLES=3             noise samples per restored state (ROME: 10)
#   CT_DEMO_KNOWNS=FILE           another knowns file (e.g. ROME's known_1000.json)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
knowns="${CT_DEMO_KNOWNS:-scripts/demo-facts.jsonl}"
out="${1:-demo-output}"
cores=$(nproc 2>/dev/null || echo 2)
facts="${CT_DEMO_FACTS:-$((16 * cores))}"
# The shipped file has 69 facts.
if [ "$knowns" = scripts/demo-facts.jsonl ] && [ "$facts" -gt 69 ]; then facts=69; fi
samples="${CT_DEMO_SAMPLES:-3}"
model=$(scripts/fetch-model.sh)
duckdb_bin=$(scripts/fetch-duckdb-cli.sh)
if [ ! -x "$CARGO_TARGET_DIR/release/worker" ] || [ ! -x "$CARGO_TARGET_DIR/release/coordinator" ]; then
  echo "== building the worker and the coordinator (a first build takes ~$((12 / cores)) minutes on $cores cores)"
fi
cargo build --release --locked -p worker -p coordinator --bin worker --bin coordinator
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
# About 8 s of one core per fact at 3 samples (2-core AMD EPYC, 2026-11-30: 32 facts in
# 131 s on 2 workers), in proportion to the samples (+1 for the clean run's share).
estimate=$((facts * 8 * (samples + 1) / 4 / cores + 10))
echo "== sweep: $facts facts of $knowns, $samples noise samples (ROME: 10; set CT_DEMO_SAMPLES),"
echo "   s3 noise, window 10, $cores local workers of 1 thread; about $((estimate / 60)) min $((estimate % 60)) s"
sweep="demo-$facts-s$samples"
"$coordinator" run --knowns "$knowns" --model "$model" --out "$out/sweeps" \
  --local-workers "$cores" --worker-threads 1 --limit "$facts" --samples "$samples" \
  --sweep-id "$sweep"

echo
echo "== Figure 2 over the sweep's correctly predicted facts"
"$coordinator" aggregate --results "$out/sweeps/$sweep" --out "$out/figure2"

echo
echo "== causal trace of one fact (10 samples), with heatmaps"
"$worker" trace --model "$model" --prompt "The Eiffel Tower is located in the city of" \
  --subject "The Eiffel Tower" --expect Paris --noise-subjects "$knowns" --plot "$out" > /dev/null
echo
echo "open first: $out/figure2/report.html (settings, headline, Figure 2, relations, facts)"
echo "tables:   $out/sweeps/$sweep/{facts,traces/kind=*,errors}/*.parquet, manifest.json"
echo "figure 2: $out/figure2/rollup_{hidden,mlp,attn}.{png,svg}, lines.{png,svg}, summary.parquet"
echo "one fact: $out/trace_{hidden,mlp,attn}.{png,svg}"
echo
echo "== DuckDB over the tables: the headline numbers (queries/ate.sql)"
"$duckdb_bin/duckdb" -cmd "SET VARIABLE results = '$out/sweeps/$sweep'" -c ".read queries/ate.sql"
echo "duckdb:   export PATH=\"$duckdb_bin:\$PATH\"   # then, e.g.:"
echo "          duckdb -cmd \"SET VARIABLE results = '$out/sweeps/$sweep'\" -c \".read queries/rollup.sql\""
