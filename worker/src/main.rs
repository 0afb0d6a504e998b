//! `worker`: the causal-tracing worker binary. Parses the command line, sets up logging and
//! hands over to the library.

use clap::Parser;
use worker::cli::{Cli, Command, run_noise_level, run_predict, run_serve, run_trace};

fn main() -> std::process::ExitCode {
    worker::cpu::keep_freed_memory();
    let cli = Cli::parse();
    if let Command::Serve(args) = &cli.command
        && let Some(threads) = args.threads
    {
        // candle sizes its GEMM parallelism from RAYON_NUM_THREADS. SAFETY: set before
        // any other thread exists (the async runtime starts later).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
    }
    common::process::init_logging(cli.log_json);
    let result = match &cli.command {
        Command::Predict(args) => run_predict(args, &mut std::io::stdout().lock()),
        Command::Trace(args) => run_trace(args, &mut std::io::stdout().lock()),
        Command::NoiseLevel(args) => run_noise_level(args, &mut std::io::stdout().lock()),
        Command::Serve(args) => run_serve(args),
    };
    common::process::exit_code(result)
}
