//! The intervention points do what they say, on every tiny family.

use candle_core::{DType, Device, IndexOp, Tensor};
use worker::{EmbedEdit, EmbedOp, ForwardRequest, Interventions, Logits, Patch, Site, Start};

use crate::util::{TINY, ids, logits, max_abs_diff, random_rows, tiny};

const T: usize = 9;

fn every_site(n_layers: usize) -> Vec<Site> {
    let mut sites = vec![Site::Embed];
    for l in 0..n_layers {
        sites.extend([Site::Attn(l), Site::Mlp(l), Site::Block(l)]);
    }
    sites
}

fn run(
    model: &worker::Model,
    ids: &Tensor,
    iv: &Interventions,
    which: Logits,
) -> worker::ForwardOutput {
    model
        .forward(&ForwardRequest {
            start: Start::Tokens(ids),
            interventions: iv,
            logits: which,
            keep_kv: false,
        })
        .expect("forward")
}

/// Writing every state back as its own clean value changes no logit, bit for bit: the
/// overwrite is a copy, not an arithmetic update.
#[test]
fn overwriting_a_state_with_itself_is_a_no_op() {
    for name in TINY {
        let m = tiny(name).model;
        let x = ids(&random_rows(2, T, 256, 1));
        let all: Vec<usize> = (0..T).collect();
        let mut capture = Interventions::none();
        let sites = every_site(m.dims().n_layers);
        for &site in &sites {
            capture.capture(site, all.clone());
        }
        let clean = run(&m, &x, &capture, Logits::All);
        let mut patch = Interventions::none();
        for (site, value) in sites.iter().zip(&clean.captures) {
            match site {
                Site::Embed => patch.embed.push(EmbedEdit {
                    rows: vec![0, 1],
                    tokens: 0..T,
                    op: EmbedOp::Replace,
                    values: value.clone(),
                }),
                _ => patch.patches.push(Patch {
                    site: *site,
                    rows: vec![0, 1],
                    tokens: all.clone(),
                    values: value.clone(),
                }),
            }
        }
        let patched = run(&m, &x, &patch, Logits::All);
        let diff = max_abs_diff(
            clean.logits.as_ref().expect("logits"),
            patched.logits.as_ref().expect("logits"),
        );
        assert_eq!(diff, 0.0, "{name}: self-overwrite moved logits by {diff}");
    }
}

/// Capturing row 0's embeddings, or its residual stream after layer l at every token, and
/// writing it into row 1 makes row 1 compute row 0's logits.
#[test]
fn overwriting_another_row_reproduces_its_output() {
    for name in TINY {
        let m = tiny(name).model;
        let x = ids(&random_rows(2, T, 256, 2));
        let all: Vec<usize> = (0..T).collect();
        let mut capture = Interventions::none();
        capture.capture(Site::Embed, all.clone());
        capture.capture(Site::Block(1), all.clone());
        let clean = run(&m, &x, &capture, Logits::Last);
        let row0 = clean.logits.as_ref().expect("logits").i(0).expect("row");

        let mut by_embed = Interventions::none();
        let values = clean.captures[0].i(0..1).expect("row 0");
        by_embed.embed.push(EmbedEdit {
            rows: vec![1],
            tokens: 0..T,
            op: EmbedOp::Replace,
            values,
        });
        let mut by_block = Interventions::none();
        let values = clean.captures[1].i(0..1).expect("row 0");
        by_block.patches.push(Patch {
            site: Site::Block(1),
            rows: vec![1],
            tokens: all.clone(),
            values,
        });
        for iv in [by_embed, by_block] {
            let out = run(&m, &x, &iv, Logits::Last).logits.expect("logits");
            let diff = max_abs_diff(&out.i(1).expect("row"), &row0);
            assert!(diff <= 1e-6, "{name}: row 1 differs from row 0 by {diff}");
            let untouched = max_abs_diff(&out.i(0).expect("row"), &row0);
            assert_eq!(untouched, 0.0, "{name}: row 0 must not change");
        }
    }
}

/// A batch gives each row what that row gives alone. Tolerance 1e-5: gemm may block a
/// 3-row product differently from a 1-row one, which reorders f32 sums (~1e-6 on O(5) logits).
#[test]
fn batched_forward_equals_row_by_row() {
    for name in TINY {
        let m = tiny(name).model;
        let rows = random_rows(3, T, 256, 3);
        let batched = logits(&m, &ids(&rows), Logits::All);
        for (i, row) in rows.iter().enumerate() {
            let alone = logits(&m, &ids(std::slice::from_ref(row)), Logits::All);
            let diff = max_abs_diff(&batched.i(i..i + 1).expect("row"), &alone);
            assert!(diff <= 1e-5, "{name}: row {i} differs by {diff}");
        }
    }
}

/// Causal tracing's shortcut: restoring state (t, l) into a corrupted run equals resuming the
/// corrupted run from its prefix (keys/values of tokens < t, residual stream entering layer l)
/// and computing only tokens ≥ t from layer l on, with samples sharing one cached prefix.
#[test]
fn resuming_from_a_prefix_equals_the_full_patched_forward() {
    for name in TINY {
        let m = tiny(name).model;
        let d = m.dims().d_model;
        let n_layers = m.dims().n_layers;
        let row = random_rows(1, T, 256, 4).remove(0);
        let (t, l) = (3, 1);
        // Row 0 clean; rows 1..=2 corrupted embeddings at tokens 1..4.
        let x = ids(&[row.clone(), row.clone(), row.clone()]);
        let noise = Tensor::randn(0f64, 1.0, (2, 3, d), &Device::Cpu).expect("noise");
        let mut iv = Interventions::none();
        iv.embed.push(EmbedEdit {
            rows: vec![1, 2],
            tokens: 1..4,
            op: EmbedOp::Add,
            values: noise.clone(),
        });
        let clean_state = iv.capture(Site::Block(l), vec![t]);
        let entering = iv.capture(Site::Block(l - 1), (t..T).collect());
        let corrupted = m
            .forward(&ForwardRequest {
                start: Start::Tokens(&x),
                interventions: &iv,
                logits: Logits::Last,
                keep_kv: true,
            })
            .expect("corrupted run");
        let clean_value = corrupted.captures[clean_state].i(0..1).expect("clean row");

        // The full way: rerun everything with the clean state restored in rows 1 and 2.
        let mut full = Interventions::none();
        full.embed.push(EmbedEdit {
            rows: vec![1, 2],
            tokens: 1..4,
            op: EmbedOp::Add,
            values: noise,
        });
        full.patches.push(Patch {
            site: Site::Block(l),
            rows: vec![1, 2],
            tokens: vec![t],
            values: clean_value.clone(),
        });
        let expected = run(&m, &x, &full, Logits::Last).logits.expect("logits");

        // The short way: four rows resumed from the two corrupted samples' prefixes.
        let kv = corrupted.kv.as_ref().expect("kv");
        let sample_of_row = Tensor::new(&[1u32, 2, 1, 2], &Device::Cpu).expect("rows");
        let past = kv.narrow_tokens(t).and_then(|p| p.index_rows(&sample_of_row)).expect("past");
        let hidden = corrupted.captures[entering].index_select(&sample_of_row, 0).expect("hidden");
        let mut suffix = Interventions::none();
        suffix.patches.push(Patch {
            site: Site::Block(l),
            rows: vec![0, 1, 2, 3],
            tokens: vec![t],
            values: clean_value,
        });
        let resumed = m
            .forward(&ForwardRequest {
                start: Start::Resume { layer: l, pos: t, hidden, past: &past },
                interventions: &suffix,
                logits: Logits::Last,
                keep_kv: false,
            })
            .expect("resumed run")
            .logits
            .expect("logits");
        for (r, sample) in [(0, 1), (1, 2), (2, 1), (3, 2)] {
            let diff = max_abs_diff(&resumed.i(r).expect("row"), &expected.i(sample).expect("row"));
            assert!(diff <= 1e-5, "{name}: resumed row {r} differs from sample {sample} by {diff}");
        }
        assert!(l < n_layers);
    }
}

/// `x += noise` with f64 noise is computed in f64 and rounded once to f32, like PyTorch's
/// in-place add of a float64 tensor into a float32 one.
#[test]
fn adding_f64_noise_rounds_once() {
    let m = tiny("llama").model;
    let x = ids(&random_rows(1, T, 256, 5));
    let d = m.dims().d_model;
    let mut plain = Interventions::none();
    plain.capture(Site::Embed, (0..T).collect());
    let clean = run(&m, &x, &plain, Logits::None).captures.remove(0);
    let noise = (Tensor::randn(0f64, 1.0, (1, 2, d), &Device::Cpu).expect("noise") * 3.123456789)
        .expect("scale");
    let mut iv = Interventions::none();
    iv.embed.push(EmbedEdit {
        rows: vec![0],
        tokens: 2..4,
        op: EmbedOp::Add,
        values: noise.clone(),
    });
    iv.capture(Site::Embed, (0..T).collect());
    let edited = run(&m, &x, &iv, Logits::None).captures.remove(0);
    let expected = (clean.i((.., 2..4, ..)).and_then(|c| c.to_dtype(DType::F64)).expect("f64")
        + &noise)
        .and_then(|s| s.to_dtype(DType::F32))
        .expect("sum");
    assert_eq!(max_abs_diff(&edited.i((.., 2..4, ..)).expect("slice"), &expected), 0.0);
    assert_eq!(
        max_abs_diff(
            &edited.i((.., 0..2, ..)).expect("slice"),
            &clean.i((.., 0..2, ..)).expect("slice")
        ),
        0.0
    );
}

/// A capture-only pass stops at the deepest layer it needs and sees the same values.
#[test]
fn capture_only_pass_matches_full_pass() {
    let m = tiny("gpt2").model;
    let x = ids(&random_rows(2, T, 256, 6));
    let mut iv = Interventions::none();
    iv.capture(Site::Mlp(1), vec![0, 4, 8]);
    let partial = run(&m, &x, &iv, Logits::None);
    assert!(partial.logits.is_none());
    let full = run(&m, &x, &iv, Logits::Last);
    assert_eq!(max_abs_diff(&partial.captures[0], &full.captures[0]), 0.0);
    assert_eq!(partial.captures[0].dims(), &[2, 3, m.dims().d_model]);
}

/// Out-of-range requests are errors that say what is wrong, not panics.
#[test]
fn bad_requests_are_clear_errors() {
    let m = tiny("qwen2").model;
    let x = ids(&random_rows(2, T, 256, 7));
    let d = m.dims().d_model;
    let zeros = |n| Tensor::zeros((1, n, d), DType::F32, &Device::Cpu).expect("zeros");
    let cases = [
        (
            Patch { site: Site::Block(3), rows: vec![0], tokens: vec![0], values: zeros(1) },
            "layer 3 is beyond the model's 3 layers",
        ),
        (
            Patch { site: Site::Attn(0), rows: vec![2], tokens: vec![0], values: zeros(1) },
            "row 2 is outside the batch of 2 rows",
        ),
        (
            Patch { site: Site::Mlp(0), rows: vec![0], tokens: vec![T], values: zeros(1) },
            "token 9 is outside the computed tokens 0..9",
        ),
        (
            Patch { site: Site::Mlp(0), rows: vec![0], tokens: vec![0, 1], values: zeros(1) },
            "values have shape [1, 1, 32]",
        ),
    ];
    for (patch, expected) in cases {
        let iv = Interventions { patches: vec![patch], ..Interventions::none() };
        let err = m
            .forward(&ForwardRequest {
                start: Start::Tokens(&x),
                interventions: &iv,
                logits: Logits::Last,
                keep_kv: false,
            })
            .expect_err("must fail");
        assert!(err.to_string().contains(expected), "{err} should say {expected:?}");
    }
    let too_long = ids(&random_rows(1, 65, 256, 8));
    let none = Interventions::none();
    let err = m
        .forward(&ForwardRequest {
            start: Start::Tokens(&too_long),
            interventions: &none,
            logits: Logits::Last,
            keep_kv: false,
        })
        .expect_err("must fail");
    assert!(err.to_string().contains("65 tokens exceed the model's 64 positions"), "{err}");
}
