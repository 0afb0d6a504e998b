//! Copies that fill their output on the pool: concatenation and row overwrites.
//!
//! candle's `cat` and `scatter` copy on the calling thread. The fast trace copies a lot: it
//! joins restored streams, stacks each base run's keys and values once per sample, and every
//! patch overwrite copies the whole state. On two cores these serial copies were ~5% of a
//! fact's time with the other core idle. Here the output is cut into chunks of [`CHUNK`]
//! floats, each filled from the parts' own buffers (strided views read in place), in
//! parallel. Plain copies: the result is bit-equal to candle's (tested), which stays the
//! path off the CPU, for other dtypes, and for small outputs.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

use crate::error::{Error, Result};

use super::ops::filled;

/// Floats per parallel task: large enough that a task's copy outweighs waking the pool.
const CHUNK: usize = 1 << 15;

/// `Tensor::cat(parts, dim)`, filled in parallel; bit-equal to candle's.
pub(crate) fn cat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let Some(first) = parts.first() else { return Ok(Tensor::cat(parts, dim)?) };
    let total: usize = parts.iter().map(|p| p.elem_count()).sum();
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let same_shape = |t: &Tensor| {
        t.rank() == first.rank()
            && dim < t.rank()
            && t.dims().iter().zip(first.dims()).enumerate().all(|(i, (a, b))| i == dim || a == b)
    };
    if total < 2 * CHUNK || !parts.iter().all(|p| f32_cpu(p) && same_shape(p)) {
        return Ok(Tensor::cat(parts, dim)?);
    }
    let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
    let mut sources = Vec::with_capacity(parts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(CpuStorage::F32(data)) = &**storage else {
            return Err(Error::Request("cat: expected f32 CPU storage".into()));
        };
        sources.push(Source::new(data, layout)?);
    }
    // Each part gives `len[p]` consecutive floats to each of `outer` output rows.
    let outer: usize = first.dims()[..dim].iter().product();
    let inner: usize = first.dims()[dim + 1..].iter().product();
    let lens: Vec<usize> = parts.iter().map(|p| p.dims()[dim] * inner).collect();
    let row: usize = lens.iter().sum();
    let out = filled(total, CHUNK, |i, chunk| {
        let mut e = i * CHUNK;
        let mut done = 0;
        while done < chunk.len() {
            let (o, mut r) = (e / row, e % row);
            let mut p = 0;
            while r >= lens[p] {
                r -= lens[p];
                p += 1;
            }
            let n = (lens[p] - r).min(chunk.len() - done);
            sources[p].copy(o * lens[p] + r, &mut chunk[done..done + n]);
            done += n;
            e += n;
        }
    });
    drop(guards);
    let mut dims = first.dims().to_vec();
    dims[dim] = parts.iter().map(|p| p.dims()[dim]).sum();
    debug_assert_eq!(dims.iter().product::<usize>(), outer * row);
    Ok(Tensor::from_vec(out, dims, first.device())?)
}

/// `x` with its elements in order in a buffer of its own (`x` itself when they already are),
/// copied in parallel.
pub(crate) fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || x.elem_count() < 2 * CHUNK || x.rank() == 0 {
        // candle's cat returns a single part as it is.
        return Ok(x.contiguous()?);
    }
    cat(&[x], 0)
}

/// The rows `(n, d)` of `xs` with row `rows[i]` replaced by row `i` of the values (the parts
/// `values`, `(m_j, d)` each, stacked), in order, so a row written twice keeps its last value
/// as candle's scatter does. Bit-equal to [`overwrite_rows_reference`] (tested).
pub(crate) fn overwrite_rows(xs: &Tensor, rows: &[u32], values: &[&Tensor]) -> Result<Tensor> {
    let (n, d) = xs.dims2()?;
    let m: usize = values.iter().map(|v| v.dims().first().copied().unwrap_or(0)).sum();
    if m != rows.len() || values.iter().any(|v| v.dims2().map_or(true, |(_, w)| w != d)) {
        return Err(Error::Request(format!(
            "overwrite: {} rows for {m} values of width {d}",
            rows.len()
        )));
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= n) {
        return Err(Error::Request(format!("overwrite: row {r} outside the {n} rows")));
    }
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if xs.elem_count() < 2 * CHUNK || !f32_cpu(xs) || !values.iter().all(|v| f32_cpu(v)) {
        return overwrite_rows_reference(xs, rows, values);
    }
    // The value row each output row takes, the last one written winning; none: usize::MAX.
    let mut owner = vec![usize::MAX; n];
    for (i, &r) in rows.iter().enumerate() {
        owner[r as usize] = i;
    }
    let starts: Vec<usize> = values
        .iter()
        .scan(0, |s, v| {
            let start = *s;
            *s += v.dims()[0];
            Some(start)
        })
        .collect();
    let guards: Vec<_> =
        std::iter::once(xs).chain(values.iter().copied()).map(|t| t.storage_and_layout()).collect();
    let mut sources = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(CpuStorage::F32(data)) = &**storage else {
            return Err(Error::Request("overwrite: expected f32 CPU storage".into()));
        };
        sources.push(Source::new(data, layout)?);
    }
    let rows_per_task = (CHUNK / d.max(1)).max(1);
    let out = filled(n * d, rows_per_task * d, |task, chunk| {
        for (k, out_row) in chunk.chunks_mut(d).enumerate() {
            let r = task * rows_per_task + k;
            match owner[r] {
                usize::MAX => sources[0].copy(r * d, out_row),
                i => {
                    let j = starts.partition_point(|&s| s <= i) - 1;
                    sources[1 + j].copy((i - starts[j]) * d, out_row);
                }
            }
        }
    });
    drop(guards);
    Ok(Tensor::from_vec(out, (n, d), xs.device())?)
}

/// The plain composition: one candle scatter of the stacked values.
pub(crate) fn overwrite_rows_reference(
    xs: &Tensor,
    rows: &[u32],
    values: &[&Tensor],
) -> Result<Tensor> {
    let d = xs.dim(1)?;
    if rows.is_empty() {
        return Ok(xs.clone());
    }
    let values = Tensor::cat(values, 0)?.to_dtype(xs.dtype())?.contiguous()?;
    let idx = Tensor::new(rows, xs.device())?
        .unsqueeze(1)?
        .broadcast_as((rows.len(), d))?
        .contiguous()?;
    Ok(xs.scatter(&idx, &values, 0)?)
}

/// A tensor's elements in row-major order, read in place from its buffer: runs of `block`
/// contiguous floats, each run's start found from its index over the leading dimensions.
struct Source<'a> {
    data: &'a [f32],
    start: usize,
    lead_dims: Vec<usize>,
    lead_strides: Vec<usize>,
    block: usize,
}

impl<'a> Source<'a> {
    fn new(data: &'a [f32], layout: &Layout) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        // The trailing dimensions that are contiguous form one run (size-1 ones whatever
        // their stride).
        let mut block = 1;
        let mut k = dims.len();
        while k > 0 && (dims[k - 1] == 1 || strides[k - 1] == block) {
            block *= dims[k - 1];
            k -= 1;
        }
        let start = layout.start_offset();
        let reach = start
            + dims.iter().zip(strides).map(|(&n, &s)| n.saturating_sub(1) * s).sum::<usize>()
            + 1;
        if dims.iter().product::<usize>() > 0 && reach > data.len() {
            return Err(Error::Request("copy: a layout outside its buffer".into()));
        }
        Ok(Self {
            data,
            start,
            lead_dims: dims[..k].to_vec(),
            lead_strides: strides[..k].to_vec(),
            block: block.max(1),
        })
    }

    /// Writes elements `e..e + out.len()` (row-major) into `out`.
    fn copy(&self, mut e: usize, out: &mut [MaybeUninit<f32>]) {
        let mut done = 0;
        while done < out.len() {
            let (b, off) = (e / self.block, e % self.block);
            let mut rest = b;
            let mut at = self.start + off;
            for (&n, &s) in self.lead_dims.iter().zip(&self.lead_strides).rev() {
                at += (rest % n) * s;
                rest /= n;
            }
            let len = (self.block - off).min(out.len() - done);
            for (o, &v) in out[done..done + len].iter_mut().zip(&self.data[at..at + len]) {
                o.write(v);
            }
            done += len;
            e += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn random(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        // A deterministic spread of values, distinct enough that a misplaced copy shows.
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(seed) % 100_003) as f32)
            .map(|x| x / 7.0 - 3.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn cat_equals_candle_on_contiguous_narrowed_and_broadcast_parts() {
        for &(big, dim) in &[(true, 0), (true, 1), (true, 2), (false, 0), (false, 2)] {
            // (2, 40, 3, 300): above 2·CHUNK in all; (1, 5, 3, 8): the serial fallback.
            let (b, t, h, w) = if big { (2, 40, 3, 300) } else { (1, 5, 3, 8) };
            let mut dims_a = vec![b, t, h, w];
            let mut dims_b = dims_a.clone();
            dims_a[dim] += 1;
            dims_b[dim] += 2;
            let a = random(&dims_a, 1);
            // A narrowed view: the middle of a longer tensor along the last axis.
            let mut wide = dims_b.clone();
            wide[3] += 5;
            let narrowed = random(&wide, 2).narrow(3, 3, dims_b[3]).expect("narrow");
            // A broadcast: one row along the first axis repeated.
            let mut one = dims_b.clone();
            one[0] = 1;
            let broadcast = random(&one, 3).broadcast_as(dims_b.as_slice()).expect("broadcast");
            // A transposed view: runs of one float.
            let mut swapped = dims_b.clone();
            swapped.swap(1, 2);
            let transposed = random(&swapped, 4).transpose(1, 2).expect("transpose");
            for parts in [
                vec![&a, &narrowed],
                vec![&narrowed, &broadcast, &a],
                vec![&broadcast, &transposed],
            ] {
                let ours = cat(&parts, dim).expect("cat");
                let theirs = Tensor::cat(&parts, dim).expect("candle cat");
                assert_eq!(ours.dims(), theirs.dims(), "dim {dim}");
                assert_eq!(bits(&ours), bits(&theirs), "dim {dim}, big {big}");
            }
            let copied = contiguous(&transposed).expect("contiguous");
            assert!(copied.is_contiguous());
            assert_eq!(bits(&copied), bits(&transposed.contiguous().expect("candle")));
        }
    }

    #[test]
    fn overwrite_rows_equals_scatter_with_repeats_and_views() {
        for &(n, d) in &[(300usize, 576usize), (7, 8)] {
            let xs = random(&[n, d + 3], 5).narrow(1, 2, d).expect("narrow");
            let v1 = random(&[4, d], 6);
            let v2 = random(&[1, d], 7).broadcast_as((3, d)).expect("broadcast");
            // Row 2 written three times: the last write (from v2) wins.
            let rows: Vec<u32> = [2, 0, 5, 2, 6, 1, 2].iter().map(|&r| r % n as u32).collect();
            let ours = overwrite_rows(&xs, &rows, &[&v1, &v2]).expect("overwrite");
            let theirs = overwrite_rows_reference(&xs, &rows, &[&v1, &v2]).expect("scatter");
            assert_eq!(bits(&ours), bits(&theirs), "n {n}");
            let untouched = overwrite_rows(&xs, &[], &[]).expect("no rows");
            assert_eq!(bits(&untouched), bits(&xs));
        }
    }

    #[test]
    fn overwrite_rows_rejects_rows_outside_and_mismatched_values() {
        let xs = random(&[4, 8], 1);
        let v = random(&[1, 8], 2);
        assert!(overwrite_rows(&xs, &[4], &[&v]).is_err());
        assert!(overwrite_rows(&xs, &[0, 1], &[&v]).is_err());
        let narrow = random(&[1, 7], 3);
        assert!(overwrite_rows(&xs, &[0], &[&narrow]).is_err());
    }
}
