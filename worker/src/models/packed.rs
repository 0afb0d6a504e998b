//! `x W` on the CPU with `W` packed once, at load time, into the layout the kernel reads.
//!
//! gemm (what candle's CPU matmul calls) packs the weight again on every call, and with the
//! products split into row blocks (`matmul.rs`) on every block: for the gated MLP's 576 ×
//! 3072 weight that is 7 MB read and written per 512 rows, about 5% of a fast trace's samples
//! on a 2-core AMD EPYC (Zen 3). A layer's weight never changes, so here it is packed once:
//! panels of [`NR`] output columns, each stored `k` rows deep and contiguous, zero-padded
//! past the last column. The register kernels (`packed_kernels.rs`: AVX2 + FMA, and AVX-512
//! where the CPU has it) keep a tile of the output in registers, and for each step of the
//! sum load one line of a panel and broadcast one value of each of the tile's rows of `x`,
//! which they read in place (row-major, as the activations are). The work is split into
//! tasks of a few dozen rows ([`Isa::task_rows`]) × a slice of columns whose panels fit a
//! core's L2 cache ([`SLICE_BYTES`]), run in parallel slice by slice; in a task the rows of
//! `x` stay in cache while the slice's panels pass them.
//!
//! The sum over `k` runs in order, in one chain of fused multiply-adds per output (as
//! gemm's does within a block of the sum), so the result differs from candle's matmul only
//! in rounding: the tests hold the two within the bound of a `k`-term dot product.
//! [`PackedWeight::reference`] gives the weight back for the reference path.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::ops::{for_each_task, silu_mul_row};
pub use super::packed_kernels::Isa;
use super::packed_kernels::{tile, tile_silu};
use crate::error::Result;

/// Columns of a panel: two AVX2 registers of f32, one AVX-512 register, one cache line.
pub(crate) const NR: usize = 16;
/// The most rows of any task ([`Isa::task_rows`]): the scratch's height.
const MB: usize = 96;

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
    /// The kernel that multiplies by it.
    isa: Isa,
}

impl PackedWeight {
    /// Packs `w` `(k, n)` (any strides) for the fastest kernel this CPU runs, or `None`
    /// where none runs: not an f32 CPU tensor, or a CPU without AVX2 and FMA.
    pub fn pack(w: &Tensor) -> Result<Option<Self>> {
        match Isa::available().first() {
            Some(&isa) => Self::pack_for(w, isa),
            None => Ok(None),
        }
    }

    /// Packs `w` for the kernel of `isa` (benchmarks and tests compare the kernels), or
    /// `None` where it does not run: not an f32 CPU tensor, or a CPU without `isa`.
    pub fn pack_for(w: &Tensor, isa: Isa) -> Result<Option<Self>> {
        let fits = w.device().is_cpu() && w.dtype() == DType::F32 && w.rank() == 2;
        if !(fits && Isa::available().contains(&isa)) {
            return Ok(None);
        }
        Ok(Some(Self::pack_f32(w, isa)?))
    }

    /// Packs an f32 `(k, n)` tensor for `isa` (which the caller has checked the CPU runs).
    fn pack_f32(w: &Tensor, isa: Isa) -> Result<Self> {
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
        Ok(Self { k, n, lines, isa })
    }

    /// The kernel that multiplies by this weight.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Columns `ids` of the weight as the rows of an `(ids.len(), k)` tensor: a tied LM
    /// head's packed copy read back as the token table it was packed from (a copy, bit for
    /// bit). An id past the last column is an error.
    pub fn columns(&self, ids: &[u32]) -> Result<Tensor> {
        let mut rows = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            let id = id as usize;
            if id >= self.n {
                return Err(crate::error::Error::Request(format!(
                    "token id {id} is past the vocabulary of {}",
                    self.n
                )));
            }
            let panel = &self.lines[(id / NR) * self.k..(id / NR + 1) * self.k];
            rows.extend(panel.iter().map(|line| line.0[id % NR]));
        }
        Ok(Tensor::from_vec(rows, (ids.len(), self.k), &candle_core::Device::Cpu)?)
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
        if half == 0 || !half.is_multiple_of(NR) || self.n != 2 * half {
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
        let (mb, nb) = (self.w.isa.task_rows(), slice_columns(k, width, self.silu_half.is_some()));
        let (row_tasks, col_tasks) = (m.div_ceil(mb), width.div_ceil(nb));
        // Column slice by column slice: the tasks of one slice run one after another on a
        // core (rayon splits the range in halves), which keeps the slice in its L2 cache.
        for_each_task(row_tasks * col_tasks, m * k * n, |t| {
            let (r0, c0) = ((t % row_tasks) * mb, (t / row_tasks) * nb);
            let (rows, cols) = (mb.min(m - r0), nb.min(width - c0));
            // SAFETY: the tasks' output rectangles are disjoint and inside the m × width
            // output; x's rows r0..r0 + rows are inside its buffer (checked above).
            unsafe { task(x, lda, self.w, self.silu_half.is_some(), r0, rows, c0, cols, &out) };
        });
        // SAFETY: the tasks cover every row and column of the output, and each writes
        // every element of its rectangle.
        unsafe { dst.set_len(m * width) };
        Ok((CpuStorage::F32(dst), Shape::from((m, width))))
    }
}

/// Bytes of packed weight in one column slice of the tasks: what a core keeps in its L2
/// cache (1–2 MiB per core on x86 CPUs with AVX-512 since Skylake-SP; 512 KiB on Zen 3,
/// whose L3 is fast) while it runs down every row of `x`. Taking the tasks row block by row
/// block instead streamed the whole weight from L3 for each block of 48 rows, and ran the
/// 576 × 3072 product at 0.75–0.95× this rate depending on what shared the L3 (2-core
/// Xeon, Emerald Rapids, `gemm-bench`).
const SLICE_BYTES: usize = 1 << 20;

/// Output columns of a task: a multiple of two panels whose weight (gate and up panels
/// both for SwiGLU) fits [`SLICE_BYTES`], spread evenly over the slices the output needs.
fn slice_columns(k: usize, width: usize, silu: bool) -> usize {
    let bytes_per_column = k * size_of::<f32>() * if silu { 2 } else { 1 };
    let most = (SLICE_BYTES / bytes_per_column.max(1)) / (2 * NR) * (2 * NR);
    let slices = width.div_ceil(most.max(2 * NR));
    width.div_ceil(slices.max(1)).next_multiple_of(2 * NR)
}

/// An output's first element, shared by parallel tasks that each write their own disjoint
/// part of it (here rectangles; attention's heads in `attention.rs`).
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: every user hands each task a part of the output no other task writes.
unsafe impl Sync for Out {}

/// Rows `r0..r0 + rows` × columns `c0..c0 + cols` (c0 a multiple of 16) of the output:
/// the product (`n` columns), or with `silu` SwiGLU's (`n / 2` columns, a multiple of 16).
///
/// A step takes one tile's panels (two adjacent ones on AVX-512; for SwiGLU a gate panel
/// and its up panel) past every tile of the task's rows. A product's tiles go straight to
/// the output where their columns are whole, and so do SwiGLU's where the kernel computes
/// it ([`Isa::fuses_silu`]); the rest go through `scratch`, then out: copied, or for
/// SwiGLU through `ops::silu_mul_row`, the function the unfused path applies.
///
/// # Safety
/// The rectangle is inside the output and written by no other task; rows `r0..r0 + rows`
/// (≤ MB) of `x` (row stride `lda`, `k` columns) are inside `x`; `w.isa` is one this CPU
/// runs.
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    x: &[f32],
    lda: usize,
    w: &PackedWeight,
    silu: bool,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: &Out,
) {
    let (k, n) = w.dims();
    let isa = w.isa;
    let (half, width) = (n / 2, if silu { n / 2 } else { n });
    let panel = |p: usize| w.lines[p * k..(p + 1) * k].as_ptr().cast::<f32>();
    // Two panels of 16 per row of the task.
    let mut scratch = [Line([0.0; NR]); 2 * MB];
    let (mut p, end) = (c0 / NR, (c0 + cols).div_ceil(NR));
    while p < end {
        let (count, panels) = match (silu, isa.panels().min(end - p)) {
            (true, _) => (2, [panel(p), panel(p + half / NR)]),
            (false, 2) => (2, [panel(p), panel(p + 1)]),
            (false, _) => (1, [panel(p), panel(p)]),
        };
        let fused = silu && isa.fuses_silu();
        let direct = fused || (!silu && (p + count) * NR <= n);
        let mut r = 0;
        while r < rows {
            let now = isa.rows().min(rows - r);
            // SAFETY: rows r0 + r..r0 + r + now of x are inside it (caller's contract); each
            // panel has k lines; the output's rows r0 + r.., columns 16p..16p + (16 for
            // SwiGLU, 16 · count for a product), are inside the task's rectangle when
            // `direct`, and scratch holds MB ≥ r + now rows of two panels.
            unsafe {
                let a = x.as_ptr().add((r0 + r) * lda);
                let (c, ldc) = match direct {
                    true => (out.0.add((r0 + r) * width + p * NR), width),
                    false => (scratch.as_mut_ptr().add(2 * r).cast::<f32>(), 2 * NR),
                };
                match fused {
                    true => tile_silu(isa, now, k, a, lda, panels, c, ldc),
                    false => tile(isa, now, k, a, lda, count, panels, c, ldc),
                }
            }
            r += now;
        }
        let done = if silu { NR } else { (count * NR).min(n - p * NR) };
        for (r, lines) in scratch.chunks_exact(2).take(if direct { 0 } else { rows }).enumerate() {
            // SAFETY: the output's row r0 + r, columns 16p..16p + done, is inside the task's
            // rectangle (caller's contract).
            unsafe {
                let row = out.0.add((r0 + r) * width + p * NR).cast::<MaybeUninit<f32>>();
                let row = std::slice::from_raw_parts_mut(row, done);
                if silu {
                    silu_mul_row(&lines[0].0, &lines[1].0, row);
                } else {
                    let sums = std::slice::from_raw_parts(lines.as_ptr().cast::<f32>(), done);
                    for (o, s) in row.iter_mut().zip(sums) {
                        o.write(*s);
                    }
                }
            }
        }
        p += if silu { 1 } else { count };
    }
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
        if Isa::available().is_empty() {
            let w = Tensor::zeros((4, 4), DType::F32, dev)?;
            assert!(PackedWeight::pack(&w)?.is_none(), "no kernel, no packing");
            return Ok(());
        }
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        // Tiles with 1–12 rows, panels cut short (n not a multiple of 16), an odd number of
        // panels (a one-panel tile on AVX-512), tiles stored in place and through the
        // scratch, more than one task of rows and of columns, k from 1 to the MLP's.
        for (m, k, n) in [
            (1, 1, 1),
            (5, 7, 3),
            (7, 33, 17),
            (11, 20, 33),
            (13, 576, 40),
            (100, 64, 800),
            (197, 130, 771),
            (200, 1536, 48),
            (61, 24, 1601),
            // Three column slices of the weight (`slice_columns`), the last one narrower.
            (100, 576, 1000),
        ] {
            let w_out_in = Tensor::randn(0f32, 1.0, (n, k), dev)?;
            let w = w_out_in.t()?;
            // Rows in place (a narrowed input) and a view whose rows are not contiguous.
            let x = Tensor::randn(0f32, 1.0, (m + 2, k), dev)?.i(1..m + 1)?;
            let x_t = Tensor::randn(0f32, 1.0, (k, m), dev)?.t()?;
            let mut products = Vec::new();
            for isa in Isa::available() {
                let packed = PackedWeight::pack_f32(&w, isa)?;
                assert_eq!(packed.dims(), (k, n));
                assert_eq!(bits(&packed.reference()?)?, bits(&w)?, "packing loses nothing");
                for x in [&x, &x_t] {
                    let fast = packed.matmul(x)?;
                    assert_eq!(fast.dims(), &[m, n]);
                    let reference = super::super::matmul::matmul_reference(x, &w)?;
                    let abs = |t: &Tensor| t.abs().and_then(|t| t.to_dtype(DType::F64));
                    let magnitude = abs(x)?.matmul(&abs(&w)?)?.flatten_all()?.to_vec1::<f64>()?;
                    let u = f64::from(f32::EPSILON) / 2.0;
                    let gamma = k as f64 * u / (1.0 - k as f64 * u);
                    let (fast, reference) = (bits(&fast)?, bits(&reference)?);
                    for (i, ((a, b), s)) in fast.iter().zip(&reference).zip(&magnitude).enumerate()
                    {
                        let diff = (f64::from(*a) - f64::from(*b)).abs();
                        assert!(
                            diff <= 2.0 * gamma * s,
                            "{isa:?} {m}x{k}x{n} at ({}, {}): {a} against {b}",
                            i / n,
                            i % n
                        );
                    }
                }
                products.push((isa, bits(&packed.matmul(&x)?)?));
            }
            // Every kernel sums each output in the order of k with fused multiply-adds, so
            // they agree bit for bit.
            for (isa, product) in &products[1..] {
                assert_eq!(product, &products[0].1, "{isa:?} against {:?}", products[0].0);
            }
        }
        // SwiGLU fused into the product: equal bit for bit to the product, then silu_mul;
        // halves that are not whole panels are left to the caller.
        for isa in Isa::available() {
            // (60, 576, 496): three column slices of gate and up panels.
            for (m, k, half) in
                [(1, 5, 16), (13, 576, 48), (197, 64, 784), (50, 8, 1600), (60, 576, 496)]
            {
                let w = Tensor::randn(0f32, 1.0, (k, 2 * half), dev)?;
                let packed = PackedWeight::pack_f32(&w, isa)?;
                // Products of std 4·√k: past exp's clamps at k = 576.
                let x = Tensor::randn(0f32, 4.0, (m, k), dev)?;
                let fused = packed.matmul_silu_mul(&x, half)?.expect("whole panels");
                let plain = super::super::ops::silu_mul(&packed.matmul(&x)?, half)?;
                assert_eq!(fused.dims(), &[m, half]);
                assert_eq!(bits(&fused)?, bits(&plain)?, "{isa:?} {m}x{k}x{half}");
            }
        }
        // A tied head's columns read back are the table's rows, bit for bit.
        let table = Tensor::randn(0f32, 1.0, (37, 5), dev)?;
        let packed = PackedWeight::pack_f32(&table.t()?, Isa::available()[0])?;
        let ids = [0u32, 36, 17, 16, 15, 17];
        let rows = table.index_select(&Tensor::new(&ids[..], dev)?, 0)?;
        assert_eq!(bits(&packed.columns(&ids)?)?, bits(&rows)?);
        assert!(packed.columns(&[37]).is_err(), "an id past the vocabulary");
        let isa = Isa::available()[0];
        let odd = PackedWeight::pack_f32(&Tensor::zeros((4, 2 * 24), DType::F32, dev)?, isa)?;
        assert!(odd.matmul_silu_mul(&Tensor::zeros((2, 4), DType::F32, dev)?, 24)?.is_none());
        // A mismatched input is an error, not a read past the buffer.
        let packed = PackedWeight::pack_f32(&Tensor::zeros((3, 2), DType::F32, dev)?, isa)?;
        assert!(packed.matmul(&Tensor::zeros((2, 4), DType::F32, dev)?).is_err());
        Ok(())
    }

    /// Slices fit the budget and split the columns evenly, in whole pairs of panels.
    #[test]
    fn column_slices_fit_the_budget_evenly() {
        // SmolLM2's q/k/v stacked (960 columns), SwiGLU's gate and up, down: 3, 7 and 4
        // slices.
        assert_eq!(slice_columns(576, 960, false), 320);
        assert_eq!(slice_columns(576, 1536, true), 224);
        assert_eq!(slice_columns(1536, 576, false), 160);
        let cases = [(1, 1, false), (4096, 16, true), (576, 49152, false), (9000, 40, false)];
        for (k, width, silu) in cases {
            let cols = slice_columns(k, width, silu);
            assert!(cols.is_multiple_of(2 * NR) && cols >= 2 * NR, "{k} {width} {silu}: {cols}");
            let bytes = cols * k * 4 * if silu { 2 } else { 1 };
            assert!(bytes <= SLICE_BYTES || cols == 2 * NR, "{k} {width} {silu}: {cols}");
            // Even: the slices are as few as the budget allows (one fewer would not fit it),
            // and the last is at most a pair of panels per slice narrower than the others.
            let slices = width.div_ceil(cols);
            if slices > 1 {
                let wider = width.div_ceil(slices - 1).next_multiple_of(2 * NR);
                let bytes = wider * k * 4 * if silu { 2 } else { 1 };
                assert!(bytes > SLICE_BYTES, "{k} {width} {silu}: {slices} slices of {cols}");
            }
            assert!(width + 2 * NR * slices >= slices * cols, "{k} {width} {silu}: {cols}");
        }
    }
}
