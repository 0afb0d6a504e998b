#!/usr/bin/env bash
# Fetches DuckDB's Python package (for the test that runs queries/*.sql against a real sweep)
# into the cache, without touching the system's Python: the wheel is downloaded and unpacked
# into its own folder, whose path is printed (use it as PYTHONPATH). Idempotent.
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail

version="2.0.1"
cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
target="$cache/python/duckdb-$version"

if ! PYTHONPATH="$target" python3 -c "import duckdb" 2>/dev/null; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "duckdb==$version" >&2
  rm -rf "$target" && mkdir -p "$target"
  # A wheel is a zip file of the package as it is installed: unpacking it is installing it.
  python3 - "$work"/duckdb-*.whl "$target" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  PYTHONPATH="$target" python3 -c "import duckdb" || { echo "fetch-duckdb: duckdb $version does not import" >&2; exit 1; }
fi
echo "$target"
