//! The progress bar on a terminal, or a progress line every 10 s in logs (a file, `kubectl
//! logs`): jobs and facts done, the rate, the time left, workers, retries and failures, as
//! fields too, so `--log-json` lines carry them as numbers.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the progress line is logged when there is no bar.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Progress of the sweep's jobs.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    last_line: Option<Instant>,
    /// Jobs finished when this process first saw the sweep, and when: the rate counts only
    /// this run's jobs (a resumed sweep starts with some done).
    start: Option<(u64, Instant)>,
}

/// The rate and time left of a sweep that finished `done` of `total` jobs, `base` of them
/// before `elapsed`: jobs a minute, and seconds left (`None` until a job has finished).
pub fn rate_and_eta(done: u64, base: u64, total: u64, elapsed: Duration) -> (f64, Option<f64>) {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let recent = done.saturating_sub(base) as f64;
    if recent == 0.0 || minutes <= 0.0 {
        return (0.0, None);
    }
    let per_minute = recent / minutes;
    let left = total.saturating_sub(done) as f64;
    (per_minute, Some(60.0 * left / per_minute))
}

/// `1h02m`, `3m05s` or `42s`.
pub fn duration_words(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
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
        Self { bar, last_line: None, start: None }
    }

    /// Shows the current state.
    pub fn update(&mut self, s: &proto::StatusReply) {
        let finished = s.jobs_done + s.jobs_failed;
        let (base, since) = *self.start.get_or_insert((finished, Instant::now()));
        let message = format!(
            "facts {}/{} · in flight {} · workers {} · {}",
            s.facts_done, s.facts_total, s.jobs_leased, s.workers, s.state
        );
        self.bar.set_length(s.jobs_total);
        self.bar.set_position(finished);
        if !self.bar.is_hidden() {
            self.bar.set_message(message);
            return;
        }
        if self.last_line.is_some_and(|t| t.elapsed() < LINE_EVERY) {
            return;
        }
        self.last_line = Some(Instant::now());
        let (per_minute, eta) = rate_and_eta(finished, base, s.jobs_total, since.elapsed());
        let eta_words = eta.map_or_else(|| "unknown".to_string(), duration_words);
        tracing::info!(
            jobs_done = s.jobs_done,
            jobs_failed = s.jobs_failed,
            jobs_total = s.jobs_total,
            facts_done = s.facts_done,
            facts_total = s.facts_total,
            jobs_per_minute = per_minute,
            eta_s = eta,
            workers = s.workers,
            in_flight = s.jobs_leased,
            retries = s.retries,
            state = s.state.as_str(),
            "progress: jobs {finished}/{} · facts {}/{} · {per_minute:.1} jobs/min · ETA {eta_words} · workers {} · in flight {} · retries {} · failed {} · {}",
            s.jobs_total,
            s.facts_done,
            s.facts_total,
            s.workers,
            s.jobs_leased,
            s.retries,
            s.jobs_failed,
            s.state
        );
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_this_runs_jobs_only() {
        // 30 of 100 jobs were done before; 20 more in 2 minutes: 10 a minute, 5 minutes left.
        let (rate, eta) = rate_and_eta(50, 30, 100, Duration::from_secs(120));
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
        assert_eq!(eta.map(f64::round), Some(300.0));
        assert_eq!(rate_and_eta(30, 30, 100, Duration::from_secs(60)), (0.0, None));
    }

    #[test]
    fn durations_read_as_words() {
        assert_eq!(duration_words(42.4), "42s");
        assert_eq!(duration_words(185.0), "3m05s");
        assert_eq!(duration_words(3720.0), "1h02m");
    }
}
