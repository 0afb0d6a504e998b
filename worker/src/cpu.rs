//! The host CPU's side of speed: which GEMM kernels candle's matmuls run, and the allocator
//! settings the engine's large, short-lived activations need.

// Not called directly: depending on gemm turns on its AVX-512 kernels for candle's matmuls
// (the `x86-v4` feature, see the workspace Cargo.toml).
use gemm as _;

/// The f32 GEMM kernels candle's CPU matmuls use on this machine, for benchmark reports.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return "neon";
    }
    #[allow(unreachable_code)]
    "scalar"
}

/// Keeps glibc's malloc from handing the engine's activations back to the kernel.
///
/// A batched layer call allocates buffers of tens of MB (rows × width × 4 bytes: 7200 × 1536
/// floats is 44 MB) and frees them a few milliseconds later. glibc serves anything above its
/// mmap threshold (at most 32 MB when it adjusts it itself) with a fresh mmap and unmaps it
/// on free, and trims the heap's top above 128 kB, so every layer call page-faulted its
/// buffers in again: a quarter of a fast trace's time on a 2-core AMD EPYC (22.0 s -> 16.2 s
/// for fact 6). Raising both thresholds makes freed buffers reusable. The cost is that a
/// process keeps its peak heap, which `max_batch_tokens` bounds. Call it first thing in
/// `main`, before other threads exist. A no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's thresholds; called before other threads start.
    unsafe {
        // Older glibc caps the mmap threshold at 32 MB and refuses more (returns 0).
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 0 {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
