//! Whole sweeps through the real binaries: rows exactly as expected, the same scores as
//! `worker trace`, broken records recorded and skipped, the real model end to end.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use e2e::{
    Proc, args, bin, fixture, knowns_path, manifest, read_tables, run_args, smollm2_path, sweep_dir,
};

/// Scores of the sweep and of `worker trace` differ only by the order of float sums: a job
/// computes a subset of a fact's layers, so its batched suffix runs have fewer rows, and the
/// GEMM may block them differently. Probabilities agree to ~1e-7; 1e-5 leaves room while
/// staying three orders of magnitude below any effect the paper reads.
const SCORE_TOLERANCE: f32 = 1e-5;

fn knowns() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(knowns_path()).expect("knowns");
    serde_json::from_str(&text).expect("knowns JSON")
}

/// `worker trace --json` of one record with the sweep's settings.
fn worker_trace(
    model: &Path,
    record: &serde_json::Value,
    extra: &[&str],
    subjects: &Path,
) -> serde_json::Value {
    let field = |k: &str| record[k].as_str().expect("string field").to_string();
    let mut cmd = std::process::Command::new(bin("worker"));
    cmd.args(["trace", "--json", "--model"]).arg(model);
    cmd.args([
        "--prompt",
        &field("prompt"),
        "--subject",
        &field("subject"),
        "--expect",
        &field("attribute"),
    ]);
    cmd.args(["--noise", "s3", "--noise-subjects"]).arg(subjects);
    cmd.args(extra);
    let output = cmd.output().expect("worker trace runs");
    assert!(output.status.success(), "worker trace: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("trace JSON")
}

fn assert_same_scores(
    sweep: &BTreeMap<String, Vec<Vec<f32>>>,
    trace: &serde_json::Value,
    known_id: u64,
) {
    let scores = trace["scores"].as_object().expect("scores");
    assert_eq!(sweep.len(), scores.len(), "fact {known_id}: kinds");
    for (kind, table) in scores {
        let ours = &sweep[kind];
        let theirs: Vec<Vec<f32>> = serde_json::from_value(table.clone()).expect("table");
        assert_eq!(ours.len(), theirs.len(), "fact {known_id} {kind}: tokens");
        for (t, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            for (l, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= SCORE_TOLERANCE,
                    "fact {known_id} {kind} token {t} layer {l}: sweep {x} vs worker trace {y}"
                );
            }
        }
    }
}

#[test]
fn two_workers_write_every_row_once_with_worker_trace_scores() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let model = fixture("tiny/llama");
    let knowns_file = knowns_path();
    let run = run_args(
        &knowns_file,
        &model,
        &out,
        &[
            "--local-workers",
            "2",
            "--worker-threads",
            "1",
            "--limit",
            "24",
            "--correctness",
            "none",
            "--samples",
            "3",
            "--window",
            "3",
            "--layers-per-job",
            "2",
            "--flush-secs",
            "0.5",
        ],
    );
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(status.success(), "coordinator failed:\n{}", coordinator.stderr());

    let dir = sweep_dir(&out);
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 24);
    assert!(tables.facts.iter().all(|f| f.traced), "--correctness none traces every fact");
    let rows = tables.assert_exactly_once(3, 3);
    assert!(rows > 24 * 3 * 3 * 5, "{rows} rows");
    assert!(tables.errors.is_empty(), "{:?}", tables.errors);
    let m = manifest(&dir);
    assert_eq!(m["state"], "finished");
    assert_eq!(m["rows"]["facts"], 24);
    assert_eq!(m["jobs"]["total"], 24 * 2 + 1, "two layer ranges per fact, and the calibration");

    // The same numbers as tracing each fact alone.
    let records = knowns();
    for index in [0usize, 9, 23] {
        let record = &records[index];
        let known_id = record["known_id"].as_u64().expect("id");
        let fact = tables.facts.iter().find(|f| f.known_id == known_id).expect("fact row");
        let trace = worker_trace(
            &model,
            record,
            &["--correctness", "none", "--samples", "3", "--window", "3"],
            &knowns_file,
        );
        assert_eq!(trace["noise_level"].as_f64(), fact.noise_level, "same calibrated level");
        assert!(
            (trace["low_score"].as_f64().expect("low") as f32 - fact.low_score).abs()
                <= SCORE_TOLERANCE
        );
        assert!(
            (trace["high_score"].as_f64().expect("high") as f32 - fact.high_score).abs()
                <= SCORE_TOLERANCE
        );
        assert_same_scores(&tables.table(known_id, fact.n_tokens, 3), &trace, known_id);
    }

    // The same command again: finished, nothing to do, nothing written.
    let files_before = tables.files.len();
    let mut again = Proc::start(&bin("coordinator"), &run, tmp.path(), "again");
    assert!(again.wait(Duration::from_secs(60)).success(), "{}", again.stderr());
    assert!(again.stdout().contains("already finished"), "{}", again.stdout());
    assert_eq!(read_tables(&dir).files.len(), files_before);

    // As a Kubernetes Deployment runs it: a finished sweep keeps answering until SIGTERM.
    let port = e2e::free_port();
    let mut serving = run.clone();
    serving.extend(args(&["--linger-secs", "inf", "--listen", &format!("127.0.0.1:{port}")]));
    let mut lingering = Proc::start(&bin("coordinator"), &serving, tmp.path(), "lingering");
    e2e::wait_until(Duration::from_secs(60), "a finished status", || {
        e2e::status(port).is_some_and(|s| s["state"] == "finished")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(lingering.child.try_wait().expect("try_wait").is_none(), "still serving");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &lingering.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(term.success());
    assert!(lingering.wait(Duration::from_secs(30)).success(), "{}", lingering.stderr());
    assert_eq!(read_tables(&dir).files.len(), files_before, "nothing written twice");
    assert_eq!(manifest(&dir)["state"], "finished");
}

#[test]
fn broken_records_become_errors_and_the_rest_is_traced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let records = knowns();
    let line = |v: &serde_json::Value| serde_json::to_string(v).expect("json");
    let mut lines = vec![
        line(&records[0]),
        r#"{"known_id": 9001, "subject": "Paris"}"#.to_string(),
        r#"{"known_id": 9002, "subject": "Nowhere", "attribute": "X", "prompt": "Somewhere is in"}"#.to_string(),
        "{not json".to_string(),
        line(&records[1]),
        line(&records[0]),
    ];
    lines.extend(records[2..7].iter().map(line));
    // Record 11: a prompt longer than the tiny model's 128 positions (its tokenizer is
    // byte-level); record 12: not UTF-8.
    let long = format!("Paris {}is in", "and so on ".repeat(15));
    lines.push(line(&serde_json::json!({
        "known_id": 9003, "subject": "Paris", "attribute": "France", "prompt": long,
    })));
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n{\"known_id\": 9004, \"subject\": \"\xff\xfe\"}\n");
    let dataset = tmp.path().join("broken.jsonl");
    std::fs::write(&dataset, bytes).expect("write dataset");
    let out = tmp.path().join("out");
    let run = run_args(
        &dataset,
        &fixture("tiny/llama"),
        &out,
        &[
            "--local-workers",
            "2",
            "--worker-threads",
            "1",
            "--correctness",
            "none",
            "--samples",
            "2",
            "--window",
            "3",
        ],
    );
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());

    let tables = read_tables(&sweep_dir(&out));
    let mut errors: Vec<(Option<u64>, Option<u64>, String, String)> = tables
        .errors
        .iter()
        .map(|e| (e.record, e.known_id, e.stage.clone(), e.message.clone()))
        .collect();
    errors.sort();
    // The prompt too long for the model fails its job for good, named, and nothing else.
    let too_long = errors.iter().position(|e| e.1 == Some(9003)).expect("9003's error");
    let too_long = errors.remove(too_long);
    assert!(too_long.3.contains("exceed the model's 128 positions"), "{too_long:?}");
    assert_ne!(too_long.2, "dataset");
    let not_utf8 = errors.pop().expect("record 12's error");
    assert_eq!(not_utf8.0, Some(12));
    assert!(not_utf8.3.contains("not JSON"), "{not_utf8:?}");
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert_eq!((errors[0].0, errors[0].1), (Some(1), Some(9001)));
    assert!(errors[0].3.contains("missing field `attribute`"), "{errors:?}");
    assert_eq!((errors[1].0, errors[1].1), (Some(2), Some(9002)));
    assert!(errors[1].3.contains("does not occur in field `prompt`"), "{errors:?}");
    assert_eq!(errors[2].0, Some(3));
    assert!(errors[2].3.contains("not JSON"), "{errors:?}");
    assert_eq!((errors[3].0, errors[3].1), (Some(5), Some(0)));
    assert!(errors[3].3.contains("repeats"), "{errors:?}");
    assert!(errors.iter().all(|e| e.2 == "dataset"));
    assert_eq!(tables.facts.len(), 7, "every valid fact is traced");
    tables.assert_exactly_once(3, 3);
}

#[test]
fn a_short_sweep_on_smollm2_matches_worker_trace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let records = knowns();
    // Goebbels → Berlin (predicted), and two others, predicted or not.
    let chosen: Vec<serde_json::Value> =
        [78usize, 0, 7].iter().map(|&i| records[i].clone()).collect();
    let dataset = tmp.path().join("three.json");
    std::fs::write(&dataset, serde_json::to_string(&chosen).expect("json")).expect("write");
    let model = smollm2_path();
    let out = tmp.path().join("out");
    let run = run_args(
        &dataset,
        &model,
        &out,
        &[
            "--local-workers",
            "2",
            "--worker-threads",
            "1",
            "--samples",
            "2",
            "--kinds",
            "hidden,mlp",
            "--layers-per-job",
            "10",
        ],
    );
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    assert!(coordinator.wait(Duration::from_secs(600)).success(), "{}", coordinator.stderr());

    let dir = sweep_dir(&out);
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 3);
    let goebbels = tables.facts.iter().find(|f| f.known_id == 78).expect("fact 78");
    assert!(goebbels.traced, "SmolLM2 predicts Berlin");
    tables.assert_exactly_once(30, 2);
    let trace =
        worker_trace(&model, &records[78], &["--samples", "2", "--kinds", "hidden,mlp"], &dataset);
    assert_eq!(trace["correct"], true);
    assert_same_scores(&tables.table(78, goebbels.n_tokens, 30), &trace, 78);
    assert_eq!(manifest(&dir)["n_layers"], 30);
    aggregate_equals_duckdb(&dir, tmp.path());
}

/// `coordinator aggregate` and queries/*.sql in DuckDB give the same Figure 2. Both average
/// the same f32 scores in f64, in different orders: 1e-9 would do; 1e-6 is the bound asked.
fn aggregate_equals_duckdb(dir: &Path, tmp: &Path) {
    let summary = tmp.join("summary");
    let printed = e2e::aggregate(dir, &summary, &[]);
    assert!(printed.contains("best AIE at the last subject token"), "{printed}");
    for file in
        ["summary.parquet", "rollup_hidden.png", "rollup_mlp.svg", "lines.png", "headline.json"]
    {
        assert!(summary.join(file).is_file(), "{file} missing");
    }
    compare_with_duckdb(dir, &summary, &[]);
    // The page to open first, in a real browser: Goebbels (78) is the one fact SmolLM2
    // predicts, so it is the largest and its maps are shown.
    e2e::browser::check_report(
        &summary,
        &["settings", "headline", "figure2", "relations", "facts"],
        &["rollup_hidden", "rollup_mlp", "lines", "78-hidden", "78-mlp"],
    );
    // Every metric of the same sweep, raw and as recovery.
    for metric in ["logprob", "logit_diff", "kl"] {
        for scale in ["raw", "recovery"] {
            let flags = ["--metric", metric, "--scale", scale];
            let out = tmp.join(format!("summary-{metric}-{scale}"));
            e2e::aggregate(dir, &out, &flags);
            compare_with_duckdb(dir, &out, &flags);
        }
    }
}

/// The Rust aggregate's summary and headline in `summary` against the rollup and ATE queries
/// run with the same `flags` (`--metric`, `--scale`: the query tool takes the same options).
fn compare_with_duckdb(dir: &Path, summary: &Path, flags: &[&str]) {
    let rust: BTreeMap<(String, String, u64), (f64, f64, u64)> =
        e2e::read_csv(&summary.join("summary.csv"))
            .into_iter()
            .map(|r| {
                let num = |k: &str| r[k].parse::<f64>().expect("number");
                (
                    (r["kind"].clone(), r["category"].clone(), num("layer") as u64),
                    (num("aie"), num("std"), num("n") as u64),
                )
            })
            .collect();
    let duck = e2e::duckdb_queries_with(dir, flags, &["rollup", "ate"]);
    let rows = duck["rollup"].as_array().expect("rollup rows");
    assert_eq!(rows.len(), rust.values().filter(|v| v.2 > 0).count(), "one row per non-empty cell");
    for row in rows {
        let key = (
            row["kind"].as_str().expect("kind").to_string(),
            row["category"].as_str().expect("category").to_string(),
            row["layer"].as_u64().expect("layer"),
        );
        let (aie, std, n) = rust[&key];
        assert_eq!(row["n"].as_u64(), Some(n), "{key:?}");
        assert!(
            (row["aie"].as_f64().expect("aie") - aie).abs() <= 1e-6,
            "{flags:?} {key:?}: {row} vs {aie}"
        );
        assert!((row["std"].as_f64().expect("std") - std).abs() <= 1e-6, "{key:?}: {row} vs {std}");
    }
    let headline: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(summary.join("headline.json")).expect("headline"),
    )
    .expect("json");
    for row in duck["ate"].as_array().expect("ate rows") {
        let h = &headline[row["kind"].as_str().expect("kind")];
        for (duck_key, rust_key) in [
            ("ate", "ate"),
            ("best_aie_last_subject", "best_aie_last_subject"),
            ("best_aie_last_token", "best_aie_last_token"),
        ] {
            let (a, b) = (row[duck_key].as_f64().expect("f64"), h[rust_key].as_f64().expect("f64"));
            assert!((a - b).abs() <= 1e-6, "{duck_key}: duckdb {a} vs rust {b}");
        }
        assert_eq!(row["best_layer_last_subject"], h["best_layer_last_subject"]);
        assert_eq!(row["best_layer_last_token"], h["best_layer_last_token"]);
    }
}
