#!/usr/bin/env bash
# Prints the path of ROME's knowns dataset, known_1000.json (1209 facts), for the tests, the
# demo and the figure scripts; never copies it into the repository. In order:
#   1. $CT_KNOWNS, if set (a file that must exist);
#   2. ../shared/data/known_1000.json beside the checkout, where this project's CI has it;
#   3. a copy in the cache, downloaded once from its canonical URL and checked by sha256.
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail
cd "$(dirname "$0")/.."

url="https://rome.baulab.info/data/dsets/known_1000.json"
sha256="61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"
cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
target="$cache/data/known_1000.json"

verified() { [ -f "$1" ] && echo "$sha256  $1" | sha256sum --check --status; }

if [ -n "${CT_KNOWNS:-}" ]; then
  [ -f "$CT_KNOWNS" ] || { echo "fetch-knowns: CT_KNOWNS=$CT_KNOWNS is not a file" >&2; exit 1; }
  echo "$CT_KNOWNS"
  exit 0
fi
beside="$(cd .. && pwd)/shared/data/known_1000.json"
if [ -f "$beside" ]; then
  echo "$beside"
  exit 0
fi
if ! verified "$target"; then
  mkdir -p "$(dirname "$target")"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "fetch-knowns: downloading $url" >&2
  python3 - "$url" "$work/known_1000.json" <<'PY'
import shutil, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=60) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
except OSError as e:
    sys.exit(f"fetch-knowns: cannot download {sys.argv[1]} ({e}); set CT_KNOWNS to a copy")
PY
  verified "$work/known_1000.json" || {
    echo "fetch-knowns: $url does not have sha256 $sha256" >&2
    exit 1
  }
  mv "$work/known_1000.json" "$target"
fi
echo "$target"
