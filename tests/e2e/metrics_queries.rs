//! `coordinator aggregate --metric M --scale S --recovery R` equals queries/*.sql run with the
//! same variables, for every metric and scale, on a synthetic sweep folder: tables and
//! manifest laid out as `coordinator run` writes them (facts/part-*.parquet,
//! traces/kind=<kind>/part-*.parquet, manifest.json), values random but seeded. No model and
//! no worker run. The facts cover the cases the rules tell apart: one-token subjects, a
//! subject that ends the prompt, a fact the model gets wrong, one left untraced, one missing a
//! row of one kind, and one whose clean and corrupted values nearly agree (per-fact
//! recovery's floor).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use common::experiment::Experiment;
use common::kinds::{Geometry, Kind};
use common::metric::{Metric, MetricValues};
use common::sweep::SweepSettings;
use common::tables::{FactRow, TokenCategory, TraceRow, facts_batch, traces_batch, write_parquet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Both sides read the same f32 cells and f64 fact values and apply the same f64 operations
/// to each; only the order of the sums differs (DuckDB's aggregation against a sequential
/// sum), which moves a mean of a few dozen values by ~1e-14 of its size. The largest values
/// here are per-fact recoveries of the fact at the floor (|r| ≲ 10 / 0.01 = 1e3), so the
/// sides agree to ~1e-11; 1e-6 leaves room for that while a wrong formula (a missing
/// division, the wrong column, the wrong facts) moves numbers by 1e-2 or more.
const TOLERANCE: f64 = 1e-6;

const GEOMETRY: Geometry = Geometry { n_layers: 4, n_heads: 2 };
const KINDS: [Kind; 3] = [Kind::Hidden, Kind::SeveredAttn, Kind::Head];

/// (known_id, tokens T, subject [b, e), correct, traced).
type Shape = (u64, u32, (u32, u32), Option<bool>, bool);

const FACTS: [Shape; 8] = [
    (1, 5, (1, 3), Some(true), true),
    (2, 3, (0, 1), Some(true), true),
    (3, 7, (2, 6), Some(true), true),
    (4, 4, (1, 4), Some(false), true),
    (5, 6, (0, 2), None, true),
    (6, 8, (3, 5), Some(true), true),
    (7, 4, (0, 1), Some(true), false),
    (8, 5, (1, 2), Some(true), true),
];
/// Fact 6 misses one `hidden` row: left out of `hidden` and of Figure 3.
const INCOMPLETE: u64 = 6;
/// Fact 8's clean and corrupted values nearly agree (prob exactly).
const AT_THE_FLOOR: u64 = 8;

fn fact_row(rng: &mut StdRng, &(known_id, t, (b, e), correct, traced): &Shape) -> FactRow {
    let (clean, corrupted) = if known_id == AT_THE_FLOOR {
        let prob = 0.4;
        (
            MetricValues { prob, logprob: prob.ln(), logit_diff: 1.004, kl: 0.0 },
            MetricValues { prob, logprob: prob.ln() - 0.002, logit_diff: 1.0, kl: 0.003 },
        )
    } else {
        let (high, low) = (rng.random_range(0.3..0.95), rng.random_range(0.01..0.25));
        (
            MetricValues {
                prob: high,
                logprob: f64::ln(high),
                logit_diff: rng.random_range(1.0..6.0),
                kl: 0.0,
            },
            MetricValues {
                prob: low,
                logprob: f64::ln(low) - rng.random_range(0.0..0.3),
                logit_diff: rng.random_range(-3.0..0.5),
                kl: rng.random_range(0.5..4.0),
            },
        )
    };
    FactRow {
        known_id,
        relation_id: Some(format!("P{}", 10 + known_id % 3)),
        prompt: format!("prompt {known_id}"),
        subject: "s".into(),
        attribute: "a".into(),
        tokens: (0..t).map(|i| format!("t{i}")).collect(),
        token_ids: (0..t).collect(),
        subject_start: b,
        subject_end: e,
        answer: " a".into(),
        answer_id: 7,
        high_score: clean.prob as f32,
        low_score: corrupted.prob as f32,
        correct,
        traced,
        traced_tokens: if traced { (0..t).collect() } else { Vec::new() },
        n_layers: GEOMETRY.n_layers as u32,
        n_heads: GEOMETRY.n_heads as u32,
        noise_level: Some(0.1),
        samples: 3,
        model: "synthetic".into(),
        donor_known_id: None,
        donor_subject: None,
        donor_prompt: None,
        foil_id: 8,
        foil: " b".into(),
        clean,
        corrupted,
    }
}

/// Every row of `kind` for a traced fact (one fewer for the incomplete fact's `hidden`).
fn trace_rows(rng: &mut StdRng, fact: &FactRow, kind: Kind) -> Vec<TraceRow> {
    let (t_len, subject) =
        (fact.tokens.len(), (fact.subject_start as usize, fact.subject_end as usize));
    let heads = kind.heads(GEOMETRY);
    let mut rows = Vec::new();
    for token in 0..t_len as u32 {
        for layer in 0..GEOMETRY.n_layers as u32 {
            for head in 0..heads as u32 {
                let score: f32 = rng.random_range(0.01..0.99);
                rows.push(TraceRow {
                    known_id: fact.known_id,
                    kind,
                    layer,
                    token,
                    head: kind.has_heads().then_some(head),
                    category: TokenCategory::of(token as usize, subject, t_len),
                    score,
                    logprob: score.ln(),
                    logit_diff: rng.random_range(-3.0..6.0),
                    kl: rng.random_range(0.0..4.0),
                });
            }
        }
    }
    if fact.known_id == INCOMPLETE && kind == Kind::Hidden {
        rows.pop();
    }
    rows
}

/// The `traces` columns schema 4 added.
const METRIC_COLUMNS: [&str; 3] = ["logprob", "logit_diff", "kl"];

/// The columns of a table of schema 4 (named in order) that a table of schema 3 has.
fn schema3_columns<'a>(names: impl Iterator<Item = &'a String>) -> Vec<usize> {
    names
        .enumerate()
        .filter(|(_, name)| {
            !(name.starts_with("clean_")
                || name.starts_with("corrupted_")
                || name.starts_with("foil")
                || METRIC_COLUMNS.contains(&name.as_str()))
        })
        .map(|(i, _)| i)
        .collect()
}

/// `$batch` as of `schema`: without the columns schema 4 added when older. (A macro: this
/// package names no arrow type.)
macro_rules! as_of {
    ($schema:expr, $batch:expr) => {{
        let batch = $batch;
        if $schema < 4 {
            let keep = schema3_columns(batch.schema().fields().iter().map(|f| f.name()));
            batch.project(&keep).expect("project")
        } else {
            batch
        }
    }};
}

fn write(path: &Path, bytes: Bytes) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// Writes the synthetic sweep into `dir`, of table schema 4 or (without the metric columns) 3.
fn write_sweep(dir: &Path, schema: u32) {
    let mut rng = StdRng::seed_from_u64(20_240_917);
    let facts: Vec<FactRow> = FACTS.iter().map(|f| fact_row(&mut rng, f)).collect();
    let mut files = Vec::new();
    // Two commits' worth of facts files, as a sweep flushed twice has.
    for (part, chunk) in facts.chunks(4).enumerate() {
        let batch = as_of!(schema, facts_batch(chunk).expect("facts"));
        let name = format!("facts/part-{:08}.parquet", part + 1);
        write(&dir.join(&name), write_parquet(&batch, "facts").expect("parquet"));
        files.push(name);
    }
    for kind in KINDS {
        let rows: Vec<TraceRow> =
            facts.iter().filter(|f| f.traced).flat_map(|f| trace_rows(&mut rng, f, kind)).collect();
        let batch = as_of!(schema, traces_batch(&rows).expect("traces"));
        let name = format!("traces/kind={kind}/part-00000001.parquet");
        write(&dir.join(&name), write_parquet(&batch, "traces").expect("parquet"));
        files.push(name);
    }
    // The journal record that commits them (the queries read only committed files).
    let commit = serde_json::json!({"seq": 1, "jobs": [], "files": files});
    let text = serde_json::to_vec_pretty(&commit).expect("json");
    write(&dir.join("_journal/00000001.json"), Bytes::from(text));
    let settings = SweepSettings {
        schema,
        dataset_digest: "synthetic".into(),
        model_fingerprint: "synthetic".into(),
        experiment: Experiment { kinds: KINDS.to_vec(), ..Experiment::rome() },
        layers_per_job: None,
        limit: None,
        dtype: "f32".into(),
    };
    let manifest = serde_json::json!({
        "sweep_id": "sweep-synthetic",
        "state": "finished",
        "settings": settings,
        "model": "synthetic/tiny-model",
        "n_layers": GEOMETRY.n_layers,
        "n_heads": GEOMETRY.n_heads,
    });
    let text = serde_json::to_vec_pretty(&manifest).expect("json");
    write(&dir.join("manifest.json"), Bytes::from(text));
}

/// One measure: the aggregate's flags and the same as the query tool's options.
struct Measure {
    metric: Metric,
    /// `None`: raw; else the recovery and its floor (per-fact only).
    recovery: Option<(&'static str, Option<&'static str>)>,
}

impl Measure {
    fn name(&self) -> String {
        match self.recovery {
            None => format!("{}-raw", self.metric),
            Some((r, floor)) => format!("{}-recovery-{r}{}", self.metric, floor.unwrap_or("")),
        }
    }

    /// The `scale` column both sides write.
    fn scale(&self) -> String {
        self.recovery.map_or_else(|| "raw".into(), |(r, _)| format!("recovery-{r}"))
    }

    fn aggregate_flags(&self, facts: &'static str) -> Vec<&'static str> {
        let mut f = vec!["--facts", facts, "--metric", self.metric.name()];
        if let Some((recovery, floor)) = self.recovery {
            f.extend(["--scale", "recovery", "--recovery", recovery]);
            f.extend(floor.iter().flat_map(|floor| ["--recovery-floor", floor]));
        }
        f
    }

    fn query_options(&self, facts: &'static str) -> Vec<&'static str> {
        let mut f = vec!["--facts", facts, "--metric", self.metric.name()];
        if let Some((recovery, floor)) = self.recovery {
            f.extend(["--scale", "recovery", "--recovery", recovery]);
            f.extend(floor.iter().flat_map(|floor| ["--floor", floor]));
        }
        f
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= TOLERANCE, "{what}: duckdb {a} vs rust {b}");
}

/// A CSV the aggregate wrote, keyed by `key`, against the query's rows: the same cells (with
/// rows), the same statistics, the measure's names.
fn compare_table(csv: &Path, rows: &Value, key: &[&str], m: &Measure, what: &str) {
    let rust: BTreeMap<Vec<String>, BTreeMap<String, String>> = e2e::read_csv(csv)
        .into_iter()
        .filter(|r| r["n"] != "0")
        .map(|r| (key.iter().map(|k| r[*k].clone()).collect(), r))
        .collect();
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), rust.len(), "{what}: one row per cell with rows");
    assert!(!rows.is_empty(), "{what}: no rows");
    for row in rows {
        let id: Vec<String> = key
            .iter()
            .map(|k| match &row[*k] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        let ours = rust.get(&id).unwrap_or_else(|| panic!("{what}: {id:?} not in {csv:?}"));
        assert_eq!(row["n"].to_string(), ours["n"], "{what} {id:?}");
        for column in ["aie", "mean", "std"] {
            let theirs = row[column].as_f64().expect("f64");
            let ours = ours[column].parse::<f64>().expect("f64");
            close(theirs, ours, &format!("{what} {id:?} {column}"));
        }
        assert_eq!((ours["metric"].as_str(), &ours["scale"]), (m.metric.name(), &m.scale()));
        assert_eq!(row["metric"].as_str(), Some(m.metric.name()), "{what}");
        assert_eq!(row["scale"].as_str(), Some(m.scale().as_str()), "{what}");
    }
}

/// headline.json against ate.sql.
fn compare_headline(summary: &Path, rows: &Value, m: &Measure, what: &str) {
    let text = std::fs::read_to_string(summary.join("headline.json")).expect("headline");
    let headline: Value = serde_json::from_str(&text).expect("json");
    let rows = rows.as_array().expect("ate rows");
    assert_eq!(rows.len(), 2, "{what}: hidden and severed_attn");
    for row in rows {
        let h = &headline[row["kind"].as_str().expect("kind")];
        assert_eq!(row["facts"], h["facts"], "{what}");
        for key in
            ["high_score", "low_score", "ate", "best_aie_last_subject", "best_aie_last_token"]
        {
            let (a, b) = (row[key].as_f64().expect("f64"), h[key].as_f64().expect("f64"));
            close(a, b, &format!("{what} {} {key}", row["kind"]));
        }
        for key in ["best_layer_last_subject", "best_layer_last_token"] {
            assert_eq!(row[key], h[key], "{what} {} {key}", row["kind"]);
        }
        assert_eq!(h["metric"].as_str(), Some(m.metric.name()), "{what}");
        assert_eq!(h["scale"].as_str(), Some(m.scale().as_str()), "{what}");
        if m.recovery.is_some() {
            assert_eq!(h["ate"].as_f64(), Some(1.0), "{what}: recovery's ATE is 1");
        }
    }
}

#[test]
fn every_metric_and_scale_equals_the_queries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sweep-synthetic");
    write_sweep(&dir, 4);
    let mut measures = Vec::new();
    for metric in Metric::ALL {
        measures.push(Measure { metric, recovery: None });
        measures.push(Measure { metric, recovery: Some(("ratio-of-means", None)) });
        measures.push(Measure { metric, recovery: Some(("per-fact", None)) });
    }
    // A floor above fact 8's and some others' |clean − corrupted|: both sides must clamp alike.
    measures.push(Measure { metric: Metric::LogitDiff, recovery: Some(("per-fact", Some("2.5"))) });
    for m in &measures {
        for facts in ["correct", "all"] {
            let what = format!("{} --facts {facts}", m.name());
            let summary = tmp.path().join(format!("{}-{facts}", m.name()));
            let printed = e2e::aggregate(&dir, &summary, &m.aggregate_flags(facts));
            assert!(printed.contains(&format!("metric {}", m.metric)), "{what}: {printed}");
            let duck = e2e::duckdb_queries_with(
                &dir,
                &m.query_options(facts),
                &["rollup", "ate", "figure3", "heads", "per_relation", "top_facts"],
            );
            let keyed = [
                ("summary.csv", "rollup", &["kind", "category", "layer"][..]),
                ("figure3.csv", "figure3", &["layer", "kind"][..]),
                ("heads.csv", "heads", &["category", "layer", "head"][..]),
            ];
            for (csv, query, key) in keyed {
                compare_table(&summary.join(csv), &duck[query], key, m, &format!("{what} {query}"));
            }
            compare_headline(&summary, &duck["ate"], m, &what);
            // The other two queries run in every measure (their numbers have no Rust twin).
            assert!(!duck["per_relation"].as_array().expect("rows").is_empty(), "{what}");
            assert!(!duck["top_facts"].as_array().expect("rows").is_empty(), "{what}");
        }
    }
}

/// `coordinator aggregate` in `dir` with `flags`, no --out.
fn aggregate_in_place(dir: &Path, flags: &[&str]) -> std::process::Output {
    Command::new(e2e::bin("coordinator"))
        .args(["aggregate", "--results"])
        .arg(dir)
        .args(flags)
        .output()
        .expect("aggregate runs")
}

#[test]
fn measures_get_their_own_folder_labels_and_checks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sweep-synthetic");
    write_sweep(&dir, 4);
    let ok = |flags: &[&str]| {
        let out = aggregate_in_place(&dir, flags);
        assert!(out.status.success(), "{flags:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[]);
    let printed = ok(&["--metric", "logit_diff", "--scale", "recovery"]);
    assert!(printed.contains("best recovery at the last subject token"), "{printed}");
    ok(&["--metric", "kl"]);
    let summary = dir.join("summary");
    let svg = |folder: &Path| std::fs::read_to_string(folder.join("lines.svg")).expect("svg");
    assert!(svg(&summary).contains("Average indirect effect on p(o)"));
    let ld = summary.join("logit_diff-recovery-ratio-of-means");
    assert!(svg(&ld).contains("Recovery of logit difference (AIE / ATE)"));
    assert!(svg(&summary.join("kl-raw")).contains("Average indirect effect on KL"));
    let rows = e2e::read_csv(&summary.join("summary.csv"));
    assert!(rows.iter().all(|r| r["metric"] == "prob" && r["scale"] == "raw"));
    // Raw KL falls toward the clean run: its ATE is negative, its best AIE the smallest.
    let text = std::fs::read_to_string(summary.join("kl-raw/headline.json")).expect("headline");
    let kl: Value = serde_json::from_str(&text).expect("json");
    assert!(kl["hidden"]["ate"].as_f64().expect("ate") < 0.0, "{kl}");

    for (flags, named) in [
        (&["--recovery", "per-fact"][..], "--recovery"),
        (&["--scale", "recovery", "--recovery-floor", "0.1"][..], "--recovery-floor"),
        (
            &["--scale", "recovery", "--recovery", "per-fact", "--recovery-floor", "0"][..],
            "--recovery-floor",
        ),
        (&["--metric", "entropy"][..], "--metric"),
    ] {
        let out = aggregate_in_place(&dir, flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{flags:?}: {err}");
    }
}

/// A sweep of table schema 3 has prob only: the aggregate and the queries still give prob,
/// alike, and refuse every other metric with the schema and the metric named.
#[test]
fn a_schema_3_sweep_gives_prob_and_refuses_the_other_metrics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sweep-old");
    write_sweep(&dir, 3);
    let prob = Measure { metric: Metric::Prob, recovery: None };
    let summary = tmp.path().join("prob");
    e2e::aggregate(&dir, &summary, &prob.aggregate_flags("correct"));
    let duck = e2e::duckdb_queries_with(&dir, &prob.query_options("correct"), &["rollup", "ate"]);
    compare_table(
        &summary.join("summary.csv"),
        &duck["rollup"],
        &["kind", "category", "layer"],
        &prob,
        "schema 3",
    );
    compare_headline(&summary, &duck["ate"], &prob, "schema 3");
    for metric in ["logprob", "logit_diff", "kl"] {
        let unused = tmp.path().join("unused").display().to_string();
        let out = aggregate_in_place(&dir, &["--metric", metric, "--out", &unused]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{metric}");
        assert!(err.contains("schema 3") && err.contains(&format!("--metric {metric}")), "{err}");
        let out = e2e::duckdb_command(&dir, &["--metric", metric], &["rollup"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "duckdb {metric}");
        assert!(err.contains(&format!("clean_{metric}")) && err.contains("schema < 4"), "{err}");
    }
}

/// `--facts-of` averages only the facts another sweep averages: the synthetic sweep
/// restricted to a copy that lost half its facts gives that copy's numbers.
#[test]
fn facts_of_another_sweep_restricts_the_average() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, half) = (tmp.path().join("full"), tmp.path().join("half"));
    write_sweep(&full, 4);
    write_sweep(&half, 4);
    std::fs::remove_file(half.join("facts/part-00000002.parquet")).expect("drop half the facts");
    let headline = |dir: &Path, flags: &[&str], out: &str| -> Value {
        let out_dir = tmp.path().join(out);
        let mut all = vec!["--facts", "all", "--out", out_dir.to_str().expect("utf-8")];
        all.extend_from_slice(flags);
        let run = aggregate_in_place(dir, &all);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let text = std::fs::read_to_string(out_dir.join("headline.json")).expect("headline");
        serde_json::from_str(&text).expect("json")
    };
    let restricted = headline(&full, &["--facts-of", half.to_str().expect("utf-8")], "a");
    let alone = headline(&half, &[], "b");
    let whole = headline(&full, &[], "c");
    assert_eq!(restricted, alone);
    assert_ne!(restricted["hidden"]["facts"], whole["hidden"]["facts"]);
    let missing = aggregate_in_place(&full, &["--facts-of", "/nonexistent/sweep"]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("--facts-of"), "{err}");
}
