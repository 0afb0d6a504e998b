//! A sweep with symmetric token replacement (`--corruption str`), noising, on SmolLM2, end to
//! end: workers choose the donor from the candidates their job carries, the `facts` rows
//! record it (and no noise level) with the foil and every metric of the clean and corrupted
//! runs, a fact without a donor is an `errors` row that says why while the others go on,
//! the rows of every metric are those of `worker trace --knowns --known-id`, and the
//! aggregate and DuckDB read the tables.

use std::time::Duration;

use common::kinds::Kind;
use common::metric::Metric;
use e2e::{Proc, args, bin, knowns_path, read_tables, run_args, smollm2_path, sweep_dir};

/// Sweep and `worker trace` differ by the order of float sums only (see tests/e2e/sweep.rs):
/// 1e-5 on probabilities, 1e-4 on the other metrics (logits of magnitude up to ~30).
const SCORE_TOLERANCE: f64 = 1e-5;
const METRIC_TOLERANCE: f64 = 1e-4;

#[test]
fn an_str_sweep_records_donors_and_refuses_facts_without_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(knowns_path()).expect("knowns");
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).expect("knowns JSON");
    // Eight facts of "worked in the city of" (P937), and one fact alone in its relation.
    // With SmolLM2's tokenizer three of the eight have a donor among the others: 158 → 232,
    // 232 → 254, 254 → 158; the rest change the prompt's length or share the first answer
    // token with every candidate (the same check as `worker trace` run by hand).
    let chosen: Vec<serde_json::Value> = [78usize, 140, 158, 173, 232, 254, 289, 292, 0]
        .iter()
        .map(|&i| records[i].clone())
        .collect();
    let dataset = tmp.path().join("nine.json");
    std::fs::write(&dataset, serde_json::to_string(&chosen).expect("json")).expect("write");
    let model = smollm2_path();
    let out = tmp.path().join("out");
    let experiment = [
        "--corruption",
        "str",
        "--direction",
        "noising",
        "--kinds",
        "hidden",
        "--tokens",
        "last-subject,last",
    ];
    let mut run = run_args(
        &dataset,
        &model,
        &out,
        &[
            "--local-workers",
            "2",
            "--worker-threads",
            "1",
            "--correctness",
            "none",
            "--layers-per-job",
            "15",
        ],
    );
    run.extend(args(&experiment));
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    assert!(coordinator.wait(Duration::from_secs(600)).success(), "{}", coordinator.stderr());

    let dir = sweep_dir(&out);
    let tables = read_tables(&dir);
    let mut donors: Vec<(u64, Option<u64>)> =
        tables.facts.iter().map(|f| (f.known_id, f.donor_known_id)).collect();
    donors.sort_unstable();
    assert_eq!(donors, [(158, Some(232)), (232, Some(254)), (254, Some(158))]);
    assert!(tables.facts.iter().all(|f| f.noise_level.is_none() && f.traced));
    tables.assert_each_row_once(&[Kind::Hidden]);
    let mut refused: Vec<u64> = tables.errors.iter().filter_map(|e| e.known_id).collect();
    refused.sort_unstable();
    refused.dedup();
    assert_eq!(refused, [0, 78, 140, 173, 289, 292], "{:?}", tables.errors);
    for e in &tables.errors {
        assert_eq!(e.stage, "trace", "{e:?}");
        assert!(e.message.contains("no donor"), "{e:?}");
    }
    let lone = tables.errors.iter().find(|e| e.known_id == Some(0)).expect("fact 0");
    assert!(lone.message.contains("no other fact has this fact's relation_id"), "{lone:?}");
    let m = e2e::manifest(&dir);
    assert_eq!(m["settings"]["experiment"]["corruption"]["type"], "str");
    assert_eq!(m["settings"]["experiment"]["direction"], "noising");
    assert!(m["noise"]["spec"].is_null(), "no noise rule: {}", m["noise"]);

    // The rows of fact 254 are those of tracing it alone from the same dataset.
    let output = std::process::Command::new(bin("worker"))
        .args(["trace", "--json", "--model"])
        .arg(&model)
        .arg("--knowns")
        .arg(&dataset)
        .args(["--known-id", "254", "--correctness", "none"])
        .args(experiment)
        .output()
        .expect("worker trace runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let trace: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(trace["donor"]["known_id"], 158);
    assert!(trace["noise_level"].is_null());
    let tolerance = |m: Metric| if m == Metric::Prob { SCORE_TOLERANCE } else { METRIC_TOLERANCE };
    let fact = tables.facts.iter().find(|f| f.known_id == 254).expect("fact 254");
    for (run, values) in [("clean", fact.clean), ("corrupted", fact.corrupted)] {
        let values = values.expect("schema 4 has every metric");
        for metric in Metric::ALL {
            let theirs = trace[run][metric.name()].as_f64().expect("a metric");
            let ours = values.get(metric);
            assert!(
                (ours - theirs).abs() <= tolerance(metric),
                "{run} {metric}: {ours} vs {theirs}"
            );
        }
    }
    let mut compared = 0;
    for r in tables.traces.iter().filter(|r| r.known_id == 254) {
        for metric in Metric::ALL {
            let theirs = trace["metrics"]["hidden"][metric.name()][r.token as usize]
                [r.layer as usize]
                .as_f64()
                .expect("a computed cell");
            let ours = f64::from(r.value(metric));
            assert!((ours - theirs).abs() <= tolerance(metric), "{r:?} {metric}: vs {theirs}");
            compared += 1;
        }
        // "scores" stays p(answer): the prob metric's table.
        let (t, l) = (r.token as usize, r.layer as usize);
        assert_eq!(trace["scores"]["hidden"][t][l], trace["metrics"]["hidden"]["prob"][t][l]);
    }
    assert_eq!(compared, 2 * 30 * 4);
    // Noising: the last layer's state at the last token replaced gives the corrupted run.
    let last = tables
        .traces
        .iter()
        .find(|r| r.known_id == 254 && r.layer == 29 && r.token as usize + 1 == fact.n_tokens)
        .expect("the last cell");
    let corrupted = fact.corrupted.expect("metrics");
    assert!((f64::from(last.score) - corrupted.prob).abs() <= SCORE_TOLERANCE, "{last:?}");
    assert!((f64::from(last.kl) - corrupted.kl).abs() <= METRIC_TOLERANCE, "{last:?}");

    // The aggregate and DuckDB read a sweep without noise levels, and agree on its ATE.
    let summary = tmp.path().join("summary");
    let printed = e2e::aggregate(&dir, &summary, &["--facts", "all"]);
    assert!(printed.contains("3 facts"), "{printed}");
    let headline: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(summary.join("headline.json")).expect("headline"),
    )
    .expect("json");
    let duck = e2e::duckdb_queries(&dir, "all", &["ate"]);
    let row = &duck["ate"][0];
    let (a, b) =
        (row["ate"].as_f64().expect("ate"), headline["hidden"]["ate"].as_f64().expect("ate"));
    assert!((a - b).abs() <= 1e-6, "duckdb {a} vs rust {b}");
}
