#!/usr/bin/env bash
# Stages what scripts/gpu-bench.sh reads into .gpu/ (ignored by git), small enough to carry:
# a device call carries 64 MiB with the checkout, and SmolLM2's GGUF alone is 94 MiB, so the
# model goes in parts (carry `.gpu/smollm2.gguf.part-aa` in one call and the rest in the next,
# while the machine is warm; files carried earlier stay there).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cp "$(scripts/fetch-knowns.sh)" .gpu/known_1000.json
rm -rf .gpu/vocab && cp -r "$(scripts/fetch-gpt2-vocab.sh)" .gpu/vocab
rm -f .gpu/smollm2.gguf.part-*
split -b 44M "$(scripts/fetch-model.sh)" .gpu/smollm2.gguf.part-
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
# The GPU machine's image lacks the libraries plotters links (fontconfig, freetype and theirs):
# carry this machine's copies (scripts/gpu-bench.sh puts .gpu/lib on LD_LIBRARY_PATH).
if [ -f .cuda-bin/worker.xz ]; then
  rm -rf .gpu/lib && mkdir -p .gpu/lib
  xz -dc .cuda-bin/worker.xz > .gpu/worker.tmp && chmod +x .gpu/worker.tmp
  for lib in $(ldd .gpu/worker.tmp | awk '/fontconfig|freetype|png|expat|brotli|bz2|libz\./ {print $3}'); do
    cp -L "$lib" .gpu/lib/
  done
  rm -f .gpu/worker.tmp
fi
ls -la .gpu .gpu/lib .whl
# Carry in three calls while the machine stays warm (30 s):
#   1. .cuda-bin .gpu/vocab .gpu/known_1000.json .gpu/lib .whl .gpu/smollm2.gguf.part-ac
#      with `scripts/gpu-bench.sh smoke`;
#   2. .gpu/smollm2.gguf.part-aa;  3. .gpu/smollm2.gguf.part-ab with `scripts/gpu-bench.sh`.
