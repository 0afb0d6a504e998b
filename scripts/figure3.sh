#!/usr/bin/env bash
# The runs behind docs/results.md's Figure 3 and per-head maps, on SmolLM2-135M-Instruct over
# ROME's known_1000.json (each a scripts/figure2.sh run with another experiment; resumable):
#
# - Figure 3 as ROME's notebook computes it: the first 1000 facts, every one traced with the
#   model's own answer (--correctness none), the last subject token only, the ordinary run
#   and the MLP- and attention-severed runs, averaged over every fact (--facts all). About
#   70 minutes on 2 CPU cores.
# - The per-head maps: restoring each attention head at the last subject token and at the last
#   token, over the facts the model predicts. About 90 minutes on 2 CPU cores.
#
#   scripts/figure3.sh [FIGURES_DIR]   (default: docs/figure3: every fact; FIGURES_DIR/correct:
#                                       the facts the model predicts; FIGURES_DIR/heads: the maps)
#   The CT_FIGURE2_* variables of scripts/figure2.sh apply (device, workers, output).
set -euo pipefail
cd "$(dirname "$0")/.."

figures="${1:-docs/figure3}"
severed="--kinds hidden,severed_mlp,severed_attn --tokens last-subject --correctness none --limit 1000"
CT_SWEEP_FLAGS="$severed" CT_AGGREGATE_FLAGS="--facts all" scripts/figure2.sh "$figures"
# The same sweep again is finished at once; only the averages differ.
CT_SWEEP_FLAGS="$severed" scripts/figure2.sh "$figures/correct"
CT_SWEEP_FLAGS="--kinds head --tokens last-subject,last" scripts/figure2.sh "$figures/heads"
