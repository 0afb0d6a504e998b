#!/usr/bin/env bash
# Every GPU measurement of issue 15 in one call on a GPU machine, ROME's own code side by side
# (docs/performance.md, "On a GPU"). Each step has its own time limit, so one that hangs or
# fails costs its limit and the rest still run; every figure is written under $OUT as it comes.
#
# On the machine with no GPU, beforehand:
#   scripts/build-cuda-worker.sh          # .cuda-bin/{worker,trace-bench}.xz
#   scripts/gpu-stage.sh                  # .gpu/: knowns, GPT-2's vocabulary, the model in parts
# and the gguf wheel in .whl/ (the GPU machine's PyTorch has no `gguf`; ROME's code loads the
# GGUF through transformers). Then, on the GPU machine, in the checkout: scripts/gpu-bench.sh [smoke]
# (`smoke` checks the tool chain on a tiny random model, before the real model is staged.)
#
# The GPU machine needs PyTorch and transformers (ROME's code, and the random GPT-2 XL), and
# PyTorch's CUDA 13 libraries (cuBLAS, cuRAND, NVRTC), which the worker links by soname.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
# A device call brings back at most 8 files: the log, nvidia-smi's trace, and one archive
# of every result, remade after each step so that a run cut short still returns its part.
res=/tmp/gpu-results
mkdir -p "$out" "$res"
exec > >(tee -a "$out/log.txt") 2>&1
t0=$(date +%s)
deadline=${CT_GPU_DEADLINE:-560} # seconds for the whole script: the device call's limit, less a margin
export PYTHONUNBUFFERED=1 RUST_LOG=${RUST_LOG:-warn}

step() {
  local name=$1 limit=$2 left=$((deadline - $(date +%s) + t0))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then echo "=== $name skipped: out of time"; return; fi
  echo "=== $name (limit ${limit}s, at $(($(date +%s) - t0))s)"
  timeout "$limit" "$@"
  echo "=== $name rc=$? at $(($(date +%s) - t0))s"
  tar -czf "$out/results.tar.gz" -C "$res" . 2>/dev/null
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
site=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
libs=$(ls -d "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$libs$PWD/.gpu/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
lscpu | grep -E 'Model name|^CPU\(s\)'

mkdir -p /tmp/bin
for f in .cuda-bin/*.xz; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "/tmp/bin/$(basename "$f" .xz)"
done
chmod +x /tmp/bin/*
ldd /tmp/bin/worker | grep -E 'not found|cublas|curand|cudart|libcuda' || true
tb=/tmp/bin/trace-bench
w=/tmp/bin/worker
k=.gpu/known_1000.json
rome=(--rome-python python3)

if [ "${1:-}" = smoke ]; then
  # The tool chain on a tiny random GPT-2, before the model is staged: the worker runs on
  # CUDA, and trace-bench drives ROME's code there.
  step tiny-make 60 python3 tools/random_model.py --shape gpt2-tiny --vocab-dir .gpu/vocab --out /tmp/tiny --device cuda
  step tiny-predict 30 $w predict --model /tmp/tiny --device cuda --prompt "The Eiffel Tower is located in the city of"
  step tiny-bench 60 $tb --model /tmp/tiny --device cuda --knowns $k --correctness none --facts 1 "${rome[@]}"
  exit 0
fi

model=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/models
cat .gpu/smollm2.gguf.part-* > "$model"
sha256sum "$model"
ids=6,7,15,21,78
smol=(--model "$model" --device cuda --knowns "$k")
nvidia-smi dmon -s um -d 5 > "$out/dmon.txt" 2>&1 &

step smoke 60 $w predict --model "$model" --device cuda --prompt "The Eiffel Tower is located in the city of"
# The known_1000 Figure-2 sweep end to end (all 1209 facts; the correctly predicted ones
# traced at the paper's settings), one local CUDA worker, all tokens of a fact per batch:
# the time goes to the log, the aggregate's headline and the sweep's facts and traces
# (to compare with a CPU sweep off the machine) into the archive.
c=/tmp/bin/coordinator
sweep() { # name, limit, extra flags
  local name=$1 limit=$2
  shift 2
  step "sweep-$name" "$limit" $c run --knowns $k --model "$model" --out /tmp/sweeps \
    --local-workers 1 --worker-device cuda --worker-bin $w --sweep-id "gpu-$name" "$@"
  step "aggregate-$name" 30 $c aggregate --results "/tmp/sweeps/gpu-$name" --out "$res/sweep-$name"
  cp -r "/tmp/sweeps/gpu-$name" "$res/sweep-$name/tables" 2>/dev/null
}
sweep f32 200
# SmolLM2 at the paper's settings: ours and ROME's per fact at f32, TF32 and bf16.
step smol-f32 200 $tb "${smol[@]}" --known-ids $ids --facts 5 --fast-only "${rome[@]}" --json-out "$res/smol-f32.jsonl"
step smol-tf32 100 $tb "${smol[@]}" --tf32 --known-ids $ids --facts 3 --fast-only "${rome[@]}" --json-out "$res/smol-tf32.jsonl"
step smol-bf16 100 $tb "${smol[@]}" --dtype bf16 --known-ids $ids --facts 3 --fast-only "${rome[@]}" --json-out "$res/smol-bf16.jsonl"
sweep bf16 120 --dtype bf16
# Naive against fast on CUDA on a traced fact.
step smol-naive 90 $tb "${smol[@]}" --known-ids 21 --facts 1 --no-rome --json-out "$res/smol-naive.jsonl"
# Whole tables, compared with the CPU's off the machine.
step trace-f32 40 sh -c "$w trace --model $model --device cuda --knowns $k --known-id 6 --json > $res/trace6-f32.json"
step trace-tf32 40 sh -c "$w trace --model $model --device cuda --tf32 --knowns $k --known-id 6 --json > $res/trace6-tf32.json"
step trace-bf16 40 sh -c "$w trace --model $model --device cuda --dtype bf16 --knowns $k --known-id 6 --json > $res/trace6-bf16.json"
# A GPT-2 XL-shaped model (ROME's shape), random weights drawn here; it predicts nothing,
# so every fact is traced (--correctness none), both by us and by ROME's code.
step gpt2xl-make 120 python3 tools/random_model.py --shape gpt2-xl --vocab-dir .gpu/vocab --out /tmp/gpt2-xl --device cuda
xl=(--model /tmp/gpt2-xl --device cuda --knowns "$k" --correctness none --fast-only)
step gpt2xl-f32 150 $tb "${xl[@]}" --facts 2 "${rome[@]}" --json-out "$res/gpt2xl-f32.jsonl"
step gpt2xl-tf32 100 $tb "${xl[@]}" --tf32 --facts 2 "${rome[@]}" --json-out "$res/gpt2xl-tf32.jsonl"
step gpt2xl-bf16 80 $tb "${xl[@]}" --dtype bf16 --facts 2 --no-rome --json-out "$res/gpt2xl-bf16.jsonl"
kill %1 2>/dev/null
echo "done at $(($(date +%s) - t0))s"
