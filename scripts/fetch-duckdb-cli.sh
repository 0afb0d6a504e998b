#!/usr/bin/env bash
# Fetches the DuckDB command-line shell and its httpfs extension (to read sweeps from S3)
# from PyPI into the cache, and prints a folder holding a `duckdb` wrapper: put it on PATH and
# the README's `duckdb ...` commands work as written. Idempotent.
#
#   export PATH="$(scripts/fetch-duckdb-cli.sh):$PATH"
#   duckdb -cmd "SET VARIABLE results = 'demo-output/sweeps/demo-40-s3'" -c ".read queries/ate.sql"
#
# Why a wrapper: an extension must match the shell's version exactly, and DuckDB would
# otherwise autoload or install httpfs from the network on the first s3:// path. The wrapper
# turns autoloading off and loads the pinned httpfs from its file. Reading S3 also needs a
# secret, e.g. -cmd "CREATE SECRET (TYPE s3, PROVIDER credential_chain)".
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail

version="1.5.5"
cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
target="$cache/duckdb-cli-$version"

if ! "$target/bin/duckdb" -c "SELECT 1" >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" \
    "duckdb-cli==$version" "duckdb-extension-httpfs==$version" >&2
  rm -rf "$target" && mkdir -p "$target/bin"
  python3 - "$work" "$target" "$version" <<'PY'
import glob, shutil, sys, zipfile
work, target, version = sys.argv[1:]
with zipfile.ZipFile(glob.glob(f"{work}/duckdb_cli-*.whl")[0]) as w, \
        w.open("duckdb_cli/duckdb") as src, open(f"{target}/duckdb", "wb") as dst:
    shutil.copyfileobj(src, dst)
name = f"duckdb_extension_httpfs/extensions/v{version}/httpfs.duckdb_extension"
with zipfile.ZipFile(glob.glob(f"{work}/duckdb_extension_httpfs-*.whl")[0]) as w, \
        w.open(name) as src, open(f"{target}/httpfs.duckdb_extension", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$target/duckdb"
  cat > "$target/bin/duckdb" <<SH
#!/bin/sh
# DuckDB $version with its httpfs extension loaded from the cache and autoloading off
# (scripts/fetch-duckdb-cli.sh).
exec "$target/duckdb" -cmd "SET autoinstall_known_extensions = false" \\
  -cmd "SET autoload_known_extensions = false" \\
  -cmd "LOAD '$target/httpfs.duckdb_extension'" "\$@"
SH
  chmod +x "$target/bin/duckdb"
  "$target/bin/duckdb" -c "SELECT 1" >/dev/null || {
    echo "fetch-duckdb-cli: duckdb $version does not run" >&2
    exit 1
  }
fi
echo "$target/bin"
