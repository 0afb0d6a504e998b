//! The register kernels of `packed.rs`: one tile of `c = a · panel` over all of `k`, for
//! AVX2 + FMA and for AVX-512.
//!
//! Both keep a tile of the output in registers and, for each step of the sum, load one line
//! of each panel and broadcast one value of each of the tile's rows of `a`, read in place.
//! Every output is one chain of fused multiply-adds in the order of `k`, so the two kernels
//! give the same bits (tested), and the same rounding bound against candle's matmul.
//!
//! - AVX2: one panel (16 columns, two registers) × up to 6 rows: 12 accumulators.
//! - AVX-512: two panels (32 columns, two registers) × up to 12 rows: 24 accumulators of
//!   the 32 registers, the 12 broadcasts folded into the multiply-adds as memory operands.
//!   gemm's own AVX-512 kernels repack the weight on every call (and, with `matmul.rs`'s row
//!   blocks, on every block); these read the panels packed once at load.

use super::packed::NR;

/// The instruction set a packed product runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 and FMA: 6 × 16 tiles.
    Avx2,
    /// AVX-512 (F): 12 × 32 tiles.
    Avx512,
}

impl Isa {
    /// The kernels this CPU runs, fastest first.
    pub fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx2);
            }
        }
        isas
    }

    /// Rows of a tile.
    pub(crate) fn rows(self) -> usize {
        match self {
            Isa::Avx2 => 6,
            Isa::Avx512 => 12,
        }
    }

    /// Rows of a parallel task (`packed.rs`): the rows of `x` it reads stay in a core's
    /// cache while its slice of the panels passes them. A multiple of the tile's, at most 96.
    /// AVX2: measured on a 2-core AMD EPYC (Zen 3); AVX-512: on a 2-core Xeon (Emerald
    /// Rapids), 36–60 rows ran the projections 3–7% faster than 96 (`gemm-bench`).
    pub(crate) fn task_rows(self) -> usize {
        match self {
            Isa::Avx2 => 96,
            Isa::Avx512 => 48,
        }
    }

    /// Whether the kernel computes SwiGLU as its tiles leave the registers ([`tile_silu`]);
    /// otherwise the caller applies `ops::silu_mul_row` to the gate and up tiles.
    pub(crate) fn fuses_silu(self) -> bool {
        self == Isa::Avx512
    }

    /// Panels of a tile.
    pub(crate) fn panels(self) -> usize {
        match self {
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        }
    }
}

/// One tile: for each of the first `count ≤ isa.panels()` panels `j`, the `rows ≤
/// isa.rows()` rows × 16 columns at `c + 16 j` (rows `ldc` apart) become `a · panels[j]`,
/// summed over all of `k`.
///
/// # Safety
/// `isa` is in [`Isa::available`]; `a` has `rows` rows of `k` readable floats `lda` apart;
/// each used `panels[j]` has `k` lines of 16 floats, 64-byte aligned; `c` has `rows` rows of
/// `16 · count` writable floats `ldc` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile(
    isa: Isa,
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    count: usize,
    panels: [*const f32; 2],
    c: *mut f32,
    ldc: usize,
) {
    let args = (k, a, lda, panels, c, ldc);
    // SAFETY (all calls): the caller's contract, with the row and panel counts each kernel
    // is made for.
    unsafe {
        match isa {
            Isa::Avx2 => {
                for (j, &panel) in panels.iter().enumerate().take(count) {
                    avx2::tile(rows, (k, a, lda, [panel; 2], c.add(NR * j), ldc));
                }
            }
            Isa::Avx512 if count == 2 => avx512::tile::<2, false>(rows, args),
            Isa::Avx512 => avx512::tile::<1, false>(rows, args),
        }
    }
}

/// SwiGLU's tile where the kernel fuses it (AVX-512): the `rows ≤ isa.rows()` rows × 16
/// columns at `c` (rows `ldc` apart) become `silu(a · panels[0]) · (a · panels[1])`,
/// computed as `ops::silu_mul_row` computes it, operation for operation (the same bits:
/// tested).
///
/// # Safety
/// As [`tile`] with both panels, `c` holding `rows` rows of 16 writable floats, and
/// `isa.fuses_silu()`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_silu(
    isa: Isa,
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    panels: [*const f32; 2],
    c: *mut f32,
    ldc: usize,
) {
    debug_assert!(isa.fuses_silu());
    // SAFETY: the caller's contract.
    unsafe { avx512::tile::<2, true>(rows, (k, a, lda, panels, c, ldc)) };
}

/// A kernel's arguments: `k`, `a`, `lda`, the panels, `c`, `ldc`.
type Args = (usize, *const f32, usize, [*const f32; 2], *mut f32, usize);

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Args, NR};

    /// # Safety
    /// As [`super::tile`] for the first panel, rows ≤ 6, on a CPU with AVX2 and FMA.
    pub(super) unsafe fn tile(rows: usize, args: Args) {
        // SAFETY (all arms): the caller's contract.
        unsafe {
            match rows {
                6 => kernel::<6>(args),
                5 => kernel::<5>(args),
                4 => kernel::<4>(args),
                3 => kernel::<3>(args),
                2 => kernel::<2>(args),
                _ => kernel::<1>(args),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const R: usize>((k, a, lda, panels, c, ldc): Args) {
        let panel = panels[0];
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for i in 0..k {
            // SAFETY: i < k, so the panel line and every row's value are inside (contract).
            unsafe {
                let b0 = _mm256_load_ps(panel.add(i * NR));
                let b1 = _mm256_load_ps(panel.add(i * NR + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(r * lda + i));
                    acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row r < rows of c, 16 floats (contract).
            unsafe {
                _mm256_storeu_ps(c.add(r * ldc), acc[0]);
                _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Args, NR};

    /// # Safety
    /// As [`super::tile`] for `P` panels (with `SILU`, [`super::tile_silu`]), rows ≤ 12, on
    /// a CPU with AVX-512 F.
    pub(super) unsafe fn tile<const P: usize, const SILU: bool>(rows: usize, args: Args) {
        // SAFETY (all arms): the caller's contract.
        unsafe {
            match rows {
                12 => kernel::<12, P, SILU>(args),
                11 => kernel::<11, P, SILU>(args),
                10 => kernel::<10, P, SILU>(args),
                9 => kernel::<9, P, SILU>(args),
                8 => kernel::<8, P, SILU>(args),
                7 => kernel::<7, P, SILU>(args),
                6 => kernel::<6, P, SILU>(args),
                5 => kernel::<5, P, SILU>(args),
                4 => kernel::<4, P, SILU>(args),
                3 => kernel::<3, P, SILU>(args),
                2 => kernel::<2, P, SILU>(args),
                _ => kernel::<1, P, SILU>(args),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const P: usize, const SILU: bool>(
        (k, a, lda, panels, c, ldc): Args,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for i in 0..k {
            // SAFETY: i < k, so each panel's line and every row's value are inside (contract;
            // lines are 64-byte aligned).
            unsafe {
                let mut b = [_mm512_setzero_ps(); P];
                for (j, b) in b.iter_mut().enumerate() {
                    *b = _mm512_load_ps(panels[j].add(i * NR));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * lda + i));
                    for (acc, b) in acc.iter_mut().zip(&b) {
                        *acc = _mm512_fmadd_ps(av, *b, *acc);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            if SILU {
                // SAFETY: row r < rows of c, 16 floats (contract of `tile_silu`, P = 2).
                unsafe { _mm512_storeu_ps(c.add(r * ldc), silu_mul(acc[0], acc[P - 1])) };
                continue;
            }
            for (j, acc) in acc.iter().enumerate() {
                // SAFETY: row r < rows of c, panel j < count (contract).
                unsafe { _mm512_storeu_ps(c.add(r * ldc + NR * j), *acc) };
            }
        }
    }

    /// `g / (1 + exp_f32(−g)) · u`, lane by lane: `ops::silu_mul_row` and `ops::exp_f32`
    /// written out, operation for operation, so that the bits are the same.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn silu_mul(g: __m512, u: __m512) -> __m512 {
        use crate::models::ops::exp_consts::*;
        let one = _mm512_set1_ps(1.0);
        // −g flips the sign bit (0 − g would turn −0 into +0).
        let sign = _mm512_set1_epi32(i32::MIN);
        let x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign));
        // x.clamp(lo, hi): vmaxps/vminps return their second operand when either is NaN, so
        // a NaN stays NaN, as clamp leaves it.
        let x = _mm512_max_ps(_mm512_set1_ps(CLAMP_LO), x);
        let x = _mm512_min_ps(_mm512_set1_ps(CLAMP_HI), x);
        let shift = _mm512_set1_ps(SHIFT);
        let kf = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2_E), shift);
        let k = _mm512_sub_ps(kf, shift);
        let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), one);
        let bits = _mm512_add_epi32(_mm512_castps_si512(kf), _mm512_set1_epi32(127));
        let e = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits)));
        _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub(super) unsafe fn tile(_rows: usize, _args: super::Args) {
        unreachable!("the packed kernels run on x86-64 only (`Isa::available`)")
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn tile<const P: usize, const SILU: bool>(_rows: usize, _args: super::Args) {
        unreachable!("the packed kernels run on x86-64 only (`Isa::available`)")
    }
}
