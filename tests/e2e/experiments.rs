//! Experiments beyond Figure 2, end to end through the real binaries: the severed kinds and
//! per-head restoration over a token selector, with jobs cut by layer. Every row exactly
//! once, the numbers of `worker trace`, and Figure 3 and the per-head maps of `coordinator
//! aggregate` equal to the DuckDB queries.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::kinds::Kind;
use e2e::{Proc, args, bin, fixture, knowns_path, read_tables, sweep_dir, tiny_sweep_args};

/// Scores of a sweep and of `worker trace` differ by the order of float sums (a job's
/// batches hold fewer rows): ~1e-7; see tests/e2e/sweep.rs.
const SCORE_TOLERANCE: f64 = 1e-5;

const KINDS: &str = "hidden,severed_mlp,severed_attn,head";
const TOKENS: &str = "last-subject,last";

fn records() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(knowns_path()).expect("knowns");
    serde_json::from_str(&text).expect("knowns JSON")
}

/// `worker trace --json` of one record with the sweep's experiment.
fn worker_trace(record: &serde_json::Value) -> serde_json::Value {
    let field = |k: &str| record[k].as_str().expect("string field").to_string();
    let output = std::process::Command::new(bin("worker"))
        .args(["trace", "--json", "--model"])
        .arg(fixture("tiny/llama"))
        .args(["--prompt", &field("prompt"), "--subject", &field("subject")])
        .args(["--expect", &field("attribute"), "--noise-subjects"])
        .arg(knowns_path())
        .args(["--correctness", "none", "--samples", "2", "--window", "3"])
        .args(["--kinds", KINDS, "--tokens", TOKENS])
        .output()
        .expect("worker trace runs");
    assert!(output.status.success(), "worker trace: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("trace JSON")
}

#[test]
fn severed_and_head_kinds_sweep_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let mut run = tiny_sweep_args(&out, "127.0.0.1:0", 10);
    run.extend(args(&["--local-workers", "2", "--worker-threads", "1"]));
    run.extend(args(&["--kinds", KINDS, "--tokens", TOKENS, "--layers-per-job", "2"]));
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    assert!(coordinator.wait(Duration::from_secs(300)).success(), "{}", coordinator.stderr());

    let dir = sweep_dir(&out);
    let tables = read_tables(&dir);
    assert_eq!(tables.facts.len(), 10);
    assert!(tables.errors.is_empty(), "{:?}", tables.errors);
    let kinds = [Kind::Hidden, Kind::SeveredMlp, Kind::SeveredAttn, Kind::Head];
    let rows = tables.assert_each_row_once(&kinds);
    for f in &tables.facts {
        assert!(f.traced, "--correctness none traces every fact");
        assert_eq!((f.n_layers, f.n_heads), (3, 4));
        let mut want = vec![f.subject.1 - 1, f.n_tokens - 1];
        want.dedup();
        assert_eq!(
            f.traced_tokens, want,
            "fact {}: the last subject token and the last",
            f.known_id
        );
    }
    assert!(rows >= 10 * 3 * (3 + 4), "{rows} rows");
    let m = e2e::manifest(&dir);
    assert_eq!(m["settings"]["experiment"]["tokens"], serde_json::json!(["last-subject", "last"]));
    assert_eq!(m["settings"]["schema"], common::sweep::SCHEMA);
    assert!(m["experiment_digest"].as_str().is_some_and(|d| d.starts_with("blake3:")));

    // The numbers of tracing one fact alone, every kind and head.
    let records = records();
    for index in [0usize, 7] {
        let known_id = records[index]["known_id"].as_u64().expect("id");
        let trace = worker_trace(&records[index]);
        assert_eq!(trace["axes"]["head"], serde_json::json!(["token", "layer", "head"]));
        assert_eq!(trace["axes"]["severed_mlp"], serde_json::json!(["token", "layer"]));
        let fact = tables.facts.iter().find(|f| f.known_id == known_id).expect("fact row");
        let traced: Vec<usize> =
            serde_json::from_value(trace["traced_tokens"].clone()).expect("tokens");
        assert_eq!(traced, fact.traced_tokens);
        let mut compared = 0;
        for r in tables.traces.iter().filter(|r| r.known_id == known_id) {
            let cell = &trace["scores"][r.kind.name()][r.token as usize][r.layer as usize];
            let theirs = match r.head {
                Some(h) => &cell[h as usize],
                None => cell,
            };
            let theirs = theirs.as_f64().expect("a computed cell");
            assert!(
                (f64::from(r.score) - theirs).abs() <= SCORE_TOLERANCE,
                "fact {known_id} {r:?}: sweep {} vs worker trace {theirs}",
                r.score
            );
            compared += 1;
        }
        assert_eq!(compared, fact.traced_tokens.len() * 3 * (3 + 4));
        // A token the selector leaves out is null in the JSON.
        let skipped = (0..fact.n_tokens).find(|t| !fact.traced_tokens.contains(t));
        if let Some(t) = skipped {
            assert!(trace["scores"]["hidden"][t][0].is_null(), "token {t} was not traced");
        }
    }

    aggregate_equals_duckdb(&dir, tmp.path());
}

/// Figure 3, the per-head maps and Figure 2's rows of these kinds: the aggregate and the
/// queries over every traced fact (`--facts all`, as the Figure 3 notebook averages), within
/// 1e-6 (both average the same f32 scores in f64).
fn aggregate_equals_duckdb(dir: &Path, tmp: &Path) {
    let summary = tmp.join("summary");
    let printed = e2e::aggregate(dir, &summary, &["--facts", "all"]);
    assert!(printed.contains("Figure 3") && printed.contains("strongest heads"), "{printed}");
    for file in ["figure3.png", "figure3.svg", "heads_last_subject.png", "heads_last.svg"] {
        assert!(summary.join(file).is_file(), "{file} missing");
    }
    // Figure 3 and the per-head maps in the page, in a real browser.
    e2e::browser::check_report(
        &summary,
        &["settings", "headline", "figure2", "figure3", "heads", "relations", "facts"],
        &["figure3", "heads_last_subject", "heads_last"],
    );
    let duck = e2e::duckdb_queries(dir, "all", &["figure3", "heads", "rollup"]);
    let compare = |csv: &str, query: &str, key: &[&str]| {
        let rust: BTreeMap<Vec<String>, BTreeMap<String, String>> =
            e2e::read_csv(&summary.join(csv))
                .into_iter()
                .filter(|r| r["n"] != "0")
                .map(|r| (key.iter().map(|k| r[*k].clone()).collect(), r))
                .collect();
        let rows = duck[query].as_array().expect("rows");
        assert_eq!(rows.len(), rust.len(), "{query}: one row per cell with facts");
        assert!(!rows.is_empty(), "{query}: no rows");
        for row in rows {
            let id: Vec<String> = key
                .iter()
                .map(|k| match &row[*k] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            let ours = &rust[&id];
            assert_eq!(row["n"].to_string(), ours["n"], "{query} {id:?}");
            for column in ["aie", "mean", "std"] {
                let (a, b) =
                    (row[column].as_f64().expect("f64"), ours[column].parse::<f64>().expect("f64"));
                assert!((a - b).abs() <= 1e-6, "{query} {id:?} {column}: duckdb {a} vs rust {b}");
            }
        }
    };
    compare("figure3.csv", "figure3", &["layer", "kind"]);
    compare("heads.csv", "heads", &["category", "layer", "head"]);
    compare("summary.csv", "rollup", &["kind", "category", "layer"]);
    let bars = e2e::read_csv(&summary.join("figure3.csv"));
    let kinds: std::collections::BTreeSet<&str> = bars.iter().map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["hidden", "severed_attn", "severed_mlp"]);
}
