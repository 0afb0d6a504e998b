//! `coordinator`: runs causal-tracing sweeps. Shards a knowns dataset into jobs, leases them
//! to workers over gRPC, and writes the Parquet tables exactly once. See ARCHITECTURE.md.

mod aggregate;
mod cli;
mod drive;
mod journal;
mod local;
mod manifest;
mod metrics;
mod progress;
mod results;
mod run;
mod scheduler;
mod server;
mod service;
mod status;
mod writer;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    common::process::init_logging(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(*args, cli.log_json).await,
            Command::Status(args) => status::status(&args, &mut std::io::stdout().lock()).await,
            Command::Aggregate(args) => {
                aggregate::aggregate(&args, &mut std::io::stdout().lock()).await
            }
        }
    });
    common::process::exit_code(result)
}
