//! `report.html`'s numbers and page on a hand-made sweep (in memory): the extreme facts in
//! the order their hand-set effects give, for a metric where higher is better and for raw
//! KL; the per-relation rows equal to Figure 2 over each relation's facts alone; and a page
//! with every section, every figure inline, and the facts' words escaped.

use bytes::Bytes;
use common::kinds::Kind;
use common::metric::{Metric, MetricValues};
use common::storage::Location;
use common::tables::{FactRow, TokenCategory, TraceRow, facts_batch, traces_batch, write_parquet};

use super::figure2::rollups;
use super::measure::{DEFAULT_FLOOR, Measure, Recovery, Scale};
use super::read::{FactFilter, read_sweep};
use super::report::{Report, esc, render};
use super::report_facts::{extremes, relation_rows};

const LAYERS: usize = 3;

/// Fact `id` of relation `relation`: three tokens, subject [0, 2), p clean 0.9 and corrupted
/// 0.1 (KL 0 and 2).
fn fact(id: u64, relation: &str) -> FactRow {
    let m = |prob: f64, kl: f64| MetricValues { prob, logprob: prob.ln(), logit_diff: 0.0, kl };
    FactRow {
        known_id: id,
        relation_id: Some(relation.into()),
        prompt: format!("<Sub{id}> & co are in"),
        subject: format!("<Sub{id}>"),
        attribute: "Paris".into(),
        tokens: vec!["<Sub".into(), format!("{id}>"), " in".into()],
        token_ids: vec![1, 2, 3],
        subject_start: 0,
        subject_end: 2,
        answer: " Paris".into(),
        answer_id: 5,
        high_score: 0.9,
        low_score: 0.1,
        correct: Some(true),
        traced: true,
        traced_tokens: vec![0, 1, 2],
        n_layers: LAYERS as u32,
        n_heads: 1,
        noise_level: Some(0.3),
        samples: 10,
        model: "m".into(),
        donor_known_id: None,
        donor_subject: None,
        donor_prompt: None,
        foil_id: 6,
        foil: " b".into(),
        clean: m(0.9, 0.0),
        corrupted: m(0.1, 2.0),
    }
}

/// Fact `id`'s rows of `kind`: p = `peak` at the last subject token (token 1) and layer
/// `layer`, 0.2 elsewhere; KL = 2 − 2p, so that the KL ranking mirrors p's.
fn rows(id: u64, kind: Kind, peak: f32, layer: u32) -> Vec<TraceRow> {
    let mut out = Vec::new();
    for token in 0..3u32 {
        for l in 0..LAYERS as u32 {
            let p = if token == 1 && l == layer { peak } else { 0.2 };
            out.push(TraceRow {
                known_id: id,
                kind,
                layer: l,
                token,
                head: None,
                category: TokenCategory::of(token as usize, (0, 2), 3),
                score: p,
                logprob: p.ln(),
                logit_diff: 0.0,
                kl: 2.0 - 2.0 * p,
            });
        }
    }
    out
}

/// Peaks of facts 1..=5 (their best p at the last subject token) and relations.
const FACTS: [(u64, &str, f32, u32); 5] = [
    (1, "P1", 0.5, 0),
    (2, "P1", 0.9, 2),
    (3, "P2", 0.3, 1),
    (4, "P2", 0.7, 1),
    (5, "P1", 0.25, 0),
];

async fn sweep() -> Location {
    let at = Location::open("memory:///report", true).expect("memory");
    let facts: Vec<FactRow> = FACTS.iter().map(|&(id, rel, _, _)| fact(id, rel)).collect();
    let batch = facts_batch(&facts).expect("facts");
    at.write("facts/part-0.parquet", write_parquet(&batch, "facts").expect("parquet"))
        .await
        .expect("write");
    let mut files = vec!["facts/part-0.parquet".to_string()];
    for kind in [Kind::Hidden, Kind::Mlp] {
        let all: Vec<TraceRow> =
            FACTS.iter().flat_map(|&(id, _, peak, layer)| rows(id, kind, peak, layer)).collect();
        let bytes = write_parquet(&traces_batch(&all).expect("traces"), "t").expect("pq");
        let name = format!("traces/kind={kind}/part-0.parquet");
        at.write(&name, bytes).await.expect("write");
        files.push(name);
    }
    let manifest = serde_json::json!({
        "sweep_id": "sweep-test", "state": "finished", "model": "/m/tiny.gguf",
        "created_unix": 0, "settings": {"schema": 4, "experiment": {"kinds": ["hidden", "mlp"]}},
    });
    at.write("manifest.json", Bytes::from(manifest.to_string())).await.expect("manifest");
    let commit = serde_json::json!({"seq": 1, "jobs": [], "files": files});
    at.write("_journal/00000001.json", Bytes::from(commit.to_string())).await.expect("journal");
    at
}

fn measure(metric: Metric) -> Measure {
    Measure { metric, scale: Scale::Raw, recovery: Recovery::RatioOfMeans, floor: DEFAULT_FLOOR }
}

#[tokio::test]
async fn extremes_rank_by_the_best_effect_at_the_last_subject_token() {
    let at = sweep().await;
    let s = read_sweep(&at, &measure(Metric::Prob)).await.expect("read");
    let (largest, smallest) = extremes(&s, FactFilter::Correct, Kind::Hidden, 2);
    let ids = |r: &[super::report_facts::Ranked]| r.iter().map(|r| r.known_id).collect::<Vec<_>>();
    assert_eq!((ids(&largest), ids(&smallest)), (vec![2, 4], vec![5, 3]));
    // Effect: the peak minus the fact's own corrupted p (0.1), at the peak's layer.
    assert!((largest[0].effect - 0.8).abs() < 1e-6 && largest[0].layer == 2, "{largest:?}");
    assert!((smallest[0].effect - 0.15).abs() < 1e-6 && smallest[0].layer == 0);
    // Five facts, three each way: three largest, the two left smallest, none twice.
    let (largest, smallest) = extremes(&s, FactFilter::Correct, Kind::Hidden, 3);
    assert_eq!((ids(&largest), ids(&smallest)), (vec![2, 4, 1], vec![5, 3]));
    // Raw KL: lower is better, so the largest effect is the most negative change.
    let kl = read_sweep(&at, &measure(Metric::Kl)).await.expect("read");
    let (largest, smallest) = extremes(&kl, FactFilter::Correct, Kind::Hidden, 2);
    assert_eq!((ids(&largest), ids(&smallest)), (vec![2, 4], vec![5, 3]));
    // KL at the peak 2 − 1.8 = 0.2, corrupted 2: effect −1.8.
    assert!((largest[0].effect + 1.8).abs() < 1e-6, "{largest:?}");
}

#[tokio::test]
async fn relation_rows_are_figure_2_over_each_relations_facts() {
    let at = sweep().await;
    let s = read_sweep(&at, &measure(Metric::Prob)).await.expect("read");
    let rows = relation_rows(&s, FactFilter::Correct, &[Kind::Hidden, Kind::Mlp]);
    assert_eq!(
        rows.iter().map(|r| (r.relation.as_str(), r.facts)).collect::<Vec<_>>(),
        [("P1", 3), ("P2", 2)]
    );
    for row in &rows {
        let mut alone = read_sweep(&at, &measure(Metric::Prob)).await.expect("read");
        alone.facts.retain(|f| f.relation_id.as_deref() == Some(row.relation.as_str()));
        let want = rollups(&alone, FactFilter::Correct);
        for (kind, subject, last) in &row.best {
            let h = &want[kind].headline;
            assert_eq!((*subject, *last), (h.best_last_subject, h.best_last_token), "{row:?}");
        }
    }
    // P2: facts 3 (0.3 at layer 1) and 4 (0.7 at layer 1): the mean at layer 1 is 0.5, less
    // the mean corrupted 0.1.
    let (_, subject, _) = rows[1].best[0];
    let (aie, layer) = subject.expect("traced");
    assert!((aie - 0.4).abs() < 1e-6 && layer == 1, "{subject:?}");
}

#[tokio::test]
async fn the_page_has_every_part_inline_and_escapes_the_words() {
    let at = sweep().await;
    let s = read_sweep(&at, &measure(Metric::Prob)).await.expect("read");
    assert_eq!(s.texts[&2].tokens[1], "2>");
    let r = rollups(&s, FactFilter::Correct);
    // Figure 2's SVGs as `figure2::write` leaves them beside the page.
    let dir = tempfile::tempdir().expect("tmp");
    let files = super::figure2::write(&s, &r, dir.path()).expect("figure 2");
    let page = render(&Report {
        sweep: &s,
        filter: FactFilter::Correct,
        results: "memory:///report",
        rollups: &r,
        figure3: None,
        heads: None,
        files: [&files, &[], &[]],
        note: None,
    })
    .expect("page");
    for id in ["settings", "headline", "figure2", "relations", "facts"] {
        assert!(page.contains(&format!("<section id=\"{id}\">")), "section {id}");
    }
    assert!(!page.contains("id=\"figure3\"") && !page.contains("id=\"heads\""));
    // Figure 2: two maps and the line plot; then two kinds for each of the 4 facts shown
    // (EXTREMES = 3 of 5: the 3 largest and the 2 left).
    let svgs = page.matches("<svg").count();
    assert_eq!(svgs, 3 + 2 * 5, "inline SVGs");
    assert_eq!(page.matches("</svg>").count(), svgs);
    assert!(!page.contains("<?xml"), "no XML prolog inside HTML");
    // Nothing fetched: no script, no external source or style sheet.
    for bad in ["<script", "src=", "<link", "url(", "@import"] {
        assert!(!page.contains(bad), "{bad} in the page");
    }
    // The words escaped; the subject in bold.
    assert!(!page.contains("<Sub2>") && page.contains("<b>&lt;Sub2&gt;</b> &amp; co are in"));
    assert!(page.contains("1970-01-01T00:00:00Z"), "times in UTC");
    assert!(page.contains("sweep-test") && page.contains("tiny"));
    assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
}
