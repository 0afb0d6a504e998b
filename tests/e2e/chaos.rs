//! The fault-injection run (a test, not timed; prints figures): sweeps of the tiny model on
//! real coordinator and worker processes through more than 1,000 injected faults in all:
//!
//! - workers killed (SIGKILL) mid-sweep, and replaced;
//! - workers hung (SIGSTOP for longer than their lease, then SIGCONT: they wake up holding
//!   a job that has gone to another worker);
//! - the coordinator killed (SIGKILL, or SIGTERM) and started again with the same command;
//! - connections between workers and coordinator cut by a proxy in this test;
//! - object-store operations failing, before the write or after it with the reply lost.
//!
//! Faults come at random times at fixed rates, so how many one sweep meets depends on how
//! fast the machine and the engine are: when a sweep ends below 1,000, another sweep (a new
//! output folder, the same facts) runs on under the same faults, until the total reaches it.
//! At the end of each, every row is in its tables exactly once and equals the same row of a
//! sweep run without faults, bit for bit: both sweeps compute the same jobs with the same binary
//! on one thread each, so any difference would be a row from the wrong job or a corrupted
//! one, not rounding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{
    Proc, args, bin, free_port, manifest, read_tables, sweep_dir, tiny_sweep_args, tiny_worker_args,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};

/// Facts of the sweep; with one layer per job, three jobs each.
const FACTS: u32 = 400;
const WORKERS: usize = 4;
const MIN_FAULTS: u64 = 1_000;
/// Seconds a lease lasts without a heartbeat; hangs last longer.
const LEASE: f64 = 1.0;
/// A connection is cut this often.
const CUT_EVERY: Duration = Duration::from_millis(150);
/// Share of store operations that fail, and of failing writes that land anyway.
const STORE_FAULTS: &str = "0.2,lost=0.5";

fn sweep_args(out: &Path, port: u16) -> Vec<String> {
    let mut a = tiny_sweep_args(out, &format!("127.0.0.1:{port}"), FACTS);
    a.extend(args(&["--layers-per-job", "1", "--max-attempts", "1000"]));
    a.extend(args(&["--lease-secs", &LEASE.to_string()]));
    a
}

fn chaos_coordinator(out: &Path, port: u16, dir: &Path, run: u64) -> Proc {
    let mut a = sweep_args(out, port);
    a.extend(args(&["--inject-storage-faults", &format!("{STORE_FAULTS},seed={run}")]));
    Proc::start(&bin("coordinator"), &a, dir, &format!("coordinator-{run}"))
}

fn chaos_worker(proxy: u16, dir: &Path, n: usize) -> Proc {
    let tag = format!("worker-{n}");
    let mut a = tiny_worker_args(&format!("http://127.0.0.1:{proxy}"), &tag);
    // Jobs of the tiny model take a few milliseconds; holding each a little longer lets
    // kills and hangs land mid-job.
    a.extend(args(&["--job-delay-ms", "20", "--give-up-secs", "600"]));
    Proc::start(&bin("worker"), &a, dir, &tag)
}

fn signal(proc: &Proc, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &proc.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig}");
}

/// A TCP proxy from `listener` to the coordinator's port that cuts a random open connection
/// every `CUT_EVERY`; counts the cuts.
async fn proxy(listener: TcpListener, upstream: u16, cuts: Arc<AtomicU64>) {
    let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
    let cutter = {
        let open = open.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(7);
            loop {
                tokio::time::sleep(CUT_EVERY).await;
                let mut open = open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                open.retain(|h| !h.is_finished());
                if !open.is_empty() {
                    let i = rng.random_range(0..open.len());
                    // Dropping both sockets: the worker sees its connection closed.
                    open.swap_remove(i).abort();
                    cuts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    tokio::spawn(cutter);
    while let Ok((mut client, _)) = listener.accept().await {
        let pipe = tokio::spawn(async move {
            // The coordinator may be down (restarting): the worker sees a refused connection.
            if let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
        open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pipe.abort_handle());
    }
}

/// Lines of the logs in `dir` starting with `coordinator-` that contain `needle`.
fn count_in_coordinator_logs(dir: &Path, needle: &str) -> u64 {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("coordinator-") && name.ends_with(".err") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            n += text.lines().filter(|l| l.contains(needle)).count() as u64;
        }
    }
    n
}

enum Slot {
    Empty,
    Running(Proc),
    Hung(Proc, Instant),
}

#[derive(Default, Debug)]
struct Injected {
    worker_kills: u64,
    /// Of the kills, those that caught the worker computing a job (its log says so).
    kills_mid_job: u64,
    worker_hangs: u64,
    /// Of the hangs, those that froze a job in flight.
    hangs_mid_job: u64,
    coordinator_kills: u64,
    coordinator_terms: u64,
    cuts: u64,
    store: u64,
}

impl Injected {
    fn total(&self) -> u64 {
        self.worker_kills
            + self.worker_hangs
            + self.coordinator_kills
            + self.coordinator_terms
            + self.cuts
            + self.store
    }
}

/// The sweep without faults, with two local workers.
fn reference_sweep(dir: &Path) -> PathBuf {
    let out = dir.join("reference");
    let mut a = sweep_args(&out, free_port());
    a.extend(args(&["--local-workers", "2", "--worker-threads", "1", "--worker-bin"]));
    a.push(bin("worker").display().to_string());
    let mut run = Proc::start(&bin("coordinator"), &a, dir, "reference");
    assert!(run.wait(Duration::from_secs(600)).success(), "{}", run.stderr());
    sweep_dir(&out)
}

/// The fault injector: worker slots, fault clocks and counts, across the sweeps of a run.
struct Chaos {
    dir: PathBuf,
    port: u16,
    proxy_port: u16,
    rng: StdRng,
    injected: Injected,
    /// Coordinator processes started so far (their logs are `coordinator-<run>`).
    runs: u64,
    spawned: usize,
    slots: Vec<Slot>,
    next_kill: Instant,
    next_hang: Instant,
    next_restart: Instant,
}

fn after(rng: &mut StdRng, lo: f64, hi: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(rng.random_range(lo..hi))
}

impl Chaos {
    fn new(dir: &Path, port: u16, proxy_port: u16) -> Self {
        let mut rng = StdRng::seed_from_u64(2022);
        let (next_kill, next_hang) = (after(&mut rng, 0.5, 1.5), after(&mut rng, 0.5, 1.5));
        let next_restart = after(&mut rng, 6.0, 10.0);
        Self {
            dir: dir.to_path_buf(),
            port,
            proxy_port,
            rng,
            injected: Injected::default(),
            runs: 0,
            spawned: 0,
            slots: (0..WORKERS).map(|_| Slot::Empty).collect(),
            next_kill,
            next_hang,
            next_restart,
        }
    }

    fn worker(&mut self) -> Proc {
        self.spawned += 1;
        chaos_worker(self.proxy_port, &self.dir, self.spawned)
    }

    fn coordinator(&mut self, out: &Path) -> Proc {
        let proc = chaos_coordinator(out, self.port, &self.dir, self.runs);
        self.runs += 1;
        proc
    }

    /// Starts a worker in every empty slot: at a sweep's start, and whenever a coordinator
    /// starts again. A worker told "finished" exits, but the coordinator that told it can die
    /// before its last commit lands, and the one that resumes the sweep then needs workers
    /// again (as a Deployment restarts pods that exit).
    fn fill(&mut self) {
        for i in 0..WORKERS {
            if matches!(self.slots[i], Slot::Empty) {
                self.slots[i] = Slot::Running(self.worker());
            }
        }
    }

    /// One sweep into `out`, under faults, until its coordinator finishes it.
    fn sweep(&mut self, out: &Path, started: Instant) {
        let mut coordinator = self.coordinator(out);
        self.fill();
        loop {
            assert!(started.elapsed() < Duration::from_secs(900), "the sweeps did not finish");
            if let Some(status) = coordinator.child.try_wait().expect("try_wait") {
                assert!(status.success(), "the coordinator failed:\n{}", coordinator.stderr());
                return;
            }
            let now = Instant::now();
            for (i, slot) in self.slots.iter_mut().enumerate() {
                *slot = match std::mem::replace(slot, Slot::Empty) {
                    Slot::Hung(proc, until) if now >= until => {
                        signal(&proc, "-CONT");
                        Slot::Running(proc)
                    }
                    Slot::Running(mut proc) => match proc.child.try_wait().expect("try_wait") {
                        // Told that the sweep is finished, while the coordinator lingers.
                        Some(status) if status.success() => Slot::Empty,
                        Some(status) => {
                            panic!("worker slot {i} failed ({status}):\n{}", proc.stderr())
                        }
                        None => Slot::Running(proc),
                    },
                    other => other,
                };
            }
            if now >= self.next_kill {
                let i = self.rng.random_range(0..WORKERS);
                if let Slot::Running(proc) = &mut self.slots[i] {
                    proc.kill();
                    self.injected.worker_kills += 1;
                    self.injected.kills_mid_job +=
                        u64::from(!e2e::jobs_in_flight(&proc.stderr()).is_empty());
                    self.slots[i] = Slot::Running(self.worker());
                }
                self.next_kill = after(&mut self.rng, 0.5, 1.5);
            }
            if now >= self.next_hang {
                let i = self.rng.random_range(0..WORKERS);
                self.slots[i] = match std::mem::replace(&mut self.slots[i], Slot::Empty) {
                    Slot::Running(proc) => {
                        signal(&proc, "-STOP");
                        self.injected.worker_hangs += 1;
                        let in_flight = !e2e::jobs_in_flight(&proc.stderr()).is_empty();
                        self.injected.hangs_mid_job += u64::from(in_flight);
                        Slot::Hung(proc, after(&mut self.rng, LEASE + 0.5, LEASE + 1.5))
                    }
                    other => other,
                };
                self.next_hang = after(&mut self.rng, 0.5, 1.5);
            }
            if now >= self.next_restart {
                if self.rng.random_bool(0.3) {
                    // SIGTERM: it commits what it has and exits (non-zero: interrupted).
                    signal(&coordinator, "-TERM");
                    let _ = coordinator.wait(Duration::from_secs(120));
                    self.injected.coordinator_terms += 1;
                } else {
                    coordinator.kill();
                    self.injected.coordinator_kills += 1;
                }
                coordinator = self.coordinator(out);
                self.fill();
                self.next_restart = after(&mut self.rng, 6.0, 10.0);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        for slot in &mut self.slots {
            match slot {
                Slot::Running(p) => p.kill(),
                Slot::Hung(p, _) => {
                    signal(p, "-CONT");
                    p.kill();
                }
                Slot::Empty => {}
            }
        }
    }
}

#[test]
fn a_thousand_faults_and_every_row_exactly_once() {
    let mut tmp = tempfile::tempdir().expect("tempdir");
    // CT_KEEP_CHAOS keeps the logs and tables for a look after a failure.
    tmp.disable_cleanup(std::env::var_os("CT_KEEP_CHAOS").is_some());
    let dir = tmp.path();
    let (port, proxy_port) = (free_port(), free_port());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let cuts = Arc::new(AtomicU64::new(0));
    let listener =
        runtime.block_on(TcpListener::bind(("127.0.0.1", proxy_port))).expect("the proxy listens");
    runtime.spawn(proxy(listener, port, cuts.clone()));

    let started = Instant::now();
    let mut chaos = Chaos::new(dir, port, proxy_port);
    let mut outs = Vec::new();
    loop {
        let out = dir.join(format!("out-{}", outs.len()));
        chaos.sweep(&out, started);
        outs.push(out);
        chaos.injected.cuts = cuts.load(Ordering::Relaxed);
        chaos.injected.store = count_in_coordinator_logs(dir, "storage fault injected");
        if chaos.injected.total() >= MIN_FAULTS {
            break;
        }
    }
    let elapsed = started.elapsed();
    chaos.stop();
    let (runs, mut injected) = (chaos.runs, std::mem::take(&mut chaos.injected));
    injected.cuts = cuts.load(Ordering::Relaxed);
    injected.store = count_in_coordinator_logs(dir, "storage fault injected");
    let lost_replies = count_in_coordinator_logs(dir, "(done, reply lost)");
    let resumes = count_in_coordinator_logs(dir, "jobs committed in");
    eprintln!("after {:.0} s: {injected:?}, {} in all", elapsed.as_secs_f64(), injected.total());

    // The fault-free sweep: the same facts, the same errors (the tiny model's tokenizer
    // cannot place a few non-ASCII subjects), the same scores.
    let reference_dir = reference_sweep(dir);
    let reference = read_tables(&reference_dir);
    reference.assert_exactly_once(3, 3);
    let r = manifest(&reference_dir);
    let facts = |t: &e2e::Tables| {
        let mut ids: Vec<u64> = t.facts.iter().map(|f| f.known_id).collect();
        ids.sort_unstable();
        ids
    };
    let errors = |t: &e2e::Tables| {
        let mut e: Vec<String> = t.errors.iter().map(|e| format!("{e:?}")).collect();
        e.sort();
        e
    };
    let expected: HashMap<_, _> = reference
        .traces
        .iter()
        .map(|r| ((r.known_id, r.kind, r.token, r.layer), r.score.to_bits()))
        .collect();
    let (mut rows, mut m) = (0, serde_json::Value::Null);
    for out in &outs {
        let chaos = sweep_dir(out);
        m = manifest(&chaos);
        assert_eq!(m["state"], "finished", "{m}");
        assert_eq!(
            (&m["jobs"]["done"], &m["jobs"]["failed"]),
            (&r["jobs"]["done"], &r["jobs"]["failed"])
        );
        assert_eq!(m["rows"], r["rows"], "the journal's counts");
        let tables = read_tables(&chaos);
        rows = tables.assert_exactly_once(3, 3);
        assert_eq!(facts(&tables), facts(&reference));
        assert_eq!(errors(&tables), errors(&reference));
        assert_eq!(expected.len(), rows, "both sweeps have the same rows");
        for r in &tables.traces {
            let key = (r.known_id, r.kind, r.token, r.layer);
            assert_eq!(expected.get(&key), Some(&r.score.to_bits()), "{r:?}");
        }
    }

    println!(
        "fault-injection run: {} faults in {:.0} s over {} sweep(s), {runs} coordinator \
         processes: {} worker kills ({} mid-job), {} worker hangs ({} mid-job), \
         {} coordinator kills (SIGKILL) and {} stops (SIGTERM), {} dropped connections, \
         {} store errors ({lost_replies} after the write landed); {resumes} resumes; \
         {} jobs ({} given up, as without faults), {} retries in the last run; {rows} trace \
         rows per sweep, each exactly once and equal to the fault-free sweep's",
        injected.total(),
        elapsed.as_secs_f64(),
        outs.len(),
        injected.worker_kills,
        injected.kills_mid_job,
        injected.worker_hangs,
        injected.hangs_mid_job,
        injected.coordinator_kills,
        injected.coordinator_terms,
        injected.cuts,
        injected.store,
        m["jobs"]["total"],
        m["jobs"]["failed"],
        m["jobs"]["retries"],
    );
    assert!(
        injected.total() >= MIN_FAULTS,
        "only {} faults injected: {injected:?}",
        injected.total()
    );
    for (class, n) in [
        ("worker kills", injected.worker_kills),
        ("worker kills with a job in flight", injected.kills_mid_job),
        ("worker hangs", injected.worker_hangs),
        ("worker hangs with a job in flight", injected.hangs_mid_job),
        ("coordinator restarts", injected.coordinator_kills + injected.coordinator_terms),
        ("dropped connections", injected.cuts),
        ("store errors", injected.store),
    ] {
        assert!(n > 0, "no {class} injected");
    }
}
