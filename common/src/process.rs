//! What both binaries do around their commands: logging to stderr, and turning an error chain
//! into one line and an exit code.

use tracing_subscriber::EnvFilter;

/// What a run logs when `RUST_LOG` says nothing: on a terminal only warnings (the
/// coordinator's progress bar shows the rest); elsewhere (a file, `kubectl logs`) also this
/// project's own info lines, so that a sweep's progress and a worker's jobs show up in any log.
pub fn default_log_filter(terminal: bool) -> &'static str {
    match terminal {
        true => "warn",
        false => "warn,coordinator=info,worker=info,common=info,proto=info",
    }
}

/// Logs to stderr (`RUST_LOG`, default [`default_log_filter`]), as JSON lines when `json` is
/// set. Colours only on a terminal: a log file or `kubectl logs` gets plain text.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_log_filter(terminal)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The exit code of a command; an error prints its whole chain on one line ("loading x:
/// missing tensor y" says what and where).
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}
