//! ROME's averaged causal effects (notebook `average_causal_effects`, docs/science.md §7–8):
//! over the facts averaged, the mean score of each token category at each layer, minus the
//! mean `low_score`. Pure arithmetic over tables already in memory, so that hand-computed
//! cases test it directly.
//!
//! The notebook's conventions, kept exactly: with subject tokens `[b, e)` and T tokens, the
//! rows are first subject `b`, middle subject `b+1 .. e-1` (exclusive: none for one- or
//! two-token subjects), last subject `e-1`, first subsequent `e`, further `e+1 .. T-1`
//! (exclusive), last `T-1`. Categories overlap: a one-token subject's token counts as both
//! first and last subject, and when `e = T-1` the last token is also the first subsequent
//! one. A subject that ends the prompt (`e = T`) has no first subsequent token (the notebook
//! would index past the end; here that fact simply adds no row there). Each cell's mean and
//! standard deviation (numpy's, ddof 0) run over rows, so middle and further tokens weigh by
//! their number; `n` counts those rows.

/// The six rows of Figure 2, top to bottom.
pub const CATEGORIES: [&str; 6] =
    ["first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last"];

/// The labels the paper prints beside those rows.
pub const CATEGORY_LABELS: [&str; 6] = [
    "First subject token",
    "Middle subject tokens",
    "Last subject token",
    "First subsequent token",
    "Further tokens",
    "Last token",
];

/// One fact's trace table for one kind.
#[derive(Debug, Clone)]
pub struct FactTable<'a> {
    /// Subject tokens `[b, e)`.
    pub subject: (usize, usize),
    /// p(answer), clean.
    pub high_score: f64,
    /// Mean p(answer), corrupted.
    pub low_score: f64,
    /// `scores[t][c]`, T rows of the token's cells (L; or L × H, layer-major, for a kind
    /// with a head axis); a token that was not traced has an empty row.
    pub scores: &'a [Vec<f64>],
}

/// The token rows of each category, as `CATEGORIES` orders them.
pub fn category_rows(subject: (usize, usize), t_len: usize) -> [Vec<usize>; 6] {
    let (b, e) = subject;
    let last_e = e.saturating_sub(1);
    let last = t_len.saturating_sub(1);
    [
        vec![b],
        (b + 1..last_e).collect(),
        vec![last_e],
        if e < t_len { vec![e] } else { Vec::new() },
        (e + 1..last).collect(),
        vec![last],
    ]
}

/// One cell of Figure 2.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Index into [`CATEGORIES`].
    pub category: usize,
    /// The layer.
    pub layer: usize,
    /// Mean score of the category's rows at this layer.
    pub mean: f64,
    /// `mean` minus the mean low_score: the average indirect effect.
    pub aie: f64,
    /// Standard deviation of those scores (ddof 0, as numpy's `std`).
    pub std: f64,
    /// Rows averaged.
    pub n: usize,
}

/// The headline figures of one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Headline {
    /// Facts averaged.
    pub facts: usize,
    /// Mean high_score.
    pub high_score: f64,
    /// Mean low_score.
    pub low_score: f64,
    /// Average total effect: mean high − mean low.
    pub ate: f64,
    /// Best AIE at the last subject token, and its layer; `None` when no fact has that
    /// category's rows (a token selector that left it out).
    pub best_last_subject: Option<(f64, usize)>,
    /// Best AIE at the last token, and its layer; `None` as above.
    pub best_last_token: Option<(f64, usize)>,
}

/// Figure 2 for one kind: the cells (category-major, then layer) and the headline.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    /// Layers L.
    pub n_layers: usize,
    /// 6 × L cells.
    pub cells: Vec<Cell>,
    /// The headline figures.
    pub headline: Headline,
}

impl Rollup {
    /// The cell of `category` at `layer`.
    pub fn cell(&self, category: usize, layer: usize) -> &Cell {
        &self.cells[category * self.n_layers + layer]
    }
}

/// Averages `facts` (each T rows of the same `n_layers` cells; for a kind with a head axis
/// call it with L × H "layers", one per (layer, head)). `None` when there is no fact.
pub fn rollup(facts: &[FactTable<'_>], n_layers: usize) -> Option<Rollup> {
    rollup_of(facts, n_layers, [true; 6])
}

/// [`rollup`] of the categories marked in `categories` (as [`CATEGORIES`] orders them); the
/// others get no rows. A sweep that traced only some tokens averages only the categories
/// its selector asked for: a category it did not ask for would otherwise average the few
/// facts whose asked-for tokens happen to fall in it too (a one-token subject's last token
/// is also its first).
pub fn rollup_of(
    facts: &[FactTable<'_>],
    n_layers: usize,
    categories: [bool; 6],
) -> Option<Rollup> {
    if facts.is_empty() || n_layers == 0 {
        return None;
    }
    // Per category and layer: count, sum, sum of squares (f64; the notebook's numpy
    // arrays are float32 promoted by mean/std to float32 too, but f64 is the exact value).
    let mut sums = vec![(0usize, vec![0f64; n_layers], vec![0f64; n_layers]); CATEGORIES.len()];
    for fact in facts {
        let rows = category_rows(fact.subject, fact.scores.len());
        for (c, tokens) in rows.iter().enumerate().filter(|(c, _)| categories[*c]) {
            for &t in tokens {
                // A token the experiment did not trace has an empty row.
                let Some(row) = fact.scores.get(t).filter(|r| !r.is_empty()) else { continue };
                let (count, sum, squares) = &mut sums[c];
                *count += 1;
                for (l, &v) in row.iter().take(n_layers).enumerate() {
                    sum[l] += v;
                    squares[l] += v * v;
                }
            }
        }
    }
    let n_facts = facts.len() as f64;
    let low = facts.iter().map(|f| f.low_score).sum::<f64>() / n_facts;
    let high = facts.iter().map(|f| f.high_score).sum::<f64>() / n_facts;
    let mut cells = Vec::with_capacity(CATEGORIES.len() * n_layers);
    for (c, (count, sum, squares)) in sums.iter().enumerate() {
        for l in 0..n_layers {
            let (mean, std) = if *count == 0 {
                (f64::NAN, f64::NAN)
            } else {
                let n = *count as f64;
                let mean = sum[l] / n;
                (mean, (squares[l] / n - mean * mean).max(0.0).sqrt())
            };
            cells.push(Cell { category: c, layer: l, mean, aie: mean - low, std, n: *count });
        }
    }
    let headline = Headline {
        facts: facts.len(),
        high_score: high,
        low_score: low,
        ate: high - low,
        best_last_subject: best(&cells, n_layers, 2, Better::Higher),
        best_last_token: best(&cells, n_layers, 5, Better::Higher),
    };
    Some(Rollup { n_layers, cells, headline })
}

/// The best AIE of `category` and its layer: the largest, or the smallest for a metric that
/// falls toward the clean run.
fn best(cells: &[Cell], n_layers: usize, category: usize, better: Better) -> Option<(f64, usize)> {
    let sign = better.sign();
    cells[category * n_layers..(category + 1) * n_layers]
        .iter()
        .filter(|cell| cell.aie.is_finite())
        .max_by(|a, b| (sign * a.aie).total_cmp(&(sign * b.aie)))
        .map(|cell| (cell.aie, cell.layer))
}

/// Which way a metric moves from the corrupted run toward the clean one: up for p(o),
/// log p(o), the logit difference and every recovery; down for KL from the clean run (0 when
/// clean). The best AIE is the one furthest that way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Larger is cleaner.
    Higher,
    /// Smaller is cleaner.
    Lower,
}

impl Better {
    /// +1 or −1: an effect times this is larger the cleaner it is.
    pub fn sign(self) -> f64 {
        match self {
            Better::Higher => 1.0,
            Better::Lower => -1.0,
        }
    }
}

/// An affine map of a metric's values, `v ↦ (v − shift) / scale`: recovery is one (docs in
/// `coordinator aggregate --scale`), raw values the identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rescale {
    /// The value mapped to 0.
    pub shift: f64,
    /// The distance mapped to 1 (negative when the clean value is below the corrupted one).
    pub scale: f64,
}

impl Rescale {
    /// Raw values: `(v − 0) / 1` is `v` exactly, so raw numbers stay bit for bit.
    pub const IDENTITY: Rescale = Rescale { shift: 0.0, scale: 1.0 };

    /// Recovery as a ratio of means: the mean corrupted value `low` to 0 and the mean clean
    /// value `high` to 1, so an averaged effect becomes AIE / ATE.
    pub fn ratio_of_means(high: f64, low: f64) -> Self {
        Rescale { shift: low, scale: high - low }
    }

    /// One fact's recovery: its corrupted value to 0 and its clean value to 1, the distance
    /// `clean − corrupted` kept at least `floor` from 0 (with its sign; exactly 0 counts as
    /// positive) so that a fact the corruption barely moved cannot blow the average up.
    pub fn per_fact(clean: f64, corrupted: f64, floor: f64) -> Self {
        let den = clean - corrupted;
        let scale = if den.abs() >= floor {
            den
        } else if den < 0.0 {
            -floor
        } else {
            floor
        };
        Rescale { shift: corrupted, scale }
    }

    /// `v` mapped (`+ 0.0` turns the −0 of `0 / negative scale` into 0, which prints so).
    pub fn value(self, v: f64) -> f64 {
        (v - self.shift) / self.scale + 0.0
    }

    /// A standard deviation of values mapped.
    pub fn spread(self, std: f64) -> f64 {
        std / self.scale.abs()
    }
}

impl Rollup {
    /// The best AIEs found again for a metric that moves `better` toward the clean run.
    pub fn toward(mut self, better: Better) -> Self {
        self.headline.best_last_subject = best(&self.cells, self.n_layers, 2, better);
        self.headline.best_last_token = best(&self.cells, self.n_layers, 5, better);
        self
    }

    /// Every value mapped by `map` (means, AIEs, standard deviations, high, low, ATE), the
    /// best AIEs found again for a metric that moves `better` toward the clean run. With
    /// [`Rescale::ratio_of_means`] of the headline's high and low, each AIE becomes AIE / ATE
    /// and the ATE 1.
    pub fn rescaled(&self, map: Rescale, better: Better) -> Rollup {
        let h = &self.headline;
        let (high, low) = (map.value(h.high_score), map.value(h.low_score));
        let cells = self
            .cells
            .iter()
            .map(|c| {
                let mean = map.value(c.mean);
                Cell { mean, aie: mean - low, std: map.spread(c.std), ..c.clone() }
            })
            .collect();
        let headline = Headline { high_score: high, low_score: low, ate: high - low, ..h.clone() };
        Rollup { n_layers: self.n_layers, cells, headline }.toward(better)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: &[[f64; 2]]) -> Vec<Vec<f64>> {
        rows.iter().map(|r| r.to_vec()).collect()
    }

    #[test]
    fn rows_follow_the_notebook_including_its_edge_cases() {
        // T = 7, subject [1, 4): first 1, middle 2, last 3, first after 4, further 5, last 6.
        assert_eq!(
            category_rows((1, 4), 7),
            [vec![1], vec![2], vec![3], vec![4], vec![5], vec![6]]
        );
        // One-token subject: no middle; it is both first and last subject.
        assert_eq!(category_rows((0, 1), 4), [vec![0], vec![], vec![0], vec![1], vec![2], vec![3]]);
        // First subsequent token is the last token: no further tokens.
        assert_eq!(category_rows((0, 2), 3), [vec![0], vec![], vec![1], vec![2], vec![], vec![2]]);
        // The subject ends the prompt: no first subsequent, no further.
        assert_eq!(category_rows((1, 3), 3), [vec![1], vec![], vec![2], vec![], vec![], vec![2]]);
    }

    /// Untraced tokens (empty rows) add nothing, and a category the selector did not ask
    /// for gets no rows even where an asked-for token falls in it too.
    #[test]
    fn selected_tokens_fill_only_their_categories() {
        // T = 3, a one-token subject [0, 1): only the last subject token was traced.
        let rows = vec![vec![0.5, 0.7], Vec::new(), Vec::new()];
        let fact = FactTable { subject: (0, 1), high_score: 0.9, low_score: 0.1, scores: &rows };
        let asked = [false, false, true, false, false, false];
        let r = rollup_of(std::slice::from_ref(&fact), 2, asked).expect("rollup");
        assert_eq!((r.cell(2, 1).n, r.cell(2, 1).mean), (1, 0.7));
        assert_eq!(r.cell(0, 0).n, 0, "first subject not asked for");
        assert_eq!(r.cell(5, 0).n, 0, "the last token was not traced");
        let every = rollup(&[fact], 2).expect("rollup");
        assert_eq!(every.cell(0, 0).n, 1, "the same token is the first subject token");
        assert_eq!(every.headline.best_last_token, None);
        assert_eq!(r.headline.best_last_subject, Some((0.7 - 0.1, 1)));
    }

    #[test]
    fn hand_computed_averages() {
        // Fact A: T = 4, subject [0, 1), L = 2, low 0.1, high 0.9.
        let a = table(&[[0.5, 0.3], [0.2, 0.2], [0.1, 0.4], [0.6, 0.8]]);
        // Fact B: T = 5, subject [1, 4), low 0.3, high 0.5.
        let b = table(&[[0.0, 0.0], [0.4, 0.2], [0.6, 0.6], [0.8, 0.2], [0.2, 0.4]]);
        let facts = [
            FactTable { subject: (0, 1), high_score: 0.9, low_score: 0.1, scores: &a },
            FactTable { subject: (1, 4), high_score: 0.5, low_score: 0.3, scores: &b },
        ];
        let r = rollup(&facts, 2).expect("rollup");
        let low = 0.2;
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        // First subject: A token 0 (0.5, 0.3), B token 1 (0.4, 0.2).
        close(r.cell(0, 0).mean, 0.45);
        close(r.cell(0, 0).aie, 0.45 - low);
        close(r.cell(0, 0).std, 0.05);
        assert_eq!(r.cell(0, 0).n, 2);
        // Middle subject: only B token 2 (0.6, 0.6); A has none.
        close(r.cell(1, 1).mean, 0.6);
        assert_eq!(r.cell(1, 1).n, 1);
        close(r.cell(1, 1).std, 0.0);
        // Last subject: A token 0 (0.5, 0.3), B token 3 (0.8, 0.2).
        close(r.cell(2, 0).mean, 0.65);
        close(r.cell(2, 1).mean, 0.25);
        // First subsequent: A token 1 (0.2, 0.2); B token 4 = its last token (0.2, 0.4).
        close(r.cell(3, 1).mean, 0.3);
        // Further: A token 2 (0.1, 0.4); B none.
        close(r.cell(4, 0).mean, 0.1);
        assert_eq!(r.cell(4, 0).n, 1);
        // Last: A token 3 (0.6, 0.8), B token 4 (0.2, 0.4).
        close(r.cell(5, 1).mean, 0.6);
        close(r.cell(5, 1).std, 0.2);
        let h = &r.headline;
        close(h.ate, 0.7 - 0.2);
        let (aie, layer) = h.best_last_subject.expect("last subject traced");
        close(aie, 0.65 - low);
        assert_eq!(layer, 0);
        let (aie, layer) = h.best_last_token.expect("last token traced");
        close(aie, 0.6 - low);
        assert_eq!(layer, 1);
        assert!(rollup(&[], 2).is_none());
    }

    fn close(x: f64, y: f64) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }

    /// Per-fact recovery's map, its floor keeping the sign (0 counting as positive), and
    /// KL's negative distance still reading 1 as clean.
    #[test]
    fn per_fact_recovery_by_hand() {
        let m = Rescale::per_fact(0.9, 0.1, 0.01);
        assert_eq!((m.shift, m.scale), (0.1, 0.9 - 0.1));
        close(m.value(0.5), 0.5);
        close(m.value(0.9), 1.0);
        assert_eq!(m.value(0.1), 0.0);
        // clean − corrupted = 0.004 < 0.01: 0.01, so 0.11 is (0.11 − 0.106) / 0.01 = 0.4.
        let m = Rescale::per_fact(0.11, 0.106, 0.01);
        close(m.scale, 0.01);
        close(m.value(0.11), 0.4);
        assert_eq!(Rescale::per_fact(0.3, 0.3, 0.01).scale, 0.01, "0 counts as positive");
        assert_eq!(Rescale::per_fact(0.0, 0.004, 0.01).scale, -0.01, "the sign is kept");
        // KL: clean 0, corrupted 2. A run at KL 0.5 is 3/4 of the way back; std 0.4 → 0.2.
        let kl = Rescale::per_fact(0.0, 2.0, 0.01);
        close(kl.value(0.5), 0.75);
        close(kl.value(0.0), 1.0);
        assert_eq!(kl.value(2.0), 0.0, "not −0");
        close(kl.spread(0.4), 0.2);
        // Raw values pass bit for bit.
        assert_eq!(Rescale::IDENTITY.value(0.123_456_789), 0.123_456_789);
    }

    /// Recovery as a ratio of means on the hand-computed facts above: every AIE divided by
    /// the ATE (0.5), the ATE 1.
    #[test]
    fn ratio_of_means_by_hand() {
        let a = table(&[[0.5, 0.3], [0.2, 0.2], [0.1, 0.4], [0.6, 0.8]]);
        let b = table(&[[0.0, 0.0], [0.4, 0.2], [0.6, 0.6], [0.8, 0.2], [0.2, 0.4]]);
        let facts = [
            FactTable { subject: (0, 1), high_score: 0.9, low_score: 0.1, scores: &a },
            FactTable { subject: (1, 4), high_score: 0.5, low_score: 0.3, scores: &b },
        ];
        let raw = rollup(&facts, 2).expect("rollup");
        let map = Rescale::ratio_of_means(raw.headline.high_score, raw.headline.low_score);
        let r = raw.rescaled(map, Better::Higher);
        // First subject, layer 0: mean 0.45, AIE 0.25, std 0.05 → 0.5, 0.5, 0.1.
        close(r.cell(0, 0).aie, 0.5);
        close(r.cell(0, 0).mean, 0.5);
        close(r.cell(0, 0).std, 0.1);
        assert_eq!(r.cell(0, 0).n, 2);
        // Last subject, layer 0: AIE 0.45 → 0.9, the best.
        let h = &r.headline;
        assert_eq!((h.high_score, h.low_score, h.ate), (1.0, 0.0, 1.0));
        let (aie, layer) = h.best_last_subject.expect("traced");
        close(aie, 0.9);
        assert_eq!(layer, 0);
        // Last token, layer 1: AIE 0.4 → 0.8.
        close(h.best_last_token.expect("traced").0, 0.8);
        // A category without rows stays NaN.
        let empty = rollup_of(&facts, 2, [true, false, true, true, true, true]).expect("rollup");
        assert!(empty.rescaled(map, Better::Higher).cell(1, 0).aie.is_nan());
    }

    /// KL falls toward the clean run: raw, the best AIE is the most negative; recovery (a
    /// negative ATE) turns it into the largest recovery, at the same layer.
    #[test]
    fn kl_best_and_recovery_by_hand() {
        // One token × 3 layers per fact, subject [0, 1), T = 1: every category is token 0.
        let a = vec![vec![1.8, 0.4, 1.0]];
        let b = vec![vec![1.0, 0.2, 0.6]];
        let facts = [
            FactTable { subject: (0, 1), high_score: 0.0, low_score: 2.0, scores: &a },
            FactTable { subject: (0, 1), high_score: 0.0, low_score: 1.0, scores: &b },
        ];
        let raw = rollup(&facts, 3).expect("rollup").toward(Better::Lower);
        // Means 1.4, 0.3, 0.8; low 1.5; AIEs −0.1, −1.2, −0.7; ATE −1.5.
        close(raw.headline.ate, -1.5);
        let (aie, layer) = raw.headline.best_last_subject.expect("traced");
        close(aie, -1.2);
        assert_eq!(layer, 1);
        let up = rollup(&facts, 3).expect("rollup").headline.best_last_subject.expect("traced");
        assert_eq!(up.1, 0, "the largest AIE would be the weakest restoration");
        let map = Rescale::ratio_of_means(raw.headline.high_score, raw.headline.low_score);
        let r = raw.rescaled(map, Better::Higher);
        // Recovery: −0.1 / −1.5, −1.2 / −1.5 = 0.8, −0.7 / −1.5; std 0.4 → 0.4 / 1.5.
        close(r.cell(2, 0).aie, 0.1 / 1.5);
        close(r.cell(2, 1).aie, 0.8);
        close(r.cell(2, 0).std, 0.4 / 1.5);
        let (aie, layer) = r.headline.best_last_subject.expect("traced");
        close(aie, 0.8);
        assert_eq!(layer, 1);
        assert_eq!((r.headline.high_score, r.headline.low_score, r.headline.ate), (1.0, 0.0, 1.0));
    }
}
