//! Workers are not trusted: over the real gRPC protocol, a registered worker cannot hand in
//! a job it does not hold (another's lease, a stale lease id, a job never leased, an expired
//! lease), a duplicate hand-in changes nothing, a malformed result is refused before anything
//! is written, an oversized message is refused, and an unknown worker id is told to
//! register. The honest results that follow are in the tables exactly once.

use std::time::Duration;

use e2e::{Proc, args, bin, free_port, manifest, read_tables, sweep_dir};
use fake::{LAYERS, capabilities, fake_result, fake_score};
use proto::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

#[path = "fake.rs"]
mod fake;

async fn register(client: &mut CoordinatorClient<Channel>, name: &str, fp: &str) -> String {
    let request = proto::RegisterRequest {
        name: name.into(),
        model_fingerprint: fp.into(),
        capabilities: Some(capabilities()),
    };
    client.register(request).await.expect("register").into_inner().worker_id
}

async fn lease(
    client: &mut CoordinatorClient<Channel>,
    worker: &str,
) -> (proto::Job, proto::TraceJob) {
    let reply = client
        .lease(proto::LeaseRequest { worker_id: worker.into() })
        .await
        .expect("lease")
        .into_inner();
    let Some(proto::lease_reply::Reply::Job(job)) = reply.reply else {
        panic!("no job: {reply:?}")
    };
    let Some(proto::job::Work::Trace(work)) = job.work.clone() else { panic!("not a trace job") };
    (job, work)
}

fn completion(
    worker: &str,
    job: &str,
    lease_id: u64,
    result: proto::TraceResult,
) -> proto::CompleteRequest {
    proto::CompleteRequest {
        worker_id: worker.into(),
        job_id: job.into(),
        lease_id,
        seconds: 0.0,
        result: Some(proto::complete_request::Result::Trace(result)),
    }
}

#[test]
fn only_the_lease_holder_hands_in_and_only_well_formed_results() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let (mut coordinator, port, model) = fake_sweep(tmp.path(), 3, &["--lease-secs", "2"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let fp = fake::fingerprint(&model).await;
        let channel = connect(port).await;
        let c_channel = channel.clone();
        let mut c = CoordinatorClient::new(channel);
        let a = register(&mut c, "a", &fp).await;
        let b = register(&mut c, "b", &fp).await;
        let (job, work) = lease(&mut c, &a).await;
        let good = fake_result(&work);
        let refused = |r: Result<tonic::Response<proto::CompleteReply>, tonic::Status>| {
            !r.expect("an answer, not an error").into_inner().accepted
        };

        // b hands in a's job, even quoting a's lease: refused.
        let stolen = completion(&b, &job.job_id, job.lease_id, good.clone());
        assert!(refused(c.complete(stolen).await), "another worker's job");
        // a under a lease id it was never given, and a job never leased to anyone.
        let stale = completion(&a, &job.job_id, job.lease_id + 7, good.clone());
        assert!(refused(c.complete(stale).await), "a stale lease id");
        let other = job.job_id.replacen(|ch: char| ch.is_ascii_digit(), "9", 1);
        let unleased = completion(&a, &other, job.lease_id, good.clone());
        assert!(refused(c.complete(unleased).await), "a job not leased: {other}");
        // An unknown worker is told to register, not served.
        let ghost = completion("ghost", &job.job_id, job.lease_id, good.clone());
        let status = c.complete(ghost).await.expect_err("unknown worker");
        assert_eq!(status.code(), tonic::Code::NotFound);

        // Malformed results for the job a holds: refused, and a failed try.
        let mut nan = good.clone();
        nan.scores[0].scores[0] = f32::NAN;
        let mut short = good.clone();
        short.scores[1].scores.pop();
        let mut far = good.clone();
        far.subject_end = 99;
        let bad =
            [(nan, "a NaN score"), (short, "a missing score"), (far, "a subject past the end")];
        let mut held = job.clone();
        for (i, (result, what)) in bad.into_iter().enumerate() {
            if i > 0 {
                // The refused result was a failed try: the job went back; take the next.
                held = lease(&mut c, &a).await.0;
            }
            let r = c.complete(completion(&a, &held.job_id, held.lease_id, result)).await;
            assert!(refused(r), "{what}");
        }

        // The holder's honest result counts once; a duplicate changes nothing.
        let (job, work) = lease(&mut c, &a).await;
        let honest = completion(&a, &job.job_id, job.lease_id, fake_result(&work));
        assert!(c.complete(honest.clone()).await.expect("complete").into_inner().accepted);
        assert!(refused(c.complete(honest).await), "a duplicate");
        // An expired lease no longer counts.
        let (job, work) = lease(&mut c, &b).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let late = completion(&b, &job.job_id, job.lease_id, fake_result(&work));
        assert!(refused(c.complete(late).await), "after the lease expired");

        // An oversized message (over the protocol's 64 MiB) is refused, and the
        // coordinator goes on.
        let mut huge = fake_result(&work);
        huge.tokens = vec!["x".repeat(1 << 20); 65];
        let mut big =
            CoordinatorClient::new(c_channel.clone()).max_encoding_message_size(usize::MAX);
        let status = big
            .complete(completion(&b, &job.job_id, job.lease_id, huge))
            .await
            .expect_err("oversized");
        let codes = [tonic::Code::OutOfRange, tonic::Code::ResourceExhausted];
        assert!(codes.contains(&status.code()), "{status:?}");

        // Honest work finishes the sweep.
        finish_honestly(&mut c, &a).await;
    });
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.stderr());
    let dir = sweep_dir(&out);
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 3);
    assert!(tables.errors.is_empty(), "{:?}", tables.errors);
    tables.assert_exactly_once(LAYERS, 3);
    for r in &tables.traces {
        let k = ["hidden", "mlp", "attn"].iter().position(|k| *k == r.kind.name()).expect("kind");
        assert_eq!(
            r.score,
            fake_score(r.known_id, k, r.token as usize, r.layer, r.head.unwrap_or(0)),
            "{r:?}"
        );
    }
    let m = manifest(&dir);
    assert!(
        m["jobs"]["retries"].as_u64().unwrap_or(0) >= 3,
        "malformed results are failed tries: {m}"
    );
    assert!(coordinator.stderr().contains("holds no live lease"), "refusals are logged");
}

/// A coordinator over `facts` fake facts with `extra` flags; its port and the fake model.
fn fake_sweep(
    dir: &std::path::Path,
    facts: usize,
    extra: &[&str],
) -> (Proc, u16, std::path::PathBuf) {
    let (dataset, model) = fake::dataset_and_model(dir, facts);
    let port = free_port();
    let mut run = args(&["run", "--knowns", dataset.to_str().expect("utf8"), "--model"]);
    run.push(model.display().to_string());
    run.extend(args(&["--out", dir.join("out").to_str().expect("utf8")]));
    run.extend(args(&["--listen", &format!("127.0.0.1:{port}"), "--noise", "0.1"]));
    run.extend(args(&["--correctness", "none", "--flush-secs", "0.3", "--linger-secs", "1"]));
    run.extend(args(extra));
    (Proc::start(&bin("coordinator"), &run, dir, "coordinator"), port, model)
}

async fn connect(port: u16) -> Channel {
    let url = format!("http://127.0.0.1:{port}");
    loop {
        match tonic::transport::Endpoint::from_shared(url.clone()).expect("url").connect().await {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[test]
fn lies_about_the_model_are_refused_and_hopeless_jobs_become_error_rows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut coordinator, port, model) = fake_sweep(tmp.path(), 3, &["--max-attempts", "2"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let (nan_job, long_job) = runtime.block_on(async {
        let fp = fake::fingerprint(&model).await;
        let mut c = CoordinatorClient::new(connect(port).await);
        // Claims that do not fit: refused, each saying which.
        let claim = |n_layers: u32, dtype: &str| proto::RegisterRequest {
            name: "liar".into(),
            model_fingerprint: fp.clone(),
            capabilities: Some(proto::Capabilities {
                n_layers,
                dtype: dtype.into(),
                ..capabilities()
            }),
        };
        for (request, code, says) in [
            (claim(0, "f32"), tonic::Code::InvalidArgument, "capabilities.n_layers is 0"),
            (claim(4_000_000, "f32"), tonic::Code::InvalidArgument, "expected 1 to 1024"),
            (claim(LAYERS, "f16"), tonic::Code::FailedPrecondition, "this worker runs f16"),
        ] {
            let status = c.register(request).await.expect_err(says);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(says), "{status:?}");
        }
        let a = register(&mut c, "a", &fp).await;
        let status = c.register(claim(LAYERS + 1, "f32")).await.expect_err("another model");
        assert!(status.message().contains("has 10 layers, this worker's 11"), "{status:?}");

        // One job gets only NaN results, another only failures with a 1 MiB message; the
        // third is done honestly. Three jobs (one per fact); a failed try goes to the back.
        let b = register(&mut c, "b", &fp).await;
        let fail = |worker: &str, job: &proto::Job| proto::FailRequest {
            worker_id: worker.into(),
            job_id: job.job_id.clone(),
            lease_id: job.lease_id,
            stage: "trace".into(),
            message: "é".repeat(1 << 19),
            release: false,
            permanent: false,
        };
        let (nan_job, work) = lease(&mut c, &a).await;
        let mut nan = fake_result(&work);
        nan.scores[2].scores[5] = f32::NAN;
        let (long_job, _) = lease(&mut c, &b).await;
        for try_ in 0..2 {
            let held = if try_ == 0 { nan_job.clone() } else { lease(&mut c, &a).await.0 };
            assert_eq!(held.job_id, nan_job.job_id);
            let r = c.complete(completion(&a, &held.job_id, held.lease_id, nan.clone())).await;
            assert!(!r.expect("answered").into_inner().accepted);
            let held = if try_ == 0 { long_job.clone() } else { lease(&mut c, &b).await.0 };
            assert_eq!(held.job_id, long_job.job_id);
            c.fail(fail(&b, &held)).await.expect("a failure is reported");
            if try_ == 0 {
                let (job, work) = lease(&mut c, &a).await;
                let r = completion(&a, &job.job_id, job.lease_id, fake_result(&work));
                assert!(c.complete(r).await.expect("complete").into_inner().accepted);
            }
        }
        finish_honestly(&mut c, &a).await;
        (nan_job.job_id, long_job.job_id)
    });
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.stderr());
    let tables = read_tables(&sweep_dir(&tmp.path().join("out")));
    assert_eq!(tables.errors.len(), 2, "{:?}", tables.errors);
    let row = |job: &str| {
        tables.errors.iter().find(|e| e.job.as_deref() == Some(job)).expect("an errors row")
    };
    let nan = row(&nan_job);
    assert_eq!(nan.stage, "result");
    assert!(nan.message.contains("NaN") && nan.message.contains("after 2 tries"), "{nan:?}");
    assert!(nan.message.contains("attn"), "names the kind: {nan:?}");
    let long = row(&long_job);
    assert!(long.message.len() < 5_000 && long.message.contains("[cut]"), "{}", long.message.len());
    assert_eq!(tables.facts.len(), 1, "the third fact is whole");
    tables.assert_exactly_once(LAYERS, 3);
}

#[test]
fn a_window_wider_than_the_model_stops_the_sweep() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut coordinator, port, model) = fake_sweep(tmp.path(), 2, &["--window", "11"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let fp = fake::fingerprint(&model).await;
        let mut c = CoordinatorClient::new(connect(port).await);
        let request = proto::RegisterRequest {
            name: "a".into(),
            model_fingerprint: fp,
            capabilities: Some(capabilities()),
        };
        let status = c.register(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("--window 11 is more than the model's 10 layers"));
    });
    assert!(!coordinator.wait(Duration::from_secs(30)).success());
    assert!(coordinator.stderr().contains("--window 11 is more than the model's 10 layers"));
    assert_eq!(manifest(&sweep_dir(&tmp.path().join("out")))["state"], "failed");
}

async fn finish_honestly(c: &mut CoordinatorClient<Channel>, worker: &str) {
    loop {
        let reply = c
            .lease(proto::LeaseRequest { worker_id: worker.into() })
            .await
            .expect("lease")
            .into_inner();
        match reply.reply.expect("reply") {
            proto::lease_reply::Reply::Job(job) => {
                let Some(proto::job::Work::Trace(work)) = job.work else { panic!("a trace job") };
                let r = completion(worker, &job.job_id, job.lease_id, fake_result(&work));
                assert!(c.complete(r).await.expect("complete").into_inner().accepted);
            }
            proto::lease_reply::Reply::Wait(w) => {
                tokio::time::sleep(Duration::from_millis(w.retry_ms)).await;
            }
            proto::lease_reply::Reply::Finished(_) => break,
        }
    }
}
