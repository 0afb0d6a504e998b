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
ls -la .gpu .whl
