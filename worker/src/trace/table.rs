//! One kind's table of a fact: a score per cell along the kind's axes (token × layer, or
//! token × layer × head), NaN where nothing was computed (a token the selector leaves out, a
//! layer outside a sweep job's range).

use std::collections::BTreeMap;

use common::kinds::{Axis, Cell, Geometry, Kind};
use common::metric::{Metric, MetricValues};
use serde::ser::{Serialize, SerializeSeq, Serializer};

/// The scores of one kind over one fact.
#[derive(Debug, Clone, PartialEq)]
pub struct KindTable {
    /// The kind.
    pub kind: Kind,
    /// Tokens T.
    pub n_tokens: usize,
    /// Layers L.
    pub n_layers: usize,
    /// Heads per (token, layer): H for kinds with a head axis, else 1.
    pub n_heads: usize,
    /// `values[(t × L + l) × heads + h]`.
    values: Vec<f32>,
}

impl KindTable {
    /// A table of NaN for a `t_len`-token fact.
    pub fn new(kind: Kind, t_len: usize, g: Geometry) -> Self {
        let n_heads = kind.heads(g);
        Self {
            kind,
            n_tokens: t_len,
            n_layers: g.n_layers,
            n_heads,
            values: vec![f32::NAN; t_len * g.n_layers * n_heads],
        }
    }

    fn index(&self, cell: Cell) -> usize {
        (cell.token * self.n_layers + cell.layer) * self.n_heads + cell.head
    }

    /// The score of `cell` (NaN if not computed).
    pub fn get(&self, cell: Cell) -> f32 {
        self.values.get(self.index(cell)).copied().unwrap_or(f32::NAN)
    }

    /// Sets the score of `cell`.
    pub fn set(&mut self, cell: Cell, score: f32) {
        let i = self.index(cell);
        if let Some(v) = self.values.get_mut(i) {
            *v = score;
        }
    }

    /// Token `t`'s cells, layer-major: L × heads values.
    pub fn row(&self, t: usize) -> &[f32] {
        let width = self.n_layers * self.n_heads;
        &self.values[t * width..(t + 1) * width]
    }

    /// The score at (token, layer) of a kind without a head axis.
    pub fn at(&self, token: usize, layer: usize) -> f32 {
        self.get(Cell { token, layer, head: 0 })
    }

    /// Every computed cell (not NaN) with its score.
    pub fn computed(&self) -> impl Iterator<Item = (Cell, f32)> + '_ {
        let (l_n, h_n) = (self.n_layers, self.n_heads);
        self.values.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(move |(i, &v)| {
            let cell = Cell { token: i / (l_n * h_n), layer: (i / h_n) % l_n, head: i % h_n };
            (cell, v)
        })
    }

    /// The axes of the table, as the kind declares them.
    pub fn axes(&self) -> &'static [Axis] {
        self.kind.axes()
    }
}

/// One kind's table of every metric.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricTables(BTreeMap<Metric, KindTable>);

impl MetricTables {
    /// Tables of NaN for a `t_len`-token fact.
    pub fn new(kind: Kind, t_len: usize, g: Geometry) -> Self {
        Self(Metric::ALL.into_iter().map(|m| (m, KindTable::new(kind, t_len, g))).collect())
    }

    /// Sets `cell` of every metric's table (stored in f32, as the `traces` columns).
    pub fn set(&mut self, cell: Cell, values: &MetricValues) {
        for (&metric, table) in &mut self.0 {
            table.set(cell, values.get(metric) as f32);
        }
    }

    /// The tables by metric.
    pub fn into_map(self) -> BTreeMap<Metric, KindTable> {
        self.0
    }
}

/// T rows of L scores, or T × L × H for kinds with a head axis; cells not computed are
/// `null` (serde_json writes non-finite floats as null).
impl Serialize for KindTable {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut rows = serializer.serialize_seq(Some(self.n_tokens))?;
        for t in 0..self.n_tokens {
            let row = self.row(t);
            if self.kind.has_heads() {
                let layers: Vec<&[f32]> = row.chunks(self.n_heads).collect();
                rows.serialize_element(&layers)?;
            } else {
                rows.serialize_element(row)?;
            }
        }
        rows.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_land_where_the_axes_say() {
        let g = Geometry { n_layers: 3, n_heads: 2 };
        let mut t = KindTable::new(Kind::Head, 2, g);
        t.set(Cell { token: 1, layer: 2, head: 1 }, 0.5);
        assert_eq!(t.get(Cell { token: 1, layer: 2, head: 1 }), 0.5);
        assert_eq!(t.row(1)[5], 0.5);
        assert_eq!(
            t.computed().collect::<Vec<_>>(),
            vec![(Cell { token: 1, layer: 2, head: 1 }, 0.5)]
        );
        let json = serde_json::to_value(&t).expect("json");
        assert_eq!(json[1][2][1], 0.5);
        assert!(json[0][0][0].is_null());
        let mut h = KindTable::new(Kind::Hidden, 2, g);
        h.set(Cell { token: 0, layer: 1, head: 0 }, 0.25);
        assert_eq!(serde_json::to_value(&h).expect("json")[0][1], 0.25);
    }
}
