//! Sweeps that survive a worker killed mid-job and a coordinator killed mid-sweep: both
//! finish, and every row is in the tables exactly once.

use std::path::Path;
use std::time::Duration;

use e2e::{
    Proc, args, bin, fixture, free_port, manifest, read_tables, status, sweep_dir, tiny_sweep_args,
    tiny_worker_args, wait_until,
};

/// `lease` is short where a test waits for a dead worker's lease to expire, and long where a
/// spurious expiry (heartbeats delayed on a loaded machine) would break what it checks.
fn coordinator_args(out: &Path, port: u16, lease: &str) -> Vec<String> {
    let mut a = tiny_sweep_args(out, &format!("127.0.0.1:{port}"), 30);
    a.extend(args(&["--lease-secs", lease]));
    a
}

/// A remote worker whose jobs take at least `delay_ms`, so the test can catch them in flight.
fn worker(port: u16, dir: &Path, tag: &str, delay_ms: u64) -> Proc {
    let mut a = tiny_worker_args(&format!("http://127.0.0.1:{port}"), tag);
    a.extend(args(&["--job-delay-ms", &delay_ms.to_string()]));
    Proc::start(&bin("worker"), &a, dir, tag)
}

#[test]
fn a_worker_killed_mid_job_costs_a_retry_not_a_row() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let port = free_port();
    let mut coordinator = Proc::start(
        &bin("coordinator"),
        &coordinator_args(&out, port, "1.5"),
        tmp.path(),
        "coordinator",
    );
    let mut a = worker(port, tmp.path(), "a", 400);
    let mut b = worker(port, tmp.path(), "b", 400);
    // Both workers have done some jobs and a has just started one (each takes ≥ 400 ms):
    // kill it now, with that job in flight.
    wait_until(Duration::from_secs(60), "a job of a's in flight", || {
        status(port).is_some_and(|s| s["jobs_done"].as_u64() >= Some(2))
            && e2e::jobs_in_flight(&a.stderr()).len() == 1
    });
    a.kill();
    let caught = e2e::jobs_in_flight(&a.stderr());
    assert_eq!(caught.len(), 1, "a was computing a job when it died: {caught:?}");

    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert!(b.wait(Duration::from_secs(30)).success(), "worker b: {}", b.stderr());
    let dir = sweep_dir(&out);
    let m = manifest(&dir);
    assert_eq!(m["state"], "finished");
    assert!(m["jobs"]["retries"].as_u64() >= Some(1), "the killed worker's job was retried: {m}");
    let done_by_b = b.stderr().lines().any(|l| l.contains("handed in") && l.contains(&caught[0]));
    assert!(done_by_b, "b computed {} after a died with it", caught[0]);
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
    let run = coordinator_args(&out, port, "1.5");
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

fn sigterm(proc: &Proc) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &proc.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn worker_with_grace(port: u16, dir: &Path, tag: &str, delay_ms: u64, grace: &str) -> Proc {
    let mut a = tiny_worker_args(&format!("http://127.0.0.1:{port}"), tag);
    a.extend(args(&["--job-delay-ms", &delay_ms.to_string(), "--grace-secs", grace]));
    Proc::start(&bin("worker"), &a, dir, tag)
}

#[test]
fn sigterm_finishes_or_releases_the_job_in_hand() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let port = free_port();
    let mut coordinator = Proc::start(
        &bin("coordinator"),
        &coordinator_args(&out, port, "10"),
        tmp.path(),
        "coordinator",
    );
    let leased = |n: u64| move || status(port).is_some_and(|s| s["jobs_leased"] == n);

    // A job that fits in the grace period is finished and handed in.
    let mut a = worker_with_grace(port, tmp.path(), "a", 1500, "10");
    wait_until(Duration::from_secs(60), "a's job in flight", || {
        leased(1)() && e2e::jobs_in_flight(&a.stderr()).len() == 1
    });
    let in_hand = e2e::jobs_in_flight(&a.stderr());
    let done_before = status(port).map_or(0, |s| s["jobs_done"].as_u64().unwrap_or(0));
    sigterm(&a);
    assert!(a.wait(Duration::from_secs(20)).success(), "worker a: {}", a.stderr());
    // a may have finished its first job and leased the next in the instant before the
    // signal landed; either way it leaves nothing in hand and hands in what it held.
    let after = status(port).expect("status after a left");
    let done_after = after["jobs_done"].as_u64().unwrap_or(0);
    assert!(done_after > done_before, "a handed in its job before leaving: {after}");
    let handed_in = a.stderr().lines().any(|l| l.contains("handed in") && l.contains(&in_hand[0]));
    assert!(handed_in, "a finished {} after the signal: {}", in_hand[0], a.stderr());
    assert_eq!(after["jobs_leased"], 0, "a left no lease to expire: {after}");

    // One that does not is released at once, without counting as a failure.
    let mut b = worker_with_grace(port, tmp.path(), "b", 60_000, "0.2");
    wait_until(Duration::from_secs(60), "b's job in flight", || {
        leased(1)() && e2e::jobs_in_flight(&b.stderr()).len() == 1
    });
    let stopped = std::time::Instant::now();
    sigterm(&b);
    assert!(b.wait(Duration::from_secs(20)).success(), "worker b: {}", b.stderr());
    assert!(stopped.elapsed() < Duration::from_secs(5), "b left without waiting for its job");
    assert!(b.stderr().contains("released"), "b gave its job in flight back: {}", b.stderr());
    wait_until(Duration::from_secs(10), "b's job back in the queue", leased(0));

    let mut c = worker(port, tmp.path(), "c", 0);
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert!(c.wait(Duration::from_secs(30)).success(), "worker c: {}", c.stderr());
    let dir = sweep_dir(&out);
    let m = manifest(&dir);
    assert_eq!(m["jobs"]["retries"], 0, "a release is not a failed try: {m}");
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 30);
    tables.assert_exactly_once(3, 3);
}

#[test]
fn health_metrics_and_status_answer_while_waiting_for_workers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let (port, metrics_port) = (free_port(), free_port());
    let mut run = coordinator_args(&out, port, "10");
    run.extend(args(&["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]));
    let coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    wait_until(Duration::from_secs(30), "the coordinator answers", || status(port).is_some());
    let s = status(port).expect("status");
    assert_eq!(s["state"], "waiting for workers", "{s}");
    assert_eq!(s["facts_total"], 30);

    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let serving = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let request =
            tonic_health::pb::HealthCheckRequest { service: "causal_trace.v1.Coordinator".into() };
        health.check(request).await.expect("health check").into_inner().status
    });
    drop(runtime); // closes the channel: a graceful server shutdown waits for open ones
    assert_eq!(serving, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read");
        text
    };
    wait_until(Duration::from_secs(10), "metrics", || {
        get("/metrics").contains("causal_trace_jobs_queued")
    });
    let metrics = get("/metrics");
    for name in [
        "causal_trace_jobs_leased",
        "causal_trace_jobs_done",
        "causal_trace_workers",
        "causal_trace_rows_written_total",
        "causal_trace_job_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert!(get("/healthz").contains("ok"));

    // A worker with another model is refused and says why.
    let a = args(&[
        "serve",
        "--coordinator",
        &format!("http://127.0.0.1:{port}"),
        "--model",
        fixture("tiny/qwen2").to_str().expect("utf8"),
        "--give-up-secs",
        "5",
    ]);
    let mut stranger = Proc::start(&bin("worker"), &a, tmp.path(), "stranger");
    assert!(!stranger.wait(Duration::from_secs(30)).success());
    assert!(stranger.stderr().contains("is not the sweep's"), "{}", stranger.stderr());
    assert_eq!(status(port).expect("status")["workers"], 0);

    let human = std::process::Command::new(bin("coordinator"))
        .args(["status", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .output()
        .expect("status runs");
    assert!(String::from_utf8_lossy(&human.stdout).contains("waiting for workers"));
    // SIGTERM: commits what it has and says how to resume.
    sigterm(&coordinator);
    let mut coordinator = coordinator;
    let exit = coordinator.wait(Duration::from_secs(20));
    assert!(!exit.success());
    assert!(
        coordinator.stderr().contains("run the same command again"),
        "{}",
        coordinator.stderr()
    );
    assert_eq!(manifest(&sweep_dir(&out))["state"], "running");
}

fn storage_fault_args(out: &Path, faults: &str) -> Vec<String> {
    let mut a = coordinator_args(out, free_port(), "10");
    a.extend(args(&["--local-workers", "2", "--worker-threads", "1", "--worker-bin"]));
    a.push(bin("worker").display().to_string());
    a.extend(args(&["--inject-storage-faults", faults]));
    a
}

#[test]
fn storage_faults_are_retried_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    // A third of the store's operations fail once the sweep is under way, half of the
    // failing writes after they landed (the reply lost).
    let run = storage_fault_args(&out, "0.33,after=12,seed=3,lost=0.5");
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    assert!(coordinator.wait(Duration::from_secs(180)).success(), "{}", coordinator.stderr());
    let log = coordinator.stderr();
    let injected: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("storage faults injected: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fault count in {log}"));
    assert!(injected >= 3, "{injected} faults injected");
    assert!(log.contains("failed, retrying"), "{log}");
    let dir = sweep_dir(&out);
    assert_eq!(manifest(&dir)["state"], "finished");
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 30);
    tables.assert_exactly_once(3, 3);
}

#[test]
fn a_store_that_fails_for_good_stops_the_sweep_and_resume_recovers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    // The store breaks for good at its 13th operation. Start-up takes six (listing and
    // clearing the tables, the manifest), and the first commit at most six more (facts,
    // three trace kinds, errors, journal), so one commit always lands first; a fast sweep
    // makes as few as four commits (~28 operations), so a later mark could miss the sweep.
    let mut run = storage_fault_args(&out, "1,after=12");
    run.extend(args(&["--storage-give-up-secs", "1"]));
    let mut broken = Proc::start(&bin("coordinator"), &run, tmp.path(), "broken");
    assert!(!broken.wait(Duration::from_secs(180)).success(), "the sweep stops");
    let log = broken.stderr();
    assert!(log.contains("committing results has failed") && log.contains("resume"), "{log}");
    let dir = sweep_dir(&out);
    let committed = std::fs::read_dir(dir.join("_journal")).map_or(0, |d| d.count());
    assert!(committed >= 1, "some commits went through before the store broke");

    let healthy: Vec<String> = {
        let i = run.iter().position(|a| a == "--inject-storage-faults").expect("flag");
        let mut r = run.clone();
        r.drain(i..i + 2);
        r
    };
    let mut resumed = Proc::start(&bin("coordinator"), &healthy, tmp.path(), "resumed");
    assert!(resumed.wait(Duration::from_secs(180)).success(), "{}", resumed.stderr());
    assert!(resumed.stderr().contains("resuming sweep"), "{}", resumed.stderr());
    assert_eq!(manifest(&dir)["state"], "finished");
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 30);
    tables.assert_exactly_once(3, 3);
}
