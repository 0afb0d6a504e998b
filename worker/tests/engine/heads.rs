//! Attention heads as intervention sites: `Head(l, h)` is head h's slice of `Heads(l)`, the
//! heads' outputs before the output projection, and restoring every head of (t, l) is
//! restoring the attention output at (t, l).

use candle_core::Tensor;
use worker::intervene::RowCopy;
use worker::{EmbedEdit, EmbedOp, ForwardRequest, Interventions, Logits, Site, Start};

use crate::util::{TINY, ids, max_abs_diff, random_rows, smollm2, tiny};

const T: usize = 9;

/// Last-position probabilities of rows 1.. of `x` with rows 1.. noised at tokens 2..5 and
/// `copies` from row 0.
fn restored(model: &worker::Model, x: &Tensor, copies: Vec<RowCopy>) -> Tensor {
    let (rows, _) = x.dims2().expect("ids");
    let d = model.dims().d_model;
    // A fixed noise, the same for every run compared: sin(i) × 1.5.
    let n = (rows - 1) * 3 * d;
    let noise = Tensor::arange(0u32, n as u32, model.device())
        .and_then(|i| i.to_dtype(candle_core::DType::F32))
        .and_then(|i| i.sin())
        .and_then(|i| (i * 1.5)?.reshape((rows - 1, 3, d)))
        .expect("noise");
    let iv = Interventions {
        embed: vec![EmbedEdit {
            rows: (1..rows).collect(),
            tokens: 2..5,
            op: EmbedOp::Add,
            values: noise,
        }],
        copies,
        ..Interventions::none()
    };
    let out = model
        .forward(&ForwardRequest {
            start: Start::Tokens(x),
            interventions: &iv,
            logits: Logits::Last,
            keep_kv: false,
        })
        .expect("forward");
    let logits = out.logits.expect("logits").narrow(0, 1, rows - 1).expect("rows");
    worker::forward::probabilities(&logits).expect("softmax")
}

fn copy(site: Site, rows: usize, t: usize) -> RowCopy {
    RowCopy { site, from_row: 0, rows: (1..rows).collect(), tokens: vec![t] }
}

/// The identity the issue asks for, within 1e-6: the output projection sums the heads in
/// another order when they arrive through a copy, which moves probabilities by ulps.
fn check_identity(name: &str, model: &worker::Model, x: &Tensor) {
    let (rows, t_len) = x.dims2().expect("ids");
    let (n_layers, n_heads) = (model.dims().n_layers, model.dims().n_heads);
    // Cells within reach of the last position through Mistral's window of 4.
    for (t, l) in
        [(t_len - 2, 0), (t_len - 1, n_layers / 2), (t_len - 1, n_layers - 1), (t_len - 3, 1)]
    {
        let heads = (0..n_heads).map(|h| copy(Site::Head(l, h), rows, t)).collect();
        let by_heads = restored(model, x, heads);
        let by_attn = restored(model, x, vec![copy(Site::Attn(l), rows, t)]);
        let corrupted = restored(model, x, Vec::new());
        let diff = max_abs_diff(&by_heads, &by_attn);
        assert!(diff <= 1e-6, "{name} ({t}, {l}): every head vs the attention output: {diff}");
        assert!(max_abs_diff(&by_heads, &corrupted) > 1e-5, "{name} ({t}, {l}) restored nothing");
    }
}

#[test]
fn restoring_every_head_is_restoring_the_attention_output() {
    for name in TINY {
        let m = tiny(name).model;
        check_identity(name, &m, &ids(&random_rows(3, T, 256, 5)));
    }
    let loaded = smollm2();
    let tok = loaded.tokenizer().expect("tokenizer");
    let prompt = tok.encode("The Space Needle is located in the city of").expect("ids");
    check_identity("smollm2", &loaded.model, &ids(&[prompt.clone(), prompt.clone(), prompt]));
}

/// A head's capture is its columns of the heads' capture, and patching one head changes
/// only that head's columns (Mistral's tiny model has heads wider than d / H).
#[test]
fn a_head_is_a_slice_of_the_heads() {
    for name in TINY {
        let m = tiny(name).model;
        let (n_heads, head_dim) = (m.dims().n_heads, m.dims().head_dim);
        let x = ids(&random_rows(2, T, 256, 6));
        let mut iv = Interventions::none();
        let all = iv.capture(Site::Heads(1), (0..T).collect());
        let two = iv.capture(Site::Head(1, 2), vec![1, 4]);
        let run = |iv: &Interventions| {
            m.forward(&ForwardRequest {
                start: Start::Tokens(&x),
                interventions: iv,
                logits: Logits::None,
                keep_kv: false,
            })
            .expect("forward")
        };
        let out = run(&iv);
        assert_eq!(out.captures[all].dims(), &[2, T, n_heads * head_dim], "{name}");
        let slice = out.captures[all]
            .narrow(2, 2 * head_dim, head_dim)
            .and_then(|s| s.contiguous())
            .and_then(|s| s.index_select(&Tensor::new(&[1u32, 4], s.device())?, 1))
            .expect("slice");
        assert_eq!(max_abs_diff(&slice, &out.captures[two]), 0.0, "{name}");

        // Head 2 of row 1 at token 4 takes row 0's value; nothing else of the layer moves.
        let mut iv = Interventions::none();
        iv.copies.push(RowCopy {
            site: Site::Head(1, 2),
            from_row: 0,
            rows: vec![1],
            tokens: vec![4],
        });
        let after = iv.capture(Site::Heads(1), (0..T).collect());
        let patched = run(&iv).captures[after].clone();
        let before = &out.captures[all];
        let diff = (patched - before).and_then(|d| d.abs()).expect("diff");
        let moved: Vec<f32> = diff.flatten_all().and_then(|d| d.to_vec1()).expect("values");
        for (i, &v) in moved.iter().enumerate() {
            let (row, rest) = (i / (T * n_heads * head_dim), i % (T * n_heads * head_dim));
            let (token, col) = (rest / (n_heads * head_dim), rest % (n_heads * head_dim));
            let inside = row == 1 && token == 4 && col / head_dim == 2;
            assert!(inside || v == 0.0, "{name}: row {row} token {token} column {col} moved");
        }
        let want = out.captures[all].narrow(0, 0, 1).and_then(|r| r.narrow(1, 4, 1));
        let got = run(&iv).captures[after].narrow(0, 1, 1).and_then(|r| r.narrow(1, 4, 1));
        let (want, got) = (want.expect("row 0"), got.expect("row 1"));
        let cols = |t: &Tensor| t.narrow(2, 2 * head_dim, head_dim).expect("head");
        assert_eq!(max_abs_diff(&cols(&want), &cols(&got)), 0.0, "{name}: the copy is exact");
    }
}

/// A head beyond the model's is refused with its name.
#[test]
fn heads_beyond_the_model_are_refused() {
    let m = tiny("llama").model;
    let x = ids(&random_rows(1, T, 256, 7));
    let mut iv = Interventions::none();
    iv.capture(Site::Head(0, 4), vec![0]);
    let err = m
        .forward(&ForwardRequest {
            start: Start::Tokens(&x),
            interventions: &iv,
            logits: Logits::None,
            keep_kv: false,
        })
        .expect_err("head 4 of 4");
    assert!(err.to_string().contains("4 heads"), "{err}");
}
