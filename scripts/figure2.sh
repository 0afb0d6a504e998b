#!/usr/bin/env bash
# The paper-scale run behind docs/results.md: SmolLM2-135M-Instruct on ROME's known_1000.json
# with the paper's settings (s3 noise, 10 samples, window 10, all kinds, facts the model
# predicts), then Figure 2. About 4 minutes on one H100 (4 CUDA workers), about 4 hours on 2
# CPU cores. Resumable: run it again after any interruption and it continues where it stopped.
#
#   scripts/figure2.sh [FIGURES_DIR]   (default: docs/figure2)
#   CT_KNOWNS=FILE          known_1000.json (default: scripts/fetch-knowns.sh finds or fetches it)
#   CT_FIGURE2_FACTS=N      only the first N facts (default: all 1209)
#   CT_FIGURE2_DEVICE=cuda  the workers' device (default: cpu; cuda needs a worker built
#                           with --features cuda, see deploy/docker/Dockerfile.worker-cuda)
#   CT_FIGURE2_WORKERS=4    local workers (default: 2; several may share one GPU)
#   CT_FIGURE2_MODEL=gemma3 the model (default: smollm2, SmolLM2-135M-Instruct; gemma3 is
#                           Gemma 3 270M, ~6x the cost a fact: hours on a GPU-less machine)
#   CT_FIGURE2_OUT=DIR      where the sweep's tables go (default: the cache)
#   CT_SWEEP_FLAGS="..."    more `coordinator run` flags (another experiment: scripts/figure3.sh)
#   CT_AGGREGATE_FLAGS=".." more `coordinator aggregate` flags (e.g. --facts all)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
knowns=$(scripts/fetch-knowns.sh)
device="${CT_FIGURE2_DEVICE:-cpu}"
workers="${CT_FIGURE2_WORKERS:-2}"
sweeps="${CT_FIGURE2_OUT:-${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}/figure2}"
figures="${1:-docs/figure2}"
limit=()
[ -n "${CT_FIGURE2_FACTS:-}" ] && limit=(--limit "$CT_FIGURE2_FACTS")
read -r -a sweep_flags <<< "${CT_SWEEP_FLAGS:-}"
read -r -a aggregate_flags <<< "${CT_AGGREGATE_FLAGS:-}"
features=()
[ "$device" != cpu ] && features=(--features cuda)
case "${CT_FIGURE2_MODEL:-smollm2}" in
  smollm2) model=$(scripts/fetch-model.sh) ;;
  gemma3) model=$(scripts/fetch-gemma3.sh) ;;
  *) echo "figure2.sh: CT_FIGURE2_MODEL must be smollm2 or gemma3" >&2; exit 2 ;;
esac
cargo build --release --locked -p worker "${features[@]}"
cargo build --release --locked -p coordinator
coordinator="$CARGO_TARGET_DIR/release/coordinator"

# The sweep id is the settings' digest: the same command finds and resumes the same sweep.
# Its summary (on stdout) starts with "sweep <id> ...".
id=$("$coordinator" run --knowns "$knowns" --model "$model" --out "$sweeps" \
  --local-workers "$workers" --worker-device "$device" "${limit[@]}" "${sweep_flags[@]}" \
  --flush-secs 60 | tee /dev/stderr | sed -n 's/^sweep \([^ ]*\) .*/\1/p' | head -1)
"$coordinator" aggregate --results "$sweeps/$id" --out "$figures" "${aggregate_flags[@]}"
