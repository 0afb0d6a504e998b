//! `report.html`: the page to open first. One self-contained file (the figures inlined as
//! SVG, the style in the page, no script and nothing fetched) with, in order: the sweep's
//! settings, the headline numbers, Figure 2 (and Figure 3 and the per-head maps when the
//! sweep has them), the per-relation table, and the facts with the largest and smallest
//! best indirect effect at the last subject token, each with its prompt and heatmaps. Every
//! number is one `coordinator aggregate` prints or writes beside it, in the same measure.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use common::fact_texts::FactText;
use common::kinds::Kind;
use common::rollup::Rollup;

use super::figure3::Figure3;
use super::read::{FactFilter, SweepTables};
use super::report_facts::{Ranked, extremes, fact_heatmap, relation_rows};

/// How many facts each end of the ranking shows.
const EXTREMES: usize = 3;

/// Everything the report shows.
pub struct Report<'a> {
    /// The sweep, read.
    pub sweep: &'a SweepTables,
    /// Which facts were averaged.
    pub filter: FactFilter,
    /// The `--results` the sweep was read from.
    pub results: &'a str,
    /// Figure 2's rollups.
    pub rollups: &'a BTreeMap<Kind, Rollup>,
    /// Figure 3, when the sweep has it.
    pub figure3: Option<&'a Figure3>,
    /// The per-head rollup, when the sweep has it.
    pub heads: Option<&'a Rollup>,
    /// The files each part wrote, Figure 2's, Figure 3's and the heads': their SVGs are
    /// inlined.
    pub files: [&'a [PathBuf]; 3],
    /// A note on the facts averaged (`--facts-of`), when there is one.
    pub note: Option<String>,
}

/// Text made safe inside HTML elements and attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;\
padding:1em 2em;color:#222;line-height:1.4}h1{margin-bottom:.2em}h2{border-bottom:1px solid \
#ccc;padding-bottom:.2em;margin-top:2em}.lede{color:#555;margin-top:0}nav a{margin-right:1em}\
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ddd;\
padding:.25em .6em;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}\
th{background:#f4f4f4}figure{margin:1em 0}figure svg{max-width:100%;height:auto;display:block}\
figcaption{color:#555;font-size:.9em}.fact{border-left:4px solid #bbb;padding-left:1em;\
margin:1.5em 0}.fact figure svg{max-width:760px}.prompt{font-size:1.1em}.prompt b{background:#f0e6ff}pre{background:#f7f7f7;\
padding:.8em;overflow:auto;font-size:.85em}";

/// Writes `report.html` into `out`; returns its path.
pub fn write(report: &Report<'_>, out: &Path) -> anyhow::Result<PathBuf> {
    let html = render(report)?;
    let path = out.join("report.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The page.
pub fn render(r: &Report<'_>) -> anyhow::Result<String> {
    let sweep = r.sweep;
    let m = &sweep.measure;
    let id = sweep.manifest.as_ref().and_then(|m| m["sweep_id"].as_str()).unwrap_or(r.results);
    let mut h = String::new();
    writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Causal trace of {model}: {id}</title><style>{STYLE}</style></head><body>",
        model = esc(&sweep.model),
        id = esc(id),
    )?;
    writeln!(h, "<h1>Causal trace of {}</h1>", esc(&sweep.model))?;
    writeln!(h, "<p class=\"lede\">{} · {}</p>", esc(id), esc(&m.describe()))?;
    let mut nav = vec![("settings", "Settings"), ("headline", "Headline")];
    if !r.rollups.is_empty() {
        nav.push(("figure2", "Figure 2"));
    }
    if r.figure3.is_some() {
        nav.push(("figure3", "Figure 3"));
    }
    if r.heads.is_some() {
        nav.push(("heads", "Heads"));
    }
    if !r.rollups.is_empty() {
        nav.extend([("relations", "By relation"), ("facts", "Facts")]);
    }
    h.push_str("<nav>");
    for (anchor, title) in &nav {
        write!(h, "<a href=\"#{anchor}\">{title}</a>")?;
    }
    h.push_str("</nav>\n");
    settings(r, &mut h)?;
    headline(r, &mut h)?;
    if !r.rollups.is_empty() {
        section(&mut h, "figure2", "Figure 2: average indirect effects")?;
        writeln!(
            h,
            "<p>The effect of restoring one state (or a window of {} MLP or attention outputs) \
             from the clean run into the corrupted one, averaged over the facts, by token \
             and layer.</p>",
            sweep.window
        )?;
        figures(r.files[0], &mut h)?;
    }
    if let Some(fig) = r.figure3 {
        section(&mut h, "figure3", "Figure 3: restoring a state with a path severed")?;
        writeln!(
            h,
            "<p>{} facts, complete in every series. The last subject token's hidden state \
             restored as usual, and with the MLP or attention of the later layers kept at \
             their corrupted outputs.</p>",
            fig.facts
        )?;
        figures(r.files[1], &mut h)?;
    }
    if let Some(heads) = r.heads {
        section(&mut h, "heads", "Per-head restoration")?;
        writeln!(
            h,
            "<p>{} facts; one head's output restored at a time.</p>",
            heads.headline.facts
        )?;
        figures(r.files[2], &mut h)?;
    }
    if !r.rollups.is_empty() {
        relations(r, &mut h)?;
        facts(r, &mut h)?;
    }
    writeln!(
        h,
        "<footer><p class=\"lede\">Written by <code>coordinator aggregate</code> from {}. \
         The tables beside this file hold every number shown.</p></footer></body></html>",
        esc(r.results)
    )?;
    Ok(h)
}

fn section(h: &mut String, anchor: &str, title: &str) -> std::fmt::Result {
    writeln!(h, "<section id=\"{anchor}\"><h2>{title}</h2>")
}

/// A number in a table cell, to 4 significant decimals.
fn num(v: f64) -> String {
    if v.is_finite() { format!("<td class=\"num\">{v:.4}</td>") } else { "<td>–</td>".into() }
}

fn best(b: Option<(f64, usize)>) -> String {
    match b {
        Some((v, layer)) if v.is_finite() => {
            format!("<td class=\"num\">{v:.4} (layer {layer})</td>")
        }
        _ => "<td>not traced</td>".into(),
    }
}

/// The manifest's fields as rows of dotted names, nested objects flattened.
fn flatten(prefix: &str, value: &serde_json::Value, rows: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&name, v, rows);
            }
        }
        serde_json::Value::String(s) => rows.push((prefix.into(), s.clone())),
        v => rows.push((prefix.into(), v.to_string())),
    }
}

/// The settings a reader looks for first, by their names in the flattened manifest; the
/// whole manifest follows, folded.
const KEY_SETTINGS: [(&str, &str); 19] = [
    ("sweep", "sweep_id"),
    ("state", "state"),
    ("model", "model"),
    ("layers", "n_layers"),
    ("heads", "n_heads"),
    ("dtype", "settings.dtype"),
    ("dataset", "knowns"),
    ("facts in the sweep", "dataset.in_sweep"),
    ("facts traced", "rows.facts_traced"),
    ("corruption", "settings.experiment.corruption.type"),
    ("noise", "noise.spec"),
    ("noise level", "noise.level"),
    ("samples", "settings.experiment.corruption.samples"),
    ("kinds", "settings.experiment.kinds"),
    ("window", "settings.experiment.window"),
    ("tokens", "settings.experiment.tokens"),
    ("correctness", "settings.experiment.correctness"),
    ("direction", "settings.experiment.direction"),
    ("records with errors", "rows.errors"),
];

fn settings(r: &Report<'_>, h: &mut String) -> anyhow::Result<()> {
    section(h, "settings", "Settings")?;
    let Some(manifest) = &r.sweep.manifest else {
        writeln!(h, "<p>The sweep folder has no manifest.json.</p></section>")?;
        return Ok(());
    };
    let mut rows = Vec::new();
    flatten("", manifest, &mut rows);
    for (name, value) in &mut rows {
        if name.ends_with("_unix")
            && let Ok(secs) = value.parse::<u64>()
        {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            *value = humantime::format_rfc3339_seconds(t).to_string();
        }
    }
    let lookup: HashMap<&str, &str> = rows.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    h.push_str("<table>");
    for (label, name) in KEY_SETTINGS {
        if let Some(value) = lookup.get(name) {
            write!(h, "<tr><th>{label}</th><td>{}</td></tr>", esc(value))?;
        }
    }
    h.push_str("</table>\n<details><summary>The whole manifest</summary><table>");
    for (name, value) in &rows {
        write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(name), esc(value))?;
    }
    writeln!(h, "</table></details></section>")?;
    Ok(())
}

fn headline(r: &Report<'_>, h: &mut String) -> anyhow::Result<()> {
    let sweep = r.sweep;
    let m = &sweep.measure;
    section(h, "headline", "Headline")?;
    let which = match r.filter {
        FactFilter::Correct => "correctly predicted and traced",
        FactFilter::All => "traced (all, predicted or not)",
    };
    writeln!(
        h,
        "<p>{} facts in the sweep, {} {which}; {} layers, {} heads. {}</p>",
        sweep.facts.len(),
        sweep.kept(r.filter),
        sweep.geometry.n_layers,
        sweep.geometry.n_heads,
        esc(r.note.as_deref().unwrap_or("")),
    )?;
    if r.rollups.is_empty() {
        writeln!(h, "</section>")?;
        return Ok(());
    }
    let effect = m.effect();
    writeln!(
        h,
        "<table><tr><th>kind</th><th>facts</th><th>clean</th><th>corrupted</th><th>ATE</th>\
         <th>best {effect}, last subject token</th><th>best {effect}, last token</th></tr>"
    )?;
    for (kind, rollup) in r.rollups {
        let x = &rollup.headline;
        writeln!(
            h,
            "<tr><td>{kind}</td><td class=\"num\">{}</td>{}{}{}{}{}</tr>",
            x.facts,
            num(x.high_score),
            num(x.low_score),
            num(x.ate),
            best(x.best_last_subject),
            best(x.best_last_token),
        )?;
    }
    writeln!(
        h,
        "</table><p class=\"lede\">clean and corrupted: the mean {q} of the clean and the \
         corrupted runs; ATE: their difference; {effect}: the mean after restoring minus \
         the mean corrupted (docs/science.md).</p></section>",
        q = esc(m.quantity())
    )?;
    Ok(())
}

/// Inlines every SVG among `files`, each captioned with its file name.
fn figures(files: &[PathBuf], h: &mut String) -> anyhow::Result<()> {
    let svgs: Vec<&PathBuf> =
        files.iter().filter(|f| f.extension().is_some_and(|e| e == "svg")).collect();
    if svgs.is_empty() {
        writeln!(
            h,
            "<p>No figures: the sweep traced only some tokens; the tables hold its numbers.</p>"
        )?;
    }
    for file in svgs {
        let svg =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let stem = file.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        figure(h, &stem, &svg, &format!("{stem}.svg (and .png) beside this file"))?;
    }
    writeln!(h, "</section>")?;
    Ok(())
}

/// One inlined SVG (from its `<svg` on: no XML prolog inside HTML).
fn figure(h: &mut String, id: &str, svg: &str, caption: &str) -> std::fmt::Result {
    let body = svg.find("<svg").map_or(svg, |i| &svg[i..]);
    writeln!(
        h,
        "<figure id=\"fig-{}\">{body}<figcaption>{}</figcaption></figure>",
        esc(id),
        esc(caption)
    )
}

fn relations(r: &Report<'_>, h: &mut String) -> anyhow::Result<()> {
    let sweep = r.sweep;
    let kinds: Vec<Kind> = r.rollups.keys().copied().collect();
    let rows = relation_rows(sweep, r.filter, &kinds);
    section(h, "relations", "By relation")?;
    let effect = sweep.measure.effect();
    writeln!(
        h,
        "<p>Each Wikidata relation's facts averaged as Figure 2 averages them all: the best \
         {effect} at the last subject token and at the last token (queries/per_relation.sql \
         gives the same numbers).</p><table><tr><th>relation</th><th>facts</th>"
    )?;
    for kind in &kinds {
        write!(h, "<th>{kind}: last subject</th><th>{kind}: last</th>")?;
    }
    h.push_str("</tr>\n");
    for row in rows {
        write!(h, "<tr><td>{}</td><td class=\"num\">{}</td>", esc(&row.relation), row.facts)?;
        for (_, subject, last) in &row.best {
            write!(h, "{}{}", best(*subject), best(*last))?;
        }
        h.push_str("</tr>\n");
    }
    writeln!(h, "</table></section>")?;
    Ok(())
}

fn facts(r: &Report<'_>, h: &mut String) -> anyhow::Result<()> {
    let sweep = r.sweep;
    section(h, "facts", "The strongest and the weakest facts")?;
    let kind = if r.rollups.contains_key(&Kind::Hidden) {
        Kind::Hidden
    } else {
        *r.rollups.keys().next().context("a kind to rank by")?
    };
    let (largest, smallest) = extremes(sweep, r.filter, kind, EXTREMES);
    if largest.is_empty() {
        writeln!(h, "<p>No fact traced its last subject token in every layer.</p></section>")?;
        return Ok(());
    }
    writeln!(
        h,
        "<p>Ranked by each fact's best effect of restoring <code>{kind}</code> at its last \
         subject token: the best over the layers of its value minus its own corrupted value, \
         in {}.</p>",
        esc(sweep.measure.quantity())
    )?;
    for (title, group) in [("Largest", &largest), ("Smallest", &smallest)] {
        if group.is_empty() {
            continue;
        }
        writeln!(h, "<h3>{title} best effect</h3>")?;
        for ranked in group.iter() {
            fact(r, kind, ranked, h)?;
        }
    }
    writeln!(h, "</section>")?;
    Ok(())
}

/// The prompt with its subject in bold, when the subject occurs in it.
fn prompt_html(text: &FactText) -> String {
    match text.prompt.find(&text.subject) {
        Some(i) if !text.subject.is_empty() => format!(
            "{}<b>{}</b>{}",
            esc(&text.prompt[..i]),
            esc(&text.subject),
            esc(&text.prompt[i + text.subject.len()..])
        ),
        _ => esc(&text.prompt),
    }
}

fn fact(r: &Report<'_>, kind: Kind, ranked: &Ranked, h: &mut String) -> anyhow::Result<()> {
    let sweep = r.sweep;
    let Some(fact) = sweep.facts.iter().find(|f| f.known_id == ranked.known_id) else {
        return Ok(());
    };
    let text = sweep.texts.get(&fact.known_id);
    writeln!(h, "<article class=\"fact\" id=\"fact-{}\">", fact.known_id)?;
    match text {
        Some(t) => writeln!(
            h,
            "<p class=\"prompt\">Fact {}: “{}” → <code>{}</code> (dataset: {})</p>",
            fact.known_id,
            prompt_html(t),
            esc(t.answer.trim()),
            esc(&t.attribute)
        )?,
        None => writeln!(h, "<p class=\"prompt\">Fact {}</p>", fact.known_id)?,
    }
    let (clean, corrupted) =
        sweep.levels.get(&fact.known_id).copied().unwrap_or((f64::NAN, f64::NAN));
    writeln!(
        h,
        "<p>clean {clean:.4}, corrupted {corrupted:.4}; best effect of <code>{kind}</code> at \
         the last subject token {:.4} at layer {}; relation {}.</p>",
        ranked.effect,
        ranked.layer,
        esc(fact.relation_id.as_deref().unwrap_or("(none)")),
    )?;
    for &k in r.rollups.keys() {
        if let Some(map) = fact_heatmap(sweep, fact, text, k) {
            let svg = map.svg().with_context(|| format!("fact {} {k}", fact.known_id))?;
            figure(
                h,
                &format!("{}-{k}", fact.known_id),
                &svg,
                &format!("fact {}, {k}", fact.known_id),
            )?;
        }
    }
    writeln!(h, "</article>")?;
    Ok(())
}
