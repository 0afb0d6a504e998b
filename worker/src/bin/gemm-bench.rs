//! Compares the CPU's f32 products on the shapes a fast trace of SmolLM2 multiplies: candle's
//! matmul, the worker's row-blocked gemm (`models/matmul.rs`) and the packed kernels
//! (`models/packed.rs`, each instruction set this CPU runs), one after another in rounds, so
//! that every ratio it prints was measured side by side in one run.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p worker --bin gemm-bench
//! ```

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Parser;
use worker::bench::median;
use worker::models::matmul;
use worker::models::packed::{Isa, PackedWeight};

#[derive(Debug, Parser)]
#[command(about = "Times the CPU's f32 products on a fast trace's shapes, side by side")]
struct Args {
    /// Rounds; each times every product once, in turn.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Shapes as m×k×n (default: SmolLM2's projections at a fast trace's batch heights).
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
}

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize, usize)> {
    let parts: Vec<usize> = s
        .split(['x', '×'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("shape {s:?}: expected m×k×n"))?;
    match parts[..] {
        [m, k, n] => Ok((m, k, n)),
        _ => anyhow::bail!("shape {s:?}: expected m×k×n"),
    }
}

type Product<'a> = Box<dyn Fn() -> worker::error::Result<Tensor> + 'a>;

fn main() -> anyhow::Result<()> {
    worker::cpu::keep_freed_memory();
    let args = Args::parse();
    let shapes = if args.shapes.is_empty() {
        // gate/up (SwiGLU's two halves stacked), q/k/v stacked, down, o, and a short batch;
        // 2048³ for the bench's reference rate.
        vec![
            (4000, 576, 3072),
            (8000, 576, 960),
            (4000, 1536, 576),
            (4000, 576, 576),
            (600, 576, 3072),
            (2048, 2048, 2048),
        ]
    } else {
        args.shapes.iter().map(|s| parse_shape(s)).collect::<anyhow::Result<_>>()?
    };
    let dev = &Device::Cpu;
    println!(
        "cpu gemm isa: {}; threads: {}; packed kernels: {:?}",
        worker::cpu::gemm_isa(),
        candle_core::utils::get_num_threads(),
        Isa::available()
    );
    for (m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), dev)?.t()?;
        let mut packed = Vec::new();
        for isa in Isa::available() {
            if let Some(p) = PackedWeight::pack_for(&w, isa)? {
                packed.push((isa, p));
            }
        }
        let mut products: Vec<(String, Product)> = vec![
            ("candle".into(), Box::new(|| matmul::matmul_reference(&x, &w))),
            ("row-blocked gemm".into(), Box::new(|| matmul::matmul(&x, &w))),
        ];
        for (isa, p) in &packed {
            let x = &x;
            products.push((format!("packed {isa:?}"), Box::new(move || p.matmul(x))));
        }
        // The gate/up product as the trace runs it: SwiGLU applied as the tiles leave the
        // kernel (rated by the product's FLOPs), where n splits into whole panels.
        for (isa, p) in &packed {
            let x = &x;
            if p.matmul_silu_mul(&x.narrow(0, 0, 1)?, n / 2)?.is_some() {
                let swiglu = move || -> worker::error::Result<Tensor> {
                    p.matmul_silu_mul(x, n / 2)?.ok_or_else(|| {
                        worker::error::Error::Request("SwiGLU's halves: checked above".into())
                    })
                };
                products.push((format!("SwiGLU {isa:?}"), Box::new(swiglu)));
            }
        }
        let mut rates = vec![Vec::new(); products.len()];
        for round in 0..=args.rounds {
            for (i, (_, product)) in products.iter().enumerate() {
                let start = Instant::now();
                let c = product()?;
                let seconds = start.elapsed().as_secs_f64();
                drop(c);
                // Round 0 warms caches and the allocator.
                if round > 0 {
                    rates[i].push(2.0 * (m * k * n) as f64 / seconds / 1e9);
                }
            }
        }
        let medians: Vec<f64> = rates.into_iter().map(median).collect();
        let gemm = medians[1];
        let line: Vec<String> = products
            .iter()
            .zip(&medians)
            .map(|((name, _), r)| format!("{name} {r:.1} ({:.2}×)", r / gemm))
            .collect();
        println!("{m}×{k}×{n} GFLOP/s, median of {}: {}", args.rounds, line.join(", "));
    }
    Ok(())
}
