//! Sweeps that survive a worker killed mid-job and a coordinator killed mid-sweep: both
//! finish, and every row is in the tables exactly once.

use std::path::Path;
use std::time::Duration;

use e2e::{
    Proc, args, bin, fixture, free_port, knowns_path, manifest, read_tables, status, sweep_dir,
    wait_until,
};

fn coordinator_args(out: &Path, port: u16) -> Vec<String> {
    args(&[
        "run",
        "--knowns",
        knowns_path().to_str().expect("utf8"),
        "--model",
        fixture("tiny/llama").to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--limit",
        "30",
        "--correctness",
        "none",
        "--samples",
        "2",
        "--window",
        "3",
        "--lease-secs",
        "1.5",
        "--flush-secs",
        "0.3",
        "--linger-secs",
        "3",
    ])
}

/// A remote worker whose jobs take at least `delay_ms`, so the test can catch them in flight.
fn worker(port: u16, dir: &Path, tag: &str, delay_ms: u64) -> Proc {
    let a = args(&[
        "serve",
        "--coordinator",
        &format!("http://127.0.0.1:{port}"),
        "--model",
        fixture("tiny/llama").to_str().expect("utf8"),
        "--threads",
        "1",
        "--job-delay-ms",
        &delay_ms.to_string(),
        "--name",
        tag,
    ]);
    Proc::start(&bin("worker"), &a, dir, tag)
}

#[test]
fn a_worker_killed_mid_job_costs_a_retry_not_a_row() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let port = free_port();
    let mut coordinator =
        Proc::start(&bin("coordinator"), &coordinator_args(&out, port), tmp.path(), "coordinator");
    let mut a = worker(port, tmp.path(), "a", 400);
    let mut b = worker(port, tmp.path(), "b", 400);
    // Both workers hold a job (each takes ≥ 400 ms): kill one of them now.
    wait_until(Duration::from_secs(60), "two jobs in flight", || {
        status(port).is_some_and(|s| s["jobs_leased"] == 2 && s["jobs_done"].as_u64() >= Some(2))
    });
    a.kill();

    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert!(b.wait(Duration::from_secs(30)).success(), "worker b: {}", b.stderr());
    let dir = sweep_dir(&out);
    let m = manifest(&dir);
    assert_eq!(m["state"], "finished");
    assert!(m["jobs"]["retries"].as_u64() >= Some(1), "the killed worker's job was retried: {m}");
    assert_eq!(m["jobs"]["failed"], 0);
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 30);
    assert!(tables.errors.is_empty(), "{:?}", tables.errors);
    tables.assert_exactly_once(3, 3);
}

#[test]
fn a_coordinator_killed_mid_sweep_resumes_without_duplicates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let port = free_port();
    let run = coordinator_args(&out, port);
    let mut first = Proc::start(&bin("coordinator"), &run, tmp.path(), "first");
    let mut a = worker(port, tmp.path(), "a", 150);
    let mut b = worker(port, tmp.path(), "b", 150);
    // Kill it once some results are committed and some are only buffered or in flight.
    wait_until(Duration::from_secs(60), "three commits", || {
        std::fs::read_dir(&out)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read_dir(e.path().join("_journal")).ok())
            .is_some_and(|j| j.count() >= 3)
    });
    first.kill();
    let dir = sweep_dir(&out);
    assert_ne!(manifest(&dir)["state"], "finished", "killed before the end");

    let mut second = Proc::start(&bin("coordinator"), &run, tmp.path(), "second");
    assert!(second.wait(Duration::from_secs(120)).success(), "{}", second.stderr());
    assert!(second.stderr().contains("resuming sweep"), "{}", second.stderr());
    assert!(a.wait(Duration::from_secs(30)).success(), "worker a: {}", a.stderr());
    assert!(b.wait(Duration::from_secs(30)).success(), "worker b: {}", b.stderr());
    let m = manifest(&dir);
    assert_eq!(m["state"], "finished");
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 30);
    assert!(tables.errors.is_empty(), "{:?}", tables.errors);
    tables.assert_exactly_once(3, 3);
    assert_eq!(m["rows"]["facts"], 30, "the journal's counts match the tables");
}
