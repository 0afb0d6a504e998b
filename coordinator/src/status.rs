//! `coordinator status`: the live state of a running sweep.

use std::io::Write;

use anyhow::Context;

use crate::cli::StatusArgs;

/// Asks the coordinator at `args.coordinator` and prints its answer.
pub async fn status(args: &StatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let token = proto::auth::Token::configured(args.token_file.as_deref())?;
    let (ca, cert, key) = args.tls.paths();
    let tls = proto::tls::client_config_if(ca, cert, key)?;
    let channel = proto::tls::endpoint(&args.coordinator, tls)
        .map_err(anyhow::Error::msg)?
        .connect()
        .await
        .with_context(|| format!("cannot reach a coordinator at {}", args.coordinator))?;
    let mut client = proto::auth::client(channel, token);
    let s = client.status(proto::StatusRequest {}).await?.into_inner();
    if args.json {
        let value = serde_json::json!({
            "sweep_id": s.sweep_id, "state": s.state, "facts_total": s.facts_total,
            "facts_done": s.facts_done, "jobs_total": s.jobs_total, "jobs_queued": s.jobs_queued,
            "jobs_leased": s.jobs_leased, "jobs_done": s.jobs_done, "jobs_failed": s.jobs_failed,
            "retries": s.retries, "workers": s.workers, "rows_written": s.rows_written,
            "elapsed_s": s.elapsed_s, "out": s.out,
        });
        writeln!(out, "{value}")?;
        return Ok(());
    }
    writeln!(out, "sweep {} ({}), writing to {}", s.sweep_id, s.state, s.out)?;
    writeln!(out, "  facts {}/{} done", s.facts_done, s.facts_total)?;
    writeln!(
        out,
        "  jobs {} total: {} queued, {} in flight, {} done, {} given up; {} retries",
        s.jobs_total, s.jobs_queued, s.jobs_leased, s.jobs_done, s.jobs_failed, s.retries
    )?;
    writeln!(
        out,
        "  workers {}; rows committed {}; running {:.0} s",
        s.workers, s.rows_written, s.elapsed_s
    )?;
    Ok(())
}
