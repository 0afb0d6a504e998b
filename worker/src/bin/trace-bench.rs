//! `trace-bench`: times the naive and the fast causal trace on real facts in one run.
//!
//! For each of the first N facts of a knowns file that the model predicts (first-token rule),
//! it traces the experiment's kinds (ROME's three by default; any `worker trace` flag) with
//! both paths and prints the seconds, the speed-up, the FLOPs each
//! path performs, the FLOP ratio, and each path's achieved GFLOP/s next to the machine's f32
//! GEMM rate measured in the same run (a large product through candle's matmul and through the
//! worker's, the higher of the two). It also checks that the two
//! paths agree. Not a test: timings on shared machines are noisy, ratios within one run less so.
//!
//! With a Python that has torch and transformers (`--rome-python`; by default the golden
//! venv of tools/golden-requirements.txt when it exists) and a GGUF model or a Hugging Face
//! folder, it also runs ROME's own code (tools/rome_bench.py) on each fact right after ours,
//! on the same threads or the same GPU in the same dtype, and prints the ratio, and PyTorch's
//! GEMM rate next to candle's: the fast path's share is taken of the higher of the two.
//! ROME's code traces ROME's experiment; `--correctness none` is allowed beside it (ROME's
//! code traces every fact it is given), for random models that predict nothing
//! (tools/random_model.py).
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p worker --bin trace-bench -- \
//!         --model "$(scripts/fetch-model.sh)" --knowns ../shared/data/known_1000.json --facts 5

use std::io::{BufRead, BufReader, Write};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use common::dataset::read_knowns_file;
use common::donor::Relations;
use common::experiment::{Experiment, Resolved};
use common::flags::ExperimentFlags;
use common::settings::Correctness;
use worker::bench::median;
use worker::cli::ModelArgs;
use worker::models::matmul;
use worker::models::packed::PackedWeight;
use worker::trace::cost::{fast_flops, model_cost, naive_flops};
use worker::trace::noise::embedding_std;
use worker::trace::{FactInput, Path, TraceOptions, trace_fact};

#[derive(Debug, Parser)]
#[command(about = "Times naive and fast causal tracing on real facts")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Knowns file; the first facts the model predicts are traced.
    #[arg(long)]
    knowns: PathBuf,
    /// How many facts.
    #[arg(long, default_value_t = 5)]
    facts: usize,
    /// Trace these known_ids instead of the first predicted facts.
    #[arg(long, value_delimiter = ',')]
    known_ids: Vec<u64>,
    /// The experiment (ROME's by default: hidden, mlp, attn; s3 noise; 10 samples).
    #[command(flatten)]
    experiment: ExperimentFlags,
    /// Skip the naive path (to profile the fast one).
    #[arg(long)]
    fast_only: bool,
    /// Write the per-fact figures as JSON lines here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Python with torch and transformers to run ROME's own code on each fact too (default:
    /// ~/.cache/causal-trace/golden/bin/python when it exists).
    #[arg(long)]
    rome_python: Option<PathBuf>,
    /// Fast path memory bound (default: the device's, as `worker trace`).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Traced tokens per batched forward (default: 1 on a CPU, all on a GPU).
    #[arg(long)]
    tokens_per_batch: Option<usize>,
    /// Do not run ROME's code even when its Python is present.
    #[arg(long)]
    no_rome: bool,
}

/// ROME's own code (tools/rome_bench.py), loaded once and fed one known_id at a time.
struct Rome {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// ROME's timing of one fact.
struct RomeFact {
    seconds: f64,
    gemm_gflops: f64,
    answer: String,
}

impl Rome {
    fn start(
        python: &FsPath,
        model: &ModelArgs,
        knowns: &FsPath,
        level: f64,
        threads: usize,
    ) -> anyhow::Result<Self> {
        // The checkout it runs in first: a binary built elsewhere (the CUDA build carried to
        // a GPU machine) has a build path that does not exist there.
        let here = FsPath::new("tools/rome_bench.py");
        let script = match here.exists() {
            true => here.to_path_buf(),
            false => FsPath::new(env!("CARGO_MANIFEST_DIR")).join("../tools/rome_bench.py"),
        };
        let mut child = Command::new(python)
            .arg(&script)
            .arg("--model")
            .arg(&model.model)
            .args(["--device", &model.device, "--dtype", &model.dtype])
            .args(model.tf32.then_some("--tf32"))
            .arg("--knowns")
            .arg(knowns)
            .arg("--noise-level")
            .arg(level.to_string())
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("ROME's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("ROME's stdout")?);
        let mut rome = Self { child, stdin, stdout };
        let ready = rome.line()?;
        println!("ROME's code: {ready}");
        Ok(rome)
    }

    fn line(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            anyhow::bail!("tools/rome_bench.py exited (its stderr is above)");
        }
        serde_json::from_str(&line).with_context(|| format!("tools/rome_bench.py said {line:?}"))
    }

    fn trace(&mut self, known_id: u64) -> anyhow::Result<RomeFact> {
        writeln!(self.stdin, "{known_id}")?;
        self.stdin.flush()?;
        let v = self.line()?;
        let num =
            |k: &str| v[k].as_f64().with_context(|| format!("tools/rome_bench.py: no {k} in {v}"));
        Ok(RomeFact {
            seconds: num("seconds")?,
            gemm_gflops: num("gemm_gflops")?,
            answer: v["answer"].as_str().unwrap_or_default().to_string(),
        })
    }
}

impl Drop for Rome {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python to run ROME's code with, if any.
fn rome_python(args: &Args) -> Option<PathBuf> {
    let path = &args.model.model;
    if args.no_rome || !(path.is_dir() || path.extension().is_some_and(|e| e == "gguf")) {
        return None;
    }
    args.rome_python.clone().or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        let python = cache.join("causal-trace/golden/bin/python");
        python.exists().then_some(python)
    })
}

/// GEMM rate of the model's device in its dtype right now: the median of seven 2048³
/// products, 8192³ on a GPU (shared machines drift by ±20% over minutes, so it is measured
/// next to each fact), through candle's matmul and through the worker's own (row blocks on
/// the CPU, and the packed kernel where the CPU runs it, its packing not timed, as a layer's
/// weight is packed at load), whichever is highest. Reading the sum back waits for the device.
fn gemm_gflops(device: &Device, dtype: DType) -> anyhow::Result<f64> {
    let n = if device.is_cpu() { 2048 } else { 8192 };
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let packed = PackedWeight::pack(&b)?;
    let mut products: Vec<Box<dyn Fn() -> worker::error::Result<Tensor>>> =
        vec![Box::new(|| matmul::matmul_reference(&a, &b)), Box::new(|| matmul::matmul(&a, &b))];
    if let Some(p) = &packed {
        products.push(Box::new(|| p.matmul(&a)));
    }
    let mut best = 0f64;
    for product in products {
        product()?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        let mut rates = Vec::new();
        for _ in 0..7 {
            let start = Instant::now();
            let c = product()?;
            c.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            rates.push(2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64() / 1e9);
        }
        best = best.max(median(rates));
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    worker::cpu::keep_freed_memory();
    let args = Args::parse();
    let threads = candle_core::utils::get_num_threads();
    let loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer()?;
    let knowns = read_knowns_file(&args.knowns)?;
    let subjects: Vec<&str> = knowns.facts.iter().map(|f| f.subject.as_str()).collect();
    let experiment = args.experiment.experiment()?;
    let noise = match experiment.noise() {
        Some(rule) => {
            let std = match rule.needs_calibration() {
                true => Some(embedding_std(&loaded.model, tokenizer, &subjects)?),
                false => None,
            };
            Some(rule.resolve(std)?)
        }
        None => None,
    };
    let exp = Resolved::new(experiment, noise)?;
    let opts = TraceOptions::for_device(
        loaded.model.device(),
        args.max_batch_tokens,
        args.tokens_per_batch,
    );
    let cost = model_cost(&loaded.model);

    let (device, dtype) = (loaded.model.device().clone(), args.model.load_options()?.dtype);
    let corruption = exp.noise.map_or("STR".into(), |n| format!("noise level {:.4}", n.level));
    println!(
        "threads {threads}, {corruption}; batches of {} states, {} tokens each; GEMM: the best {dtype:?} rate of candle's matmul and the worker's on {} ({} kernels on a CPU), measured just before and after each fast trace",
        opts.max_batch_tokens,
        match opts.tokens_per_batch {
            usize::MAX => "all".to_string(),
            n => n.to_string(),
        },
        args.model.device,
        worker::cpu::gemm_isa()
    );
    // ROME's code traces ROME's experiment only: the default flags, or every fact.
    let romes =
        [Experiment::rome(), Experiment { correctness: Correctness::None, ..Experiment::rome() }];
    let mut rome = match (rome_python(&args), exp.noise) {
        (Some(python), Some(noise)) if romes.contains(&exp.experiment) => {
            Some(Rome::start(&python, &args.model, &args.knowns, noise.level, threads)?)
        }
        _ => None,
    };
    let columns = [
        "fact",
        "T",
        "b..e",
        "naive s",
        "fast s",
        "speedup",
        "naive TF",
        "fast TF",
        "FLOPx",
        "naiveGF",
        "fastGF",
        "GEMM",
        "fast%",
        "eff",
        "max|diff|",
        "layers",
        "ROME s",
        "xROME",
        "torchGF",
    ];
    let widths = [6, 3, 5, 9, 8, 7, 9, 9, 6, 7, 7, 6, 6, 5, 9, 6, 8, 6, 7];
    let header: Vec<String> = columns.iter().zip(widths).map(|(c, w)| format!("{c:>w$}")).collect();
    println!("{}", header.join(" "));
    let mut out = match &args.json_out {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let (mut efficiencies, mut fast_shares, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut vs_rome = Vec::new();
    let mut done = 0;
    let relations = Relations::new(&knowns.facts);
    for (i, fact) in knowns.facts.iter().enumerate() {
        if done == args.facts {
            break;
        }
        if !args.known_ids.is_empty() && !args.known_ids.contains(&fact.known_id) {
            continue;
        }
        let input = FactInput {
            known_id: fact.known_id,
            prompt: &fact.prompt,
            subject: &fact.subject,
            expect: Some(&fact.attribute),
            candidates: &relations.candidates(&knowns.facts, i),
        };
        let gemm_before = gemm_gflops(&device, dtype)?;
        let start = Instant::now();
        let calls_before = worker::forward::layer_calls();
        let fast = trace_fact(&loaded.model, tokenizer, &input, &exp, &opts, Path::Fast)?;
        let fast_s = start.elapsed().as_secs_f64();
        let layer_calls = worker::forward::layer_calls() - calls_before;
        if !fast.traced() {
            continue;
        }
        let gemm = (gemm_before + gemm_gflops(&device, dtype)?) / 2.0;
        done += 1;
        let t_len = fast.tokens.len();
        let (b, e) = fast.subject_range;
        let fast_tf =
            fast_flops(&cost, &exp.experiment, t_len, (b, e), opts.tokens_per_batch) / 1e12;
        let naive_tf = naive_flops(&cost, &exp.experiment, t_len, (b, e)) / 1e12;
        let (naive_s, max_diff) = if args.fast_only {
            (f64::NAN, f32::NAN)
        } else {
            let start = Instant::now();
            let naive = trace_fact(&loaded.model, tokenizer, &input, &exp, &opts, Path::Naive)?;
            let secs = start.elapsed().as_secs_f64();
            let diff = naive
                .scores
                .iter()
                .flat_map(|(k, table)| table.computed().map(move |(cell, v)| (k, cell, v)))
                .map(|(k, cell, v)| (v - fast.scores[k].get(cell)).abs())
                .fold((naive.low_score - fast.low_score).abs(), f32::max);
            (secs, diff)
        };
        let rome_fact = match rome.as_mut() {
            Some(r) => Some(r.trace(fact.known_id)?),
            None => None,
        };
        if let Some(r) = rome_fact.as_ref().filter(|r| r.answer != fast.answer) {
            println!(
                "  ROME's code predicted {:?} where ours predicted {:?}",
                r.answer, fast.answer
            );
        }
        let (rome_s, torch_gemm) =
            rome_fact.as_ref().map_or((f64::NAN, f64::NAN), |r| (r.seconds, r.gemm_gflops));
        // The best GEMM rate measured in this run: candle's, or PyTorch's when it ran.
        let gemm = gemm.max(torch_gemm);
        let speedup = naive_s / fast_s;
        let flop_ratio = naive_tf / fast_tf;
        let (naive_gf, fast_gf) = (naive_tf * 1e3 / naive_s, fast_tf * 1e3 / fast_s);
        let efficiency = speedup / flop_ratio;
        let fast_share = fast_gf / gemm;
        println!(
            "{:>6} {:>3} {:>5} {:>9.1} {:>8.1} {:>7.2} {:>9.2} {:>9.2} {:>6.2} {:>7.1} {:>7.1} {:>6.1} {:>5.0}% {:>5.2} {:>9.1e} {:>6} {:>8.1} {:>6.2} {:>7.1}",
            fact.known_id,
            t_len,
            format!("{b}..{e}"),
            naive_s,
            fast_s,
            speedup,
            naive_tf,
            fast_tf,
            flop_ratio,
            naive_gf,
            fast_gf,
            gemm,
            100.0 * fast_share,
            efficiency,
            max_diff,
            layer_calls,
            rome_s,
            rome_s / fast_s,
            torch_gemm
        );
        if let Some(f) = out.as_mut() {
            use std::io::Write;
            let record = serde_json::json!({
                "known_id": fact.known_id, "tokens": t_len, "subject_range": [b, e], "threads": threads,
                "naive_seconds": naive_s, "fast_seconds": fast_s, "speedup": speedup,
                "naive_tflop": naive_tf, "fast_tflop": fast_tf, "flop_ratio": flop_ratio,
                "naive_gflops": naive_gf, "fast_gflops": fast_gf, "gemm_gflops": gemm, "fast_share_of_gemm": fast_share, "max_abs_diff": max_diff,
                "layer_calls": layer_calls, "tokens_per_batch": opts.tokens_per_batch.min(t_len), "max_batch_tokens": opts.max_batch_tokens, "rome_seconds": rome_s, "torch_gemm_gflops": torch_gemm,
                "gemm_isa": worker::cpu::gemm_isa(),
            });
            writeln!(f, "{record}")?;
        }
        efficiencies.push(efficiency);
        fast_shares.push(fast_share);
        ratios.push(flop_ratio);
        vs_rome.push(rome_s / fast_s);
    }
    println!(
        "median over {done} facts: FLOP ratio {:.2}, speed-up / FLOP ratio {:.2}, fast path at {:.0}% of the GEMM rate",
        median(ratios),
        median(efficiencies),
        100.0 * median(fast_shares)
    );
    if rome.is_some() {
        println!(
            "median over {done} facts: fast path {:.2}x faster than ROME's code",
            median(vs_rome)
        );
    }
    Ok(())
}
