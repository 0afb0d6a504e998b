//! The kinds of restored state, each describing itself: which states of the network it
//! restores from the clean run and which it freezes at a corrupted run's value, the axes of
//! its table, which of its cells are provable no-ops, and how its figures look.
//!
//! Everything that handles kinds (the worker's naive and fast paths and cost model, the
//! coordinator's result check, the tables, the aggregate and the plots) asks the kind
//! through these methods; [`Kind::info`] is the one place that tells the kinds apart, so a
//! new kind is one entry there (docs/science.md defines each kind; ARCHITECTURE.md says
//! what else a new kind touches).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::plot::Palette;

/// What is restored (and, for the severed kinds, frozen) in one restored run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The residual stream after layer l at token t (ROME's single hidden state).
    Hidden,
    /// The MLP outputs at token t over a window of layers around l.
    Mlp,
    /// The attention outputs at token t over a window of layers around l.
    Attn,
    /// The hidden state (t, l), with the MLP outputs at token t in every layer frozen at a
    /// corrupted run's values (the paper's Figure 3, "MLP severed").
    SeveredMlp,
    /// As `SeveredMlp` with the attention outputs frozen ("Attn severed").
    SeveredAttn,
    /// One attention head's output at (t, l): its attention-weighted value vector before
    /// the output projection (TransformerLens' `hook_z[:, t, h]`).
    Head,
}

/// An axis of a kind's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// The prompt's tokens.
    Token,
    /// The model's layers.
    Layer,
    /// The attention's query heads.
    Head,
}

/// A sublayer whose output a kind restores or freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sublayer {
    /// The MLP.
    Mlp,
    /// The attention (after its output projection).
    Attn,
}

/// A state of the network at one token (the token is the cell's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// The residual stream after layer `l`.
    Block(usize),
    /// The MLP output of layer `l`.
    Mlp(usize),
    /// The attention output of layer `l`.
    Attn(usize),
    /// Head `h`'s output in layer `l`, before the output projection.
    Head(usize, usize),
}

impl State {
    /// The layer the state belongs to.
    pub fn layer(self) -> usize {
        match self {
            State::Block(l) | State::Mlp(l) | State::Attn(l) | State::Head(l, _) => l,
        }
    }

    /// The first layer whose computation changes when this state changes: the next layer
    /// for a block's output, the state's own layer for a sublayer output (the rest of the
    /// layer reads it).
    pub fn first_changed_layer(self) -> usize {
        match self {
            State::Block(l) => l + 1,
            State::Mlp(l) | State::Attn(l) | State::Head(l, _) => l,
        }
    }

    /// The state of `sublayer` in layer `l`.
    pub fn of(sublayer: Sublayer, l: usize) -> Self {
        match sublayer {
            Sublayer::Mlp => State::Mlp(l),
            Sublayer::Attn => State::Attn(l),
        }
    }
}

/// The model's extent along the axes a kind may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Layers L.
    pub n_layers: usize,
    /// Query heads H.
    pub n_heads: usize,
}

/// One cell of a kind's table: (token, layer) and, for kinds with a head axis, the head (0
/// otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// The token t.
    pub token: usize,
    /// The layer l (the window's centre for windowed kinds).
    pub layer: usize,
    /// The head h, 0 for kinds without a head axis.
    pub head: usize,
}

/// What restoring one cell takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Provably changes nothing the last position reads: the cell scores what the kind's
    /// unrestored run scores at its token ([`Kind::freezes`]: the corrupted run itself for
    /// kinds that freeze nothing, so `low_score`).
    NoOp,
    /// Changes the computation from layer `join` on (`join` = L: only the LM head).
    Run {
        /// The first layer whose computation differs from the unrestored run's.
        join: usize,
    },
}

/// How a kind's averaged figures look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// The heatmap's colour map (ROME's per kind).
    pub palette: Palette,
    /// What is restored, in a title: "Avg Indirect Effect of {what} over N prompts".
    pub what: &'static str,
    /// The line-plot panel's title; `{window}` is replaced by the window.
    pub panel: &'static str,
    /// The heatmap's x label; `{window}` and `{model}` are replaced.
    pub x_label: &'static str,
}

/// A [`Style`] template (`panel`, `x_label`) with `{window}` and `{model}` filled in.
pub fn fill(template: &str, window: usize, model: &str) -> String {
    template.replace("{window}", &window.to_string()).replace("{model}", model)
}

/// What restoring a cell restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restores {
    /// The block output (t, l).
    Block,
    /// The sublayer outputs at token t over the window of layers around l.
    Window(Sublayer),
    /// Head h's output at (t, l).
    Head,
}

/// A kind's description: the one table that tells the kinds apart.
#[derive(Debug)]
struct Info {
    name: &'static str,
    axes: &'static [Axis],
    restores: Restores,
    freezes: Option<Sublayer>,
    style: Style,
}

const TOKEN_LAYER: &[Axis] = &[Axis::Token, Axis::Layer];
const TOKEN_LAYER_HEAD: &[Axis] = &[Axis::Token, Axis::Layer, Axis::Head];

const HIDDEN: Info = Info {
    name: "hidden",
    axes: TOKEN_LAYER,
    restores: Restores::Block,
    freezes: None,
    style: Style {
        palette: Palette::Purples,
        what: "hᵢ⁽ˡ⁾",
        panel: "single hidden vector",
        x_label: "single patched layer within {model}",
    },
};
const MLP: Info = Info {
    name: "mlp",
    axes: TOKEN_LAYER,
    restores: Restores::Window(Sublayer::Mlp),
    freezes: None,
    style: Style {
        palette: Palette::Greens,
        what: "MLP",
        panel: "run of {window} MLP lookups",
        x_label: "center of interval of {window} patched mlp layers",
    },
};
const ATTN: Info = Info {
    name: "attn",
    axes: TOKEN_LAYER,
    restores: Restores::Window(Sublayer::Attn),
    freezes: None,
    style: Style {
        palette: Palette::Reds,
        what: "Attn",
        panel: "run of {window} Attn modules",
        x_label: "center of interval of {window} patched attn layers",
    },
};
const SEVERED_MLP: Info = Info {
    name: "severed_mlp",
    axes: TOKEN_LAYER,
    restores: Restores::Block,
    freezes: Some(Sublayer::Mlp),
    style: Style {
        palette: Palette::Greens,
        what: "hᵢ⁽ˡ⁾ with MLP severed",
        panel: "single hidden vector, MLP severed",
        x_label: "single patched layer within {model}, MLP at the token frozen",
    },
};
const SEVERED_ATTN: Info = Info {
    name: "severed_attn",
    axes: TOKEN_LAYER,
    restores: Restores::Block,
    freezes: Some(Sublayer::Attn),
    style: Style {
        palette: Palette::Reds,
        what: "hᵢ⁽ˡ⁾ with Attn severed",
        panel: "single hidden vector, Attn severed",
        x_label: "single patched layer within {model}, Attn at the token frozen",
    },
};
const HEAD: Info = Info {
    name: "head",
    axes: TOKEN_LAYER_HEAD,
    restores: Restores::Head,
    freezes: None,
    style: Style {
        palette: Palette::Oranges,
        what: "one attention head",
        panel: "single attention head",
        x_label: "layer within {model}",
    },
};

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 6] =
        [Kind::Hidden, Kind::Mlp, Kind::Attn, Kind::SeveredMlp, Kind::SeveredAttn, Kind::Head];

    /// ROME's three kinds (Figure 2), the default.
    pub const ROME: [Kind; 3] = [Kind::Hidden, Kind::Mlp, Kind::Attn];

    fn info(self) -> &'static Info {
        match self {
            Kind::Hidden => &HIDDEN,
            Kind::Mlp => &MLP,
            Kind::Attn => &ATTN,
            Kind::SeveredMlp => &SEVERED_MLP,
            Kind::SeveredAttn => &SEVERED_ATTN,
            Kind::Head => &HEAD,
        }
    }

    /// The name used in flags, JSON, tables and file names.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The axes of the kind's table, outermost first.
    pub fn axes(self) -> &'static [Axis] {
        self.info().axes
    }

    /// Whether the table has a head axis.
    pub fn has_heads(self) -> bool {
        self.axes().contains(&Axis::Head)
    }

    /// Whether `--window` applies (the kind restores a run of layers).
    pub fn uses_window(self) -> bool {
        matches!(self.info().restores, Restores::Window(_))
    }

    /// The sublayer whose outputs at the cell's token are frozen, in every layer, at a
    /// corrupted run's values (the severed kinds).
    pub fn freezes(self) -> Option<Sublayer> {
        self.info().freezes
    }

    /// How its figures look.
    pub fn style(self) -> Style {
        self.info().style
    }

    /// Heads per (token, layer): H for kinds with a head axis, else 1.
    pub fn heads(self, g: Geometry) -> usize {
        if self.has_heads() { g.n_heads } else { 1 }
    }

    /// Cells per traced token: L, or L × H.
    pub fn cells_per_token(self, g: Geometry) -> usize {
        g.n_layers * self.heads(g)
    }

    /// The cells of one token, layer-major: (layer, head).
    pub fn layer_heads(self, g: Geometry) -> impl Iterator<Item = (usize, usize)> {
        let heads = self.heads(g);
        (0..g.n_layers).flat_map(move |l| (0..heads).map(move |h| (l, h)))
    }

    /// The states restored from the clean run for `cell` (all at the cell's token).
    pub fn restored(self, cell: Cell, window: usize, n_layers: usize) -> Vec<State> {
        match self.info().restores {
            Restores::Block => vec![State::Block(cell.layer)],
            Restores::Window(sublayer) => window_layers(cell.layer, window, n_layers)
                .map(|l| State::of(sublayer, l))
                .collect(),
            Restores::Head => vec![State::Head(cell.layer, cell.head)],
        }
    }

    /// The states frozen at a corrupted run's values while `cell` is restored: at the cell's
    /// token, the frozen sublayer's output in every layer.
    pub fn frozen(self, n_layers: usize) -> Vec<State> {
        match self.freezes() {
            Some(sublayer) => (0..n_layers).map(|l| State::of(sublayer, l)).collect(),
            None => Vec::new(),
        }
    }

    /// What restoring `cell` of a `t_len`-token prompt with subject `[b, e)` takes.
    ///
    /// Provable no-ops: a token before the subject (the clean and corrupted runs are equal
    /// there, and so are the frozen and measured states), and restorations whose states all
    /// lie in the last layer at a token other than the last (nothing the last position reads
    /// depends on them). Otherwise the run changes from the earliest restored state's
    /// [`State::first_changed_layer`] on.
    pub fn plan(
        self,
        cell: Cell,
        subject: (usize, usize),
        t_len: usize,
        window: usize,
        n_layers: usize,
    ) -> Plan {
        if cell.token < subject.0 {
            return Plan::NoOp;
        }
        let restored = self.restored(cell, window, n_layers);
        let last_layer_only = restored.iter().all(|s| s.layer() + 1 == n_layers);
        if last_layer_only && cell.token + 1 < t_len {
            return Plan::NoOp;
        }
        let join = restored.iter().map(|s| s.first_changed_layer()).min().unwrap_or(n_layers);
        Plan::Run { join }
    }
}

/// The layers restored for a windowed kind at centre `layer`: ROME's
/// `range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))`.
pub fn window_layers(layer: usize, window: usize, n_layers: usize) -> std::ops::Range<usize> {
    let lo = layer.saturating_sub(window / 2);
    let hi = (layer + window.div_ceil(2)).min(n_layers);
    lo..hi
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown kind {s:?} ({})", names.join(", "))
        })
    }
}

impl Axis {
    /// The axis' name in JSON (`"axes"` of `worker trace --json`).
    pub fn name(self) -> &'static str {
        match self {
            Axis::Token => "token",
            Axis::Layer => "layer",
            Axis::Head => "head",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_romes() {
        // range(max(0, l - 5), min(L, l - (-10 // 2))) with W = 10, L = 12.
        assert_eq!(window_layers(0, 10, 12), 0..5);
        assert_eq!(window_layers(5, 10, 12), 0..10);
        assert_eq!(window_layers(6, 10, 12), 1..11);
        assert_eq!(window_layers(11, 10, 12), 6..12);
        // Odd windows: l - (-W // 2) = l + ceil(W / 2).
        assert_eq!(window_layers(4, 3, 12), 3..6);
        assert_eq!(window_layers(0, 1, 12), 0..1);
    }

    #[test]
    fn names_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(kind.name().parse::<Kind>(), Ok(kind));
            let json = serde_json::to_string(&kind).expect("json");
            assert_eq!(json, format!("\"{}\"", kind.name()));
        }
        assert!("resid".parse::<Kind>().expect_err("unknown").contains("severed_mlp"));
    }

    #[test]
    fn sites_follow_the_definitions() {
        let cell = Cell { token: 3, layer: 5, head: 2 };
        assert_eq!(Kind::Hidden.restored(cell, 10, 12), vec![State::Block(5)]);
        assert_eq!(
            Kind::Mlp.restored(cell, 3, 12),
            vec![State::Mlp(4), State::Mlp(5), State::Mlp(6)]
        );
        assert_eq!(Kind::Head.restored(cell, 10, 12), vec![State::Head(5, 2)]);
        assert_eq!(Kind::SeveredAttn.restored(cell, 10, 12), vec![State::Block(5)]);
        assert_eq!(
            Kind::SeveredAttn.frozen(3),
            vec![State::Attn(0), State::Attn(1), State::Attn(2)]
        );
        assert!(Kind::Hidden.frozen(3).is_empty());
        let g = Geometry { n_layers: 4, n_heads: 3 };
        assert_eq!(Kind::Head.cells_per_token(g), 12);
        assert_eq!(Kind::Mlp.cells_per_token(g), 4);
        assert_eq!(Kind::Head.layer_heads(g).nth(4), Some((1, 1)));
    }

    #[test]
    fn no_ops_and_joins() {
        // T = 6, subject [2, 4), L = 4.
        let plan = |kind: Kind, token, layer, window| {
            kind.plan(Cell { token, layer, head: 0 }, (2, 4), 6, window, 4)
        };
        for kind in Kind::ALL {
            assert_eq!(plan(kind, 1, 2, 3), Plan::NoOp, "{kind}: before the subject");
        }
        assert_eq!(plan(Kind::Hidden, 2, 1, 1), Plan::Run { join: 2 });
        assert_eq!(plan(Kind::Hidden, 3, 3, 1), Plan::NoOp, "last layer, not the last token");
        assert_eq!(plan(Kind::Hidden, 5, 3, 1), Plan::Run { join: 4 }, "the head alone");
        assert_eq!(plan(Kind::SeveredMlp, 4, 3, 1), Plan::NoOp);
        assert_eq!(plan(Kind::Mlp, 3, 3, 1), Plan::NoOp, "a window of the last layer only");
        assert_eq!(plan(Kind::Mlp, 3, 3, 2), Plan::Run { join: 2 });
        assert_eq!(plan(Kind::Attn, 2, 0, 3), Plan::Run { join: 0 });
        assert_eq!(plan(Kind::Head, 3, 3, 10), Plan::NoOp);
        assert_eq!(plan(Kind::Head, 5, 3, 10), Plan::Run { join: 3 });
    }
}
