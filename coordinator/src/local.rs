//! `--local-workers N`: worker processes started and watched by the coordinator. They are
//! child processes running the `worker` binary, so the coordinator itself never links the
//! engine. A worker that crashes while the sweep runs is started again (a few times).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// Restarts allowed per worker slot.
pub const MAX_RESTARTS: u32 = 3;

/// How to start one worker.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The `worker` binary.
    pub bin: PathBuf,
    /// The coordinator's URL.
    pub coordinator: String,
    /// The model.
    pub model: String,
    /// Threads per worker.
    pub threads: usize,
    /// dtype.
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The token file, if the token came from one.
    pub token_file: Option<PathBuf>,
    /// Log as JSON lines (the coordinator's `--log-json`).
    pub log_json: bool,
}

impl WorkerCommand {
    fn spawn(&self, slot: usize) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.bin);
        command
            .args(["serve", "--coordinator", &self.coordinator, "--model", &self.model])
            .args(["--threads", &self.threads.to_string(), "--dtype", &self.dtype])
            .args(["--device", &self.device])
            .args(["--name", &format!("local-{slot}")]);
        if let Some(file) = &self.token_file {
            command.arg("--token-file").arg(file);
        }
        if self.log_json {
            command.arg("--log-json");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {}", self.bin.display()))
    }
}

/// The `worker` binary: the given one, the one beside this executable, or `worker` on PATH.
pub fn find_worker_bin(given: Option<&Path>) -> PathBuf {
    if let Some(bin) = given {
        return bin.to_path_buf();
    }
    let name = format!("worker{}", std::env::consts::EXE_SUFFIX);
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Running local workers.
#[derive(Debug)]
pub struct LocalWorkers {
    command: WorkerCommand,
    slots: Vec<(Option<Child>, u32)>,
}

impl LocalWorkers {
    /// Starts `n` workers.
    pub fn start(command: WorkerCommand, n: usize) -> anyhow::Result<Self> {
        let mut slots = Vec::with_capacity(n);
        for slot in 0..n {
            slots.push((Some(command.spawn(slot)?), 0));
        }
        Ok(Self { command, slots })
    }

    /// Restarts workers that died with an error; returns how many are running.
    pub fn watch(&mut self) -> usize {
        let mut running = 0;
        for (slot, (child, restarts)) in self.slots.iter_mut().enumerate() {
            let Some(c) = child else { continue };
            match c.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() => *child = None,
                Ok(Some(status)) => {
                    *child = None;
                    if *restarts < MAX_RESTARTS {
                        *restarts += 1;
                        tracing::warn!(slot, %status, "local worker died; starting it again");
                        match self.command.spawn(slot) {
                            Ok(new) => {
                                *child = Some(new);
                                running += 1;
                            }
                            Err(e) => tracing::error!("{e:#}"),
                        }
                    } else {
                        tracing::error!(slot, %status, "local worker died {MAX_RESTARTS} times; not restarting it");
                    }
                }
                Err(e) => tracing::warn!(slot, "cannot check local worker: {e}"),
            }
        }
        running
    }

    /// Waits up to `grace` for the workers to exit (they do once told the sweep is
    /// finished), then kills the rest.
    pub async fn stop(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for (child, _) in &mut self.slots {
            let Some(c) = child else { continue };
            if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}
