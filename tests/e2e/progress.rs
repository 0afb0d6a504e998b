//! A sweep shows its progress in any log: with stderr in a file (as under `nohup` or in a
//! Kubernetes pod) and no `RUST_LOG`, the coordinator logs a progress line at a steady
//! interval and each local worker says what it runs and which job it computes; with
//! `--log-json` the same lines (the local workers' too) are JSON objects whose fields carry
//! the numbers.

use std::time::Duration;

use e2e::{Proc, args, bin, manifest, sweep_dir, tiny_sweep_args};

/// A 6-fact tiny sweep with one local worker, run as a user runs it; returns its stderr.
fn sweep_log(extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let mut run = tiny_sweep_args(&out, "127.0.0.1:0", 6);
    run.extend(args(&["--local-workers", "1", "--worker-threads", "1", "--worker-bin"]));
    run.push(bin("worker").display().to_string());
    run.extend(args(extra));
    let mut coordinator = Proc::start_default_log(&bin("coordinator"), &run, tmp.path(), "run");
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(status.success(), "{}", coordinator.stderr());
    assert_eq!(manifest(&sweep_dir(&out))["state"], "finished");
    coordinator.stderr()
}

#[test]
fn a_sweep_logged_to_a_file_shows_progress_and_what_workers_do() {
    let log = sweep_log(&[]);
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("progress: jobs")).collect();
    assert!(!progress.is_empty(), "no progress line in:\n{log}");
    for needle in ["jobs/min", "ETA", "workers", "retries", "facts"] {
        assert!(progress[0].contains(needle), "{needle} missing from {:?}", progress[0]);
    }
    // The local worker logs into the same file: what it loaded, and each job.
    assert!(log.contains("worker local-0 ready"), "{log}");
    assert!(log.contains("on cpu in f32, 1 threads"), "{log}");
    assert!(log.contains("computing: fact"), "{log}");
    assert!(log.contains("handed in"), "{log}");
}

#[test]
fn log_json_progress_lines_carry_the_numbers_as_fields() {
    let log = sweep_log(&["--log-json"]);
    let lines: Vec<serde_json::Value> =
        log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let progress: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| {
            v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("progress: jobs"))
        })
        .collect();
    assert!(!progress.is_empty(), "no JSON progress line in:\n{log}");
    let fields = &progress[0]["fields"];
    for key in ["jobs_done", "jobs_total", "facts_done", "facts_total", "workers", "retries"] {
        assert!(fields[key].is_u64(), "{key} is not a number in {fields}");
    }
    assert!(fields["jobs_total"].as_u64() > Some(0), "{fields}");
    assert_eq!(progress[0]["level"], "INFO");
    // The local workers log in JSON too, into the same stream.
    let message = |v: &serde_json::Value, start: &str| {
        v["fields"]["message"].as_str().is_some_and(|m| m.starts_with(start))
    };
    assert!(lines.iter().any(|v| message(v, "worker local-0 ready")), "{log}");
    assert!(lines.iter().any(|v| message(v, "computing: fact")), "{log}");
}
