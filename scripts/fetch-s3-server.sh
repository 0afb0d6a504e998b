#!/usr/bin/env bash
# Installs s3s-fs (an S3 server over a folder, from crates.io) into the cache for the test
# that runs a sweep against real S3, and prints the binary's path. Idempotent; the first
# run compiles it (a few minutes on 2 cores).
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail

version="0.14.1"   # 0.17 needs a newer rustc than the machines have
cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
root="$cache/tools/s3s-fs-$version"
if [ ! -x "$root/bin/s3s-fs" ]; then
  # Its own build folder, not the project's: nothing of it mixes with our target.
  env -u CARGO_TARGET_DIR cargo install --quiet --locked --features binary \
    --version "$version" --root "$root" s3s-fs >&2
fi
echo "$root/bin/s3s-fs"
