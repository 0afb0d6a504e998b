#!/usr/bin/env bash
# Builds the CUDA worker and trace-bench on a machine with no GPU and no CUDA toolkit, from
# NVIDIA's PyPI wheels, and copies them, stripped, into a folder to carry to a GPU machine.
#
#   scripts/build-cuda-worker.sh [OUT_DIR]      # default: .cuda-bin (ignored by git): *.xz
#
# Why each step:
# - nvcc, NVVM (its cicc), CCCL (its headers), the runtime, cuBLAS, cuRAND and NVRTC come from PyPI pinned to CUDA 13.0: the
#   H100/H200 machines' driver (580) is CUDA 13.0, and cudarc 0.19 knows releases up to 13.1.
# - candle 0.11 links cudarc with `dynamic-linking`, so the linker wants libcuda.so, which
#   only a driver install has. A stub with the soname libcuda.so.1, defining every `cu*` name
#   in cuda.h, satisfies the link; at run time the GPU machine's driver library is loaded.
# - candle-kernels compiles its static kernels for one architecture: CUDA_COMPUTE_CAP=90 is
#   Hopper (H100, H200). Set it to build for another.
# - The binaries link libcudart.so.13, libcublas.so.13 and libcurand.so.10 by soname: on the
#   GPU machine, put PyTorch's `nvidia/cu13/lib` on LD_LIBRARY_PATH (scripts/gpu-bench.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.cuda-bin}
cache=${CT_CUDA_CACHE:-$HOME/.cache/causal-trace/cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/causal-trace/target}
mkdir -p "$cache/wheels" "$cache/x"

if [ ! -x "$cache/x/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$cache/wheels" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.5.25" \
    "nvidia-cuda-cccl==13.0.85" "nvidia-nvvm==13.0.88"
  for w in "$cache"/wheels/*.whl; do unzip -q -o "$w" -d "$cache/x"; done
fi
cuda="$cache/x/nvidia/cu13"
lib="$cuda/lib"

# Unversioned names for the linker's -l flags.
for so in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$lib"/lib$so.so.* 2>/dev/null | head -1 || true)
  [ -n "$real" ] && ln -sf "$(basename "$real")" "$lib/lib$so.so"
done
if [ ! -e "$lib/libcuda.so" ]; then
  grep -o '\bcu[A-Z][A-Za-z0-9_]*' "$cuda/include/cuda.h" | sort -u \
    | awk '{ printf "void %s(void) {}\n", $1 }' > "$cache/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$cache/cuda_stub.c"
fi

export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release -p worker --features cuda --bin worker --bin trace-bench
# The coordinator needs no CUDA (nor candle): the GPU script runs whole sweeps with it.
cargo build --release -p coordinator --bin coordinator

# Stripped, each is still ~70 MB (candle's kernels, PTX and Hopper cubins, are embedded);
# xz makes it ~12 MB, so both fit a device call. scripts/gpu-bench.sh unpacks them.
mkdir -p "$out"
rm -f "$out"/*
for b in worker trace-bench coordinator; do
  strip -o "$out/$b" "$CARGO_TARGET_DIR/release/$b"
  xz -T2 -6 "$out/$b"
done
ls -la "$out"
