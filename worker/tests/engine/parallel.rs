//! Parallel blocks (GPT-J, GPT-NeoX with `use_parallel_residual`): the sites mean what ROME's
//! hooks read, and an attention patch reaches the MLP only where the block is sequential.

use candle_core::{DType, Device, Tensor};
use worker::{ForwardRequest, Interventions, Logits, Patch, Site, Start};

use crate::util::{ids, max_abs_diff, random_rows, tiny};

const T: usize = 9;

fn run(model: &worker::Model, x: &Tensor, iv: &Interventions) -> Vec<Tensor> {
    model
        .forward(&ForwardRequest {
            start: Start::Tokens(x),
            interventions: iv,
            logits: Logits::None,
            keep_kv: false,
        })
        .expect("forward")
        .captures
}

/// `Block(l)` is the block's input plus `Attn(l)` plus `Mlp(l)`, bit for bit: the forward
/// adds them as transformers' GPT-J and GPT-NeoX do, `(attn + mlp) + residual`, and the
/// captures are the tensors it adds.
#[test]
fn block_is_input_plus_attention_plus_mlp() {
    for name in ["gptj", "gpt_neox"] {
        let m = tiny(name).model;
        let x = ids(&random_rows(2, T, 256, 11));
        let all: Vec<usize> = (0..T).collect();
        for layer in 0..m.dims().n_layers {
            let mut iv = Interventions::none();
            let input_site = if layer == 0 { Site::Input } else { Site::Block(layer - 1) };
            let input = iv.capture(input_site, all.clone());
            let attn = iv.capture(Site::Attn(layer), all.clone());
            let mlp = iv.capture(Site::Mlp(layer), all.clone());
            let block = iv.capture(Site::Block(layer), all.clone());
            let c = run(&m, &x, &iv);
            let sum = ((&c[attn] + &c[mlp]).and_then(|s| s + &c[input])).expect("sum");
            assert_eq!(max_abs_diff(&sum, &c[block]), 0.0, "{name} layer {layer}");
            // Both branches contribute: neither is a zero that would make the identity vacuous.
            for (site, t) in [("attn", &c[attn]), ("mlp", &c[mlp])] {
                let zeros = t.zeros_like().expect("zeros");
                assert!(max_abs_diff(t, &zeros) > 1e-2, "{name} layer {layer}: {site} is ~0");
            }
        }
    }
}

/// Overwriting `Attn(l)` changes the block's output, but the MLP of a parallel block reads
/// the block's input, not the stream after attention: `Mlp(l)` stays bit-identical. In the
/// sequential GPT-NeoX the same patch moves `Mlp(l)`.
#[test]
fn an_attention_patch_reaches_the_mlp_only_in_sequential_blocks() {
    for (name, parallel) in [("gptj", true), ("gpt_neox", true), ("gpt_neox_seq", false)] {
        let m = tiny(name).model;
        let d = m.dims().d_model;
        let x = ids(&random_rows(2, T, 256, 12));
        let all: Vec<usize> = (0..T).collect();
        let layer = 1;
        let mut clean_iv = Interventions::none();
        let mlp = clean_iv.capture(Site::Mlp(layer), all.clone());
        let block = clean_iv.capture(Site::Block(layer), all.clone());
        let clean = run(&m, &x, &clean_iv);

        let mut patched_iv = clean_iv.clone();
        let values = Tensor::zeros((2, T, d), DType::F32, &Device::Cpu).expect("zeros");
        patched_iv.patches.push(Patch {
            site: Site::Attn(layer),
            rows: vec![0, 1],
            tokens: all.clone(),
            values,
        });
        let patched = run(&m, &x, &patched_iv);

        let block_moved = max_abs_diff(&clean[block], &patched[block]);
        assert!(block_moved > 1e-2, "{name}: the patch must change Block({layer})");
        let mlp_moved = max_abs_diff(&clean[mlp], &patched[mlp]);
        if parallel {
            assert_eq!(mlp_moved, 0.0, "{name}: a parallel MLP must not see the attention patch");
        } else {
            assert!(mlp_moved > 1e-2, "{name}: a sequential MLP reads the patched stream");
        }
    }
}
