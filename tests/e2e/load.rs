//! Load test (not timed; prints figures): 200 simulated workers with a fake engine on one
//! real coordinator process, 20,000 jobs, workers dying at random (a dead worker's job is
//! only recovered by its lease expiring), some results handed in after their lease expired
//! (refused: the job is leased again).
//! Every row must be in the tables exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::{Proc, bin, free_port, manifest, read_tables, run_args, sweep_dir};
use fake::{LAYERS, fake_result, fake_score};

#[path = "fake.rs"]
mod fake;
use proto::coordinator_client::CoordinatorClient;
use rand::{Rng, SeedableRng};

const WORKERS: usize = 200;
const FACTS: usize = 2_000;
/// A simulated worker dies (abandons its job and is replaced) with this probability per job.
const DEATH: f64 = 0.02;
/// A result is handed in after the job's lease expired with this probability per job.
const LATE: f64 = 0.005;

#[derive(Default)]
struct Tally {
    completions: AtomicU64,
    deaths: AtomicU64,
    late: AtomicU64,
}

async fn simulated_worker(url: String, fingerprint: String, seed: u64, tally: Arc<Tally>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone()).expect("url").connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut client = CoordinatorClient::new(channel);
    'life: loop {
        let register = proto::RegisterRequest {
            name: format!("sim-{seed}"),
            model_fingerprint: fingerprint.clone(),
            capabilities: Some(fake::capabilities()),
        };
        let worker_id = client.register(register).await.expect("register").into_inner().worker_id;
        loop {
            let reply = client
                .lease(proto::LeaseRequest { worker_id: worker_id.clone() })
                .await
                .expect("lease")
                .into_inner();
            match reply.reply.expect("a reply") {
                proto::lease_reply::Reply::Job(job) => {
                    let Some(proto::job::Work::Trace(work)) = job.work else {
                        panic!("trace jobs only")
                    };
                    if rng.random_bool(DEATH) {
                        // Dies holding the job; a new worker takes its place.
                        tally.deaths.fetch_add(1, Ordering::Relaxed);
                        continue 'life;
                    }
                    if rng.random_bool(LATE) {
                        tally.late.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1300)).await;
                    }
                    let request = proto::CompleteRequest {
                        worker_id: worker_id.clone(),
                        job_id: job.job_id,
                        lease_id: job.lease_id,
                        seconds: 0.0,
                        result: Some(proto::complete_request::Result::Trace(fake_result(&work))),
                    };
                    // A late worker may have been forgotten by now: that is a NOT_FOUND, and
                    // it registers again like a worker after a coordinator restart.
                    match client.complete(request).await {
                        Ok(_) => {
                            tally.completions.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) if s.code() == tonic::Code::NotFound => continue 'life,
                        Err(s) => panic!("complete: {s}"),
                    }
                }
                proto::lease_reply::Reply::Wait(w) => {
                    tokio::time::sleep(Duration::from_millis(w.retry_ms)).await;
                }
                proto::lease_reply::Reply::Finished(_) => return,
            }
        }
    }
}

#[test]
fn two_hundred_workers_twenty_thousand_jobs_every_row_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dataset, model) = fake::dataset_and_model(tmp.path(), FACTS);
    let out = tmp.path().join("out");
    let port = free_port();
    let run = run_args(
        &dataset,
        &model,
        &out,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--noise",
            "0.1",
            "--correctness",
            "none",
            "--layers-per-job",
            "1",
            "--lease-secs",
            "1",
            "--max-attempts",
            "50",
            "--flush-secs",
            "1",
            "--linger-secs",
            "3",
        ],
    );
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    runtime.block_on(async {
        let fingerprint = fake::fingerprint(&model).await;
        let url = format!("http://127.0.0.1:{port}");
        let tasks: Vec<_> = (0..WORKERS)
            .map(|i| {
                tokio::spawn(simulated_worker(
                    url.clone(),
                    fingerprint.clone(),
                    i as u64,
                    tally.clone(),
                ))
            })
            .collect();
        for task in tasks {
            task.await.expect("simulated worker");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());

    let dir = sweep_dir(&out);
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), FACTS);
    assert!(tables.errors.is_empty(), "{:?}", &tables.errors[..tables.errors.len().min(3)]);
    let rows = tables.assert_exactly_once(LAYERS, 3);
    assert_eq!(rows, FACTS * fake::TOKENS * LAYERS as usize * 3);
    for r in tables.traces.iter().step_by(997) {
        let k = ["hidden", "mlp", "attn"].iter().position(|k| *k == r.kind.name()).expect("kind");
        assert_eq!(r.score, fake_score(r.known_id, k, r.token as usize, r.layer, 0), "{r:?}");
    }
    let m = manifest(&dir);
    let jobs = FACTS as u64 * u64::from(LAYERS);
    assert_eq!(m["jobs"]["done"], jobs);
    let completions = tally.completions.load(Ordering::Relaxed);
    println!(
        "load test: {WORKERS} simulated workers, {jobs} jobs in {elapsed:.2} s = {:.0} jobs/s; \
         {completions} results handed in ({} late), {} worker deaths, {} retries, {} rows in {} files",
        jobs as f64 / elapsed,
        tally.late.load(Ordering::Relaxed),
        tally.deaths.load(Ordering::Relaxed),
        m["jobs"]["retries"],
        rows,
        tables.files.len(),
    );
    assert!(tally.deaths.load(Ordering::Relaxed) > 0, "the test kills workers");
}
