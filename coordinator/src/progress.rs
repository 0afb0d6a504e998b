//! The progress bar on a terminal, or a progress line every 10 s in logs.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of the sweep's jobs.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    last_line: Option<Instant>,
}

impl Progress {
    /// A bar on stderr (hidden when stderr is not a terminal).
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs · {msg} · ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar, last_line: None }
    }

    /// Shows the current state.
    pub fn update(&mut self, s: &proto::StatusReply) {
        let message = format!(
            "facts {}/{} · in flight {} · workers {} · {}",
            s.facts_done, s.facts_total, s.jobs_leased, s.workers, s.state
        );
        self.bar.set_length(s.jobs_total);
        self.bar.set_position(s.jobs_done + s.jobs_failed);
        if self.bar.is_hidden() {
            let due = self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
            if due {
                tracing::info!(
                    jobs_done = s.jobs_done,
                    jobs_total = s.jobs_total,
                    "progress: {message}"
                );
                self.last_line = Some(Instant::now());
            }
        } else {
            self.bar.set_message(message);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
