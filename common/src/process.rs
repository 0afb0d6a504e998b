//! What both binaries do around their commands: logging to stderr, and turning an error chain
//! into one line and an exit code.

use tracing_subscriber::EnvFilter;

/// Logs to stderr (`RUST_LOG`, default `warn`), as JSON lines when `json` is set. Colours
/// only on a terminal: a log file or `kubectl logs` gets plain text.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
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
