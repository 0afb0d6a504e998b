//! `x W` on the CPU with `W` packed once, at load time, into the layout the kernel reads.
//!
//! gemm (what candle's CPU matmul calls) packs the weight again on every call, and with the
//! products split into row blocks (`matmul.rs`) on every block: for the gated MLP's 576 ×
//! 3072 weight that is 7 MB read and written per 512 rows, about 5% of a fast trace's samples
//! on a 2-core AMD EPYC (Zen 3). A layer's weight never changes, so here it is packed once:
//! panels of [`NR`] output columns, each stored `k` rows deep and contiguous, zero-padded
//! past the last column. The kernel keeps an [`MR`] × 16 tile of the output in twelve AVX2
//! registers, and for each step of the sum loads one row of the panel and broadcasts one
//! value of each of the tile's rows of `x`, which it reads in place (row-major, as the
//! activations are). The work is split into tasks of up to [`MB`] rows × [`NB`] columns run
//! in parallel; in a task the rows of `x` stay in L2 while the panels stream past them.
//!
//! The sum over `k` runs in order, in one chain of fused multiply-adds per output (as
//! gemm's does within a block of the sum), so the result differs from candle's matmul only
//! in rounding: the tests hold the two within the bound of a `k`-term dot product.
//! [`PackedWeight::reference`] gives the weight back for the reference path.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::ops::{for_each_task, silu_mul_row};
use crate::error::Result;

/// Columns of a panel: two AVX2 registers of f32, one cache line.
const NR: usize = 16;
/// Rows of the output tile the kernel keeps in registers (12 accumulators of 16).
const MR: usize = 6;
/// Rows of a task: its rows of `x` (MB × k) stay in a core's L2 across the panels.
const MB: usize = 96;
/// Columns of a task: enough tasks for every core on a short input, and a task's panels
/// read once per task.
const NB: usize = 768;

/// One panel row: 16 floats on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; NR]);

/// A `(k, n)` f32 weight in panels of 16 columns: `lines[p · k + i]` holds
/// `W[i, 16p .. 16p + 16]`.
pub struct PackedWeight {
    k: usize,
    n: usize,
    lines: Vec<Line>,
}

impl PackedWeight {
    /// Packs `w` `(k, n)` (any strides), or `None` where the packed kernel does not run: not
    /// an f32 CPU tensor, or a CPU without AVX2 and FMA, or one with AVX-512, where gemm's
    /// AVX-512 kernels are faster than this AVX2 one.
    pub fn pack(w: &Tensor) -> Result<Option<Self>> {
        if !(w.device().is_cpu() && w.dtype() == DType::F32 && w.rank() == 2 && kernel_runs()) {
            return Ok(None);
        }
        Ok(Some(Self::pack_f32(w)?))
    }

    /// Packs an f32 `(k, n)` tensor, whatever the CPU.
    fn pack_f32(w: &Tensor) -> Result<Self> {
        let (k, n) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let panels = n.div_ceil(NR);
        let mut lines = vec![Line([0.0; NR]); panels * k];
        for (p, panel) in lines.chunks_mut(k.max(1)).enumerate().take(panels) {
            for (i, line) in panel.iter_mut().enumerate() {
                let row = &values[i * n..(i + 1) * n];
                let cols = &row[p * NR..((p + 1) * NR).min(n)];
                line.0[..cols.len()].copy_from_slice(cols);
            }
        }
        Ok(Self { k, n, lines })
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `xs (m, k) · W` for an f32 CPU tensor `xs`.
    pub fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        // The kernel reads rows in place; a view whose rows are not contiguous is copied.
        let xs = match xs.stride() {
            [_, 1] => xs.clone(),
            _ => xs.contiguous()?,
        };
        Ok(xs.apply_op1_no_bwd(&PackedMatmul { w: self, silu_half: None })?)
    }

    /// SwiGLU on the product, `silu(x W_gate) · (x W_up)` with `W = [W_gate | W_up]` `(k,
    /// 2·half)`, or `None` where half is not a whole number of panels. Each tile of the gate
    /// and its tile of the up projection are combined as they leave the kernel, so the
    /// `(m, 2·half)` product is never written out and read back: equal bit for bit to
    /// [`Self::matmul`] followed by `ops::silu_mul` (tested).
    pub fn matmul_silu_mul(&self, xs: &Tensor, half: usize) -> Result<Option<Tensor>> {
        if half == 0 || half % NR != 0 || self.n != 2 * half {
            return Ok(None);
        }
        let xs = match xs.stride() {
            [_, 1] => xs.clone(),
            _ => xs.contiguous()?,
        };
        Ok(Some(xs.apply_op1_no_bwd(&PackedMatmul { w: self, silu_half: Some(half) })?))
    }

    /// The weight `(k, n)` as a tensor: what the packed product multiplies by.
    #[cfg(test)]
    pub(crate) fn reference(&self) -> Result<Tensor> {
        let mut values = Vec::with_capacity(self.k * self.n);
        for i in 0..self.k {
            for j in 0..self.n {
                values.push(self.lines[(j / NR) * self.k + i].0[j % NR]);
            }
        }
        Ok(Tensor::from_vec(values, (self.k, self.n), &candle_core::Device::Cpu)?)
    }
}

/// Whether this CPU runs the packed kernel: AVX2 and FMA, and no AVX-512.
fn kernel_runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && !std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

struct PackedMatmul<'a> {
    w: &'a PackedWeight,
    /// SwiGLU's half: the output is `silu(gate) · up`, `half` columns wide.
    silu_half: Option<usize>,
}

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else { candle_core::bail!("packed-matmul: f32 input only") };
        let (k, n) = self.w.dims();
        let &[m, k2] = l.dims() else { candle_core::bail!("packed-matmul: a 2-d input only") };
        let &[lda, 1] = l.stride() else {
            candle_core::bail!("packed-matmul: rows of the input must be contiguous")
        };
        if k != k2 {
            candle_core::bail!("packed-matmul: ({m}, {k2}) x ({k}, {n})");
        }
        let x = &x[l.start_offset()..];
        if m > 0 && k > 0 && (m - 1) * lda + k > x.len() {
            candle_core::bail!("packed-matmul: a layout outside its buffer");
        }
        // The output's width: SwiGLU's half, or the product's n.
        let width = match self.silu_half {
            Some(half) if half % NR == 0 && 2 * half == n => half,
            Some(half) => candle_core::bail!("packed-matmul: SwiGLU's half {half} of {n}"),
            None => n,
        };
        let mut dst: Vec<f32> = Vec::with_capacity(m * width);
        if k == 0 || m == 0 || width == 0 {
            // The sums of nothing are 0; silu(0) · 0 is 0 too.
            dst.resize(m * width, 0.0);
            return Ok((CpuStorage::F32(dst), Shape::from((m, width))));
        }
        let out = Out(dst.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let (row_tasks, col_tasks) = (m.div_ceil(MB), width.div_ceil(NB));
        for_each_task(row_tasks * col_tasks, m * k * n, |task| {
            let (r0, c0) = ((task / col_tasks) * MB, (task % col_tasks) * NB);
            let (rows, cols) = (MB.min(m - r0), NB.min(width - c0));
            // SAFETY: the tasks' output rectangles are disjoint and inside the m × width
            // output; x's rows r0..r0 + rows are inside its buffer (checked above).
            unsafe {
                match self.silu_half {
                    Some(_) => task_silu_mul(x, lda, self.w, r0, rows, c0, cols, &out),
                    None => task_product(x, lda, self.w, r0, rows, c0, cols, &out),
                }
            };
        });
        // SAFETY: the tasks cover every row and column of the output, and each writes
        // every element of its rectangle.
        unsafe { dst.set_len(m * width) };
        Ok((CpuStorage::F32(dst), Shape::from((m, width))))
    }
}

/// An output's first element, shared by parallel tasks that each write their own disjoint
/// part of it (here rectangles; attention's heads in `attention.rs`).
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: every user hands each task a part of the output no other task writes.
unsafe impl Sync for Out {}

/// Rows `r0..r0 + rows` × columns `c0..c0 + cols` of the product (c0 a multiple of 16).
///
/// # Safety
/// The rectangle is inside the output (`n` columns per row) and written by no other task;
/// rows `r0..r0 + rows` of `x` (row stride `lda`, `k` columns) are inside `x`; the CPU has
/// AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
unsafe fn task_product(
    x: &[f32],
    lda: usize,
    w: &PackedWeight,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: &Out,
) {
    let (k, n) = w.dims();
    for p in c0 / NR..(c0 + cols).div_ceil(NR) {
        let panel = w.lines[p * k..(p + 1) * k].as_ptr().cast::<f32>();
        let width = NR.min(n - p * NR);
        let mut r = r0;
        while r < r0 + rows {
            let tile_rows = MR.min(r0 + rows - r);
            // SAFETY: rows r..r + tile_rows of x and of the output, columns 16p..16p +
            // width of the output, all inside the task's rectangle (caller's contract).
            unsafe {
                let a = x.as_ptr().add(r * lda);
                let c = out.0.add(r * n + p * NR);
                tile(tile_rows, k, a, lda, panel, c, n, width);
            }
            r += tile_rows;
        }
    }
}

/// Rows `r0..r0 + rows` × columns `c0..c0 + cols` of SwiGLU's output (`n / 2` columns, a
/// multiple of 16, as is c0): each gate tile and its up tile go through a small buffer into
/// `ops::silu_mul_row`, the function the unfused path applies to the same values.
///
/// # Safety
/// As [`task_product`], with the output `n / 2` columns wide.
#[allow(clippy::too_many_arguments)]
unsafe fn task_silu_mul(
    x: &[f32],
    lda: usize,
    w: &PackedWeight,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: &Out,
) {
    let (k, n) = w.dims();
    let half = n / 2;
    let mut gate = [Line([0.0; NR]); MR];
    let mut up = [Line([0.0; NR]); MR];
    for p in c0 / NR..(c0 + cols) / NR {
        let panel = |p: usize| w.lines[p * k..(p + 1) * k].as_ptr().cast::<f32>();
        let (gate_panel, up_panel) = (panel(p), panel(p + half / NR));
        let mut r = r0;
        while r < r0 + rows {
            let tile_rows = MR.min(r0 + rows - r);
            // SAFETY: rows r..r + tile_rows of x are inside it (caller's contract); the
            // buffers hold MR rows of 16; the output's row r + i, columns 16p..16p + 16,
            // is inside the task's rectangle.
            unsafe {
                let a = x.as_ptr().add(r * lda);
                tile(tile_rows, k, a, lda, gate_panel, gate.as_mut_ptr().cast(), NR, NR);
                tile(tile_rows, k, a, lda, up_panel, up.as_mut_ptr().cast(), NR, NR);
                for i in 0..tile_rows {
                    let row = out.0.add((r + i) * half + p * NR);
                    let o = std::slice::from_raw_parts_mut(row.cast::<MaybeUninit<f32>>(), NR);
                    silu_mul_row(&gate[i].0, &up[i].0, o);
                }
            }
            r += tile_rows;
        }
    }
}

/// One tile of `rows ≤ MR` rows × `width ≤ 16` columns: `c = a · panel`, over all of `k`.
///
/// # Safety
/// `a` has `rows` rows of `k` readable floats `lda` apart; `panel` has `k` lines of 16;
/// `c` has `rows` rows of `width` writable floats `ldc` apart; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
    c: *mut f32,
    ldc: usize,
    width: usize,
) {
    // SAFETY (all arms): the caller's contract, with the row count the kernel is made for.
    unsafe {
        match rows {
            6 => kernel::<6>(k, a, lda, panel, c, ldc, width),
            5 => kernel::<5>(k, a, lda, panel, c, ldc, width),
            4 => kernel::<4>(k, a, lda, panel, c, ldc, width),
            3 => kernel::<3>(k, a, lda, panel, c, ldc, width),
            2 => kernel::<2>(k, a, lda, panel, c, ldc, width),
            _ => kernel::<1>(k, a, lda, panel, c, ldc, width),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
    c: *mut f32,
    ldc: usize,
    width: usize,
) {
    use std::arch::x86_64::*;
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
        // SAFETY: row r < rows of the output tile, `width` floats of it (contract).
        unsafe {
            let row = c.add(r * ldc);
            if width == NR {
                _mm256_storeu_ps(row, acc[0]);
                _mm256_storeu_ps(row.add(8), acc[1]);
            } else {
                let mut line = [0f32; NR];
                _mm256_storeu_ps(line.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(line.as_mut_ptr().add(8), acc[1]);
                std::ptr::copy_nonoverlapping(line.as_ptr(), row, width);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(
    _k: usize,
    _a: *const f32,
    _lda: usize,
    _panel: *const f32,
    _c: *mut f32,
    _ldc: usize,
    _width: usize,
) {
    unreachable!("the packed kernel runs on x86-64 only (`kernel_runs`)")
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// The products agree with candle's matmul (gemm) to within what rounding allows: each
    /// computes a k-term dot product in f32, |error| ≤ γ_k Σ|x_i w_i| with γ_k = k·u/(1 − k·u)
    /// and u = 2⁻²⁴ (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), so the
    /// two are within 2·γ_k Σ|x_i w_i| of each other. Σ|x_i w_i| is taken in f64.
    #[test]
    fn equals_candles_matmul_within_a_dot_products_rounding() -> Result<()> {
        let dev = &Device::Cpu;
        #[cfg(target_arch = "x86_64")]
        let has_kernel = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let has_kernel = false;
        if !has_kernel {
            let w = Tensor::zeros((4, 4), DType::F32, dev)?;
            assert!(PackedWeight::pack(&w)?.is_none(), "no kernel, no packing");
            return Ok(());
        }
        // Tiles with 1–6 rows, panels cut short (n not a multiple of 16), more than one
        // task of rows and of columns, k from 1 to the MLP's.
        for (m, k, n) in [
            (1, 1, 1),
            (5, 7, 3),
            (7, 33, 17),
            (13, 576, 40),
            (100, 64, 800),
            (197, 130, 771),
            (200, 1536, 48),
        ] {
            let w_out_in = Tensor::randn(0f32, 1.0, (n, k), dev)?;
            let w = w_out_in.t()?;
            let packed = PackedWeight::pack_f32(&w)?;
            assert_eq!(packed.dims(), (k, n));
            let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            assert_eq!(bits(&packed.reference()?)?, bits(&w)?, "packing loses nothing");
            // Rows in place (a narrowed input) and a view whose rows are not contiguous.
            let x = Tensor::randn(0f32, 1.0, (m + 2, k), dev)?.i(1..m + 1)?;
            let x_t = Tensor::randn(0f32, 1.0, (k, m), dev)?.t()?;
            for x in [x, x_t] {
                let fast = packed.matmul(&x)?;
                assert_eq!(fast.dims(), &[m, n]);
                let reference = super::super::matmul::matmul_reference(&x, &w)?;
                let abs = |t: &Tensor| t.abs().and_then(|t| t.to_dtype(DType::F64));
                let magnitude = abs(&x)?.matmul(&abs(&w)?)?.flatten_all()?.to_vec1::<f64>()?;
                let u = f64::from(f32::EPSILON) / 2.0;
                let gamma = k as f64 * u / (1.0 - k as f64 * u);
                let (fast, reference) = (bits(&fast)?, bits(&reference)?);
                for (i, ((a, b), s)) in fast.iter().zip(&reference).zip(&magnitude).enumerate() {
                    let diff = (f64::from(*a) - f64::from(*b)).abs();
                    assert!(
                        diff <= 2.0 * gamma * s,
                        "{m}x{k}x{n} at ({}, {}): {a} against {b}",
                        i / n,
                        i % n
                    );
                }
            }
        }
        // SwiGLU fused into the product: equal bit for bit to the product, then silu_mul;
        // halves that are not whole panels are left to the caller.
        for (m, k, half) in [(1, 5, 16), (13, 576, 48), (197, 64, 784)] {
            let packed = PackedWeight::pack_f32(&Tensor::randn(0f32, 1.0, (k, 2 * half), dev)?)?;
            let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
            let fused = packed.matmul_silu_mul(&x, half)?.expect("whole panels");
            let plain = super::super::ops::silu_mul(&packed.matmul(&x)?, half)?;
            assert_eq!(fused.dims(), &[m, half]);
            let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            assert_eq!(bits(&fused)?, bits(&plain)?, "{m}x{k}x{half}");
        }
        let odd = PackedWeight::pack_f32(&Tensor::zeros((4, 2 * 24), DType::F32, dev)?)?;
        assert!(odd.matmul_silu_mul(&Tensor::zeros((2, 4), DType::F32, dev)?, 24)?.is_none());
        // A mismatched input is an error, not a read past the buffer.
        let packed = PackedWeight::pack_f32(&Tensor::zeros((3, 2), DType::F32, dev)?)?;
        assert!(packed.matmul(&Tensor::zeros((2, 4), DType::F32, dev)?).is_err());
        Ok(())
    }
}
