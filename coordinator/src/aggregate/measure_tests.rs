//! The aggregate's measures on a hand-made sweep (in memory, no manifest): the metric's
//! columns are the ones read, each scale gives the hand-computed numbers, and a sweep
//! without the metric columns is refused for any metric but prob.

use bytes::Bytes;
use common::kinds::Kind;
use common::metric::{Metric, MetricValues};
use common::storage::Location;
use common::tables::{FactRow, TokenCategory, TraceRow, facts_batch, traces_batch, write_parquet};

use super::figure2::rollups;
use super::figure3;
use super::measure::{DEFAULT_FLOOR, Measure, Recovery, Scale};
use super::read::{FactFilter, read_sweep};

fn fact(known_id: u64, clean: MetricValues, corrupted: MetricValues) -> FactRow {
    FactRow {
        known_id,
        relation_id: None,
        prompt: "p".into(),
        subject: "s".into(),
        attribute: "a".into(),
        tokens: vec!["x".into(), "y".into()],
        token_ids: vec![1, 2],
        subject_start: 0,
        subject_end: 1,
        answer: " a".into(),
        answer_id: 5,
        high_score: clean.prob as f32,
        low_score: corrupted.prob as f32,
        correct: Some(true),
        traced: true,
        traced_tokens: vec![0, 1],
        n_layers: 1,
        n_heads: 1,
        noise_level: Some(0.3),
        samples: 10,
        model: "m".into(),
        donor_known_id: None,
        donor_subject: None,
        donor_prompt: None,
        foil_id: 6,
        foil: " b".into(),
        clean,
        corrupted,
    }
}

/// A row of token `token` (of 2, subject [0, 1)) whose logit difference is `ld` and whose
/// other metrics are values no test asks for (so reading the wrong column shows).
fn row(known_id: u64, kind: Kind, token: u32, ld: f32) -> TraceRow {
    TraceRow {
        known_id,
        kind,
        layer: 0,
        token,
        head: None,
        category: TokenCategory::of(token as usize, (0, 1), 2),
        score: 0.5,
        logprob: -7.0,
        logit_diff: ld,
        kl: 9.0,
    }
}

fn metrics(prob: f64, logit_diff: f64, kl: f64) -> MetricValues {
    MetricValues { prob, logprob: prob.ln(), logit_diff, kl }
}

/// Facts 1 (logit difference clean 4, corrupted 0) and 2 (clean 1, corrupted −1), two
/// tokens, one layer; `hidden` and `severed_attn`.
async fn sweep(schema4: bool) -> Location {
    let at = Location::open("memory:///sweep", true).expect("memory");
    let facts = [
        fact(1, metrics(0.8, 4.0, 0.0), metrics(0.2, 0.0, 2.0)),
        fact(2, metrics(0.6, 1.0, 0.0), metrics(0.4, -1.0, 1.0)),
    ];
    let mut batch = facts_batch(&facts).expect("facts");
    if !schema4 {
        let keep: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| {
                let name = batch.schema().field(i).name().clone();
                !name.starts_with("clean_") && !name.starts_with("corrupted_")
            })
            .collect();
        batch = batch.project(&keep).expect("project");
        let manifest = serde_json::json!({"settings": {"schema": 3}});
        at.write("manifest.json", Bytes::from(manifest.to_string())).await.expect("manifest");
    }
    at.write("facts/part-0.parquet", write_parquet(&batch, "facts").expect("parquet"))
        .await
        .expect("write");
    let hidden = [row(1, Kind::Hidden, 0, 2.0), row(1, Kind::Hidden, 1, 1.0)];
    let hidden = [hidden, [row(2, Kind::Hidden, 0, 0.0), row(2, Kind::Hidden, 1, 1.0)]];
    let severed = [row(1, Kind::SeveredAttn, 0, 1.0), row(1, Kind::SeveredAttn, 1, 0.5)];
    let severed = [severed, [row(2, Kind::SeveredAttn, 0, 0.0), row(2, Kind::SeveredAttn, 1, 0.0)]];
    let mut files = vec!["facts/part-0.parquet".to_string()];
    for (kind, rows) in [("hidden", hidden.concat()), ("severed_attn", severed.concat())] {
        let bytes = write_parquet(&traces_batch(&rows).expect("traces"), "traces").expect("pq");
        let name = format!("traces/kind={kind}/part-0.parquet");
        at.write(&name, bytes).await.expect("write");
        files.push(name);
    }
    // The commit that names them: the aggregate reads committed files only.
    let commit = serde_json::json!({"seq": 1, "jobs": [], "files": files});
    at.write("_journal/00000001.json", Bytes::from(commit.to_string())).await.expect("journal");
    at
}

fn measure(metric: Metric, scale: Scale, recovery: Recovery) -> Measure {
    Measure { metric, scale, recovery, floor: DEFAULT_FLOOR }
}

fn close(x: f64, y: f64) {
    assert!((x - y).abs() < 1e-12, "{x} vs {y}");
}

#[tokio::test]
async fn logit_difference_on_every_scale_by_hand() {
    let at = sweep(true).await;
    let ld = |scale, recovery| measure(Metric::LogitDiff, scale, recovery);
    // Raw. Last subject token (token 0): 2 and 0, mean 1, std 1; low (0 − 1) / 2 = −0.5,
    // high 2.5: AIE 1.5, ATE 3. Figure 3: severed 1 and 0, mean 0.5, AIE 1.
    let s = read_sweep(&at, &ld(Scale::Raw, Recovery::RatioOfMeans)).await.expect("read");
    let r = &rollups(&s, FactFilter::Correct)[&Kind::Hidden];
    close(r.cell(2, 0).aie, 1.5);
    close(r.cell(2, 0).std, 1.0);
    close(r.headline.ate, 3.0);
    let fig = figure3::compute(&s, FactFilter::Correct).expect("figure 3");
    close(fig.series[0].1[0].aie, 1.5);
    close(fig.series[1].1[0].aie, 1.0);
    // Ratio of means: everything over 3.
    let s = read_sweep(&at, &ld(Scale::Recovery, Recovery::RatioOfMeans)).await.expect("read");
    let r = &rollups(&s, FactFilter::Correct)[&Kind::Hidden];
    close(r.cell(2, 0).aie, 0.5);
    close(r.cell(2, 0).mean, 0.5);
    close(r.cell(2, 0).std, 1.0 / 3.0);
    assert_eq!((r.headline.high_score, r.headline.low_score, r.headline.ate), (1.0, 0.0, 1.0));
    let fig = figure3::compute(&s, FactFilter::Correct).expect("figure 3");
    close(fig.series[0].1[0].aie, 0.5);
    close(fig.series[1].1[0].aie, 1.0 / 3.0);
    // Per fact: fact 1 (v − 0) / 4, fact 2 (v + 1) / 2. Token 0: 0.5 and 0.5; token 1
    // (the last): 0.25 and 1, mean 0.625, std 0.375. Severed token 0: 0.25 and 0.5.
    let s = read_sweep(&at, &ld(Scale::Recovery, Recovery::PerFact)).await.expect("read");
    let r = &rollups(&s, FactFilter::Correct)[&Kind::Hidden];
    close(r.cell(2, 0).aie, 0.5);
    close(r.cell(2, 0).std, 0.0);
    close(r.cell(5, 0).aie, 0.625);
    close(r.cell(5, 0).std, 0.375);
    assert_eq!((r.headline.high_score, r.headline.low_score, r.headline.ate), (1.0, 0.0, 1.0));
    let fig = figure3::compute(&s, FactFilter::Correct).expect("figure 3");
    close(fig.series[1].1[0].aie, 0.375);
}

#[tokio::test]
async fn each_metric_reads_its_own_columns() {
    let at = sweep(true).await;
    // Every row's kl is 9; the facts' corrupted KL 2 and 1, clean 0: AIE 9 − 1.5, ATE −1.5.
    let s = read_sweep(&at, &measure(Metric::Kl, Scale::Raw, Recovery::RatioOfMeans))
        .await
        .expect("read");
    let r = &rollups(&s, FactFilter::Correct)[&Kind::Hidden];
    close(r.cell(0, 0).aie, 7.5);
    close(r.headline.ate, -1.5);
    // prob: score 0.5 everywhere, high_score and low_score (f32) as before metrics.
    let s = read_sweep(
        &at,
        &Measure {
            metric: Metric::Prob,
            ..measure(Metric::Kl, Scale::Raw, Recovery::RatioOfMeans)
        },
    )
    .await
    .expect("read");
    let r = &rollups(&s, FactFilter::Correct)[&Kind::Hidden];
    let low = (f64::from(0.2f32) + f64::from(0.4f32)) / 2.0;
    assert_eq!(r.cell(0, 0).aie, 0.5 - low);
    // logprob: −7 everywhere; corrupted ln 0.2 and ln 0.4.
    let s = read_sweep(&at, &measure(Metric::Logprob, Scale::Raw, Recovery::RatioOfMeans))
        .await
        .expect("read");
    let r = &rollups(&s, FactFilter::Correct)[&Kind::Hidden];
    close(r.cell(0, 0).aie, -7.0 - (0.2f64.ln() + 0.4f64.ln()) / 2.0);
}

#[tokio::test]
async fn a_sweep_without_metric_columns_is_refused_for_other_metrics() {
    let at = sweep(false).await;
    let raw = |metric| measure(metric, Scale::Raw, Recovery::RatioOfMeans);
    let prob = read_sweep(&at, &raw(Metric::Prob)).await.expect("prob reads a schema 3 sweep");
    assert!(rollups(&prob, FactFilter::Correct).contains_key(&Kind::Hidden));
    for metric in [Metric::Logprob, Metric::LogitDiff, Metric::Kl] {
        let err = read_sweep(&at, &raw(metric)).await.err().expect("refused");
        let text = format!("{err:#}");
        assert!(text.contains(&format!("--metric {metric}")), "{text}");
        assert!(text.contains("schema 3") && text.contains("--metric prob"), "{text}");
    }
}

/// A Parquet file no journal commit names (a flush that crashed before its commit, or one
/// in progress while the sweep is read) is not read: its facts and rows are absent.
#[tokio::test]
async fn files_no_commit_names_are_not_read() {
    let at = sweep(true).await;
    let raw = measure(Metric::Prob, Scale::Raw, Recovery::RatioOfMeans);
    let before = read_sweep(&at, &raw).await.expect("read");
    let extra = [fact(9, metrics(0.5, 1.0, 0.0), metrics(0.1, 0.0, 1.0))];
    let batch = facts_batch(&extra).expect("facts");
    at.write("facts/part-1.parquet", write_parquet(&batch, "facts").expect("parquet"))
        .await
        .expect("write");
    let rows = [row(9, Kind::Hidden, 0, 1.0), row(9, Kind::Hidden, 1, 1.0)];
    let bytes = write_parquet(&traces_batch(&rows).expect("traces"), "traces").expect("pq");
    at.write("traces/kind=hidden/part-1.parquet", bytes).await.expect("write");
    let after = read_sweep(&at, &raw).await.expect("read");
    assert_eq!(after.facts.len(), before.facts.len());
    assert!(after.facts.iter().all(|f| f.known_id != 9));
    assert_eq!(after.tables[&Kind::Hidden].len(), before.tables[&Kind::Hidden].len());
}
