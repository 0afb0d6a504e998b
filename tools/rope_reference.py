#!/usr/bin/env python3
"""Writes tests/fixtures/rope/*.json: transformers' RoPE inverse frequencies and attention
factors for the scalings real checkpoints use, which worker/src/models/rope.rs's
`matches_transformers_reference` test compares against.

Run by hand (not in CI) in the golden environment (tools/golden-requirements.txt):

    python tools/rope_reference.py

Each file holds one config as config.json would spell it (transformers 4's `rope_theta` +
`rope_scaling`, or transformers 5's `rope_parameters`), the head and rotary widths, and one
case per sequence length: `seq_len` null is the model at initialisation, a number is a
forward pass whose largest position is `seq_len - 1` (passed as a tensor, as
`dynamic_rope_update` does, because dynamic NTK's arithmetic then runs in f32).
"""

import json
from pathlib import Path

import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "rope"


def factors(n: int, lo: float, hi: float) -> list[float]:
    """Deterministic increasing per-frequency divisors, like Phi-3's lists."""
    return [round(lo + (hi - lo) * (i / max(n - 1, 1)) ** 2, 6) for i in range(n)]


# name -> (config.json fields, sequence lengths to evaluate at)
CASES = {
    "default_llama": (
        {"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
         "max_position_embeddings": 4096, "rope_theta": 10000.0},
        [None],
    ),
    "default_partial_neox": (
        # Pythia-1B: head_dim 256, rotary_pct 0.25.
        {"hidden_size": 2048, "num_attention_heads": 8, "head_dim": 256,
         "max_position_embeddings": 2048,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
        [None],
    ),
    "linear_t4": (
        {"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
         "max_position_embeddings": 16384, "rope_theta": 10000.0,
         "rope_scaling": {"type": "linear", "factor": 4.0}},
        [None],
    ),
    "llama3_31": (
        # Llama 3.1 8B.
        {"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
         "max_position_embeddings": 131072,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}},
        [None],
    ),
    "yarn_qwen25_t4": (
        # Qwen2.5-7B-Instruct's long-context recipe.
        {"hidden_size": 3584, "num_attention_heads": 28, "head_dim": 128,
         "max_position_embeddings": 131072, "rope_theta": 1000000.0,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
        [None],
    ),
    "yarn_mscale": (
        # DeepSeek-style mscale / mscale_all_dim, explicit betas.
        {"hidden_size": 2048, "num_attention_heads": 32, "head_dim": 64,
         "max_position_embeddings": 163840,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                             "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}},
        [None],
    ),
    "yarn_no_truncate": (
        # gpt-oss: truncate false.
        {"hidden_size": 2880, "num_attention_heads": 64, "head_dim": 64,
         "max_position_embeddings": 131072,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False}},
        [None],
    ),
    "yarn_null_factor_partial": (
        # No factor (the ratio of the lengths), an explicit attention factor, partial rotary.
        {"hidden_size": 2048, "num_attention_heads": 16, "head_dim": 128,
         "max_position_embeddings": 65536,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                             "original_max_position_embeddings": 16384, "attention_factor": 1.2,
                             "partial_rotary_factor": 0.5}},
        [None],
    ),
    "longrope_phi3_t4": (
        # Phi-3-mini-128k: original length at the top level, factor from the two lengths.
        {"hidden_size": 3072, "num_attention_heads": 32, "head_dim": 96,
         "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
         "rope_theta": 10000.0,
         "rope_scaling": {"type": "longrope", "short_factor": factors(48, 1.0, 1.2),
                          "long_factor": factors(48, 1.0, 40.0)}},
        [None, 4096, 4097, 8000],
    ),
    "longrope_partial": (
        # Phi-4-mini: partial rotary 0.75, original length inside the description.
        {"hidden_size": 3072, "num_attention_heads": 24, "head_dim": 128,
         "max_position_embeddings": 131072,
         "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.75,
                             "original_max_position_embeddings": 4096,
                             "short_factor": factors(48, 1.0, 3.0),
                             "long_factor": factors(48, 1.0, 60.0)}},
        [None, 5000],
    ),
    "dynamic_t4": (
        {"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
         "max_position_embeddings": 2048, "rope_theta": 10000.0,
         "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        [None, 2048, 2049, 4096, 10000],
    ),
    "dynamic_partial": (
        {"hidden_size": 512, "num_attention_heads": 8, "head_dim": 64,
         "max_position_embeddings": 512,
         "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0,
                             "partial_rotary_factor": 0.25}},
        [None, 600, 2048],
    ),
}


def llama_config(fields: dict) -> transformers.LlamaConfig:
    kwargs = {k: v for k, v in fields.items()}
    # Deep copies: transformers standardizes the dicts in place.
    for key in ("rope_scaling", "rope_parameters"):
        if key in kwargs:
            kwargs[key] = json.loads(json.dumps(kwargs[key]))
    return transformers.LlamaConfig(num_hidden_layers=1, intermediate_size=8, vocab_size=8, **kwargs)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (fields, lengths) in CASES.items():
        config = llama_config(fields)
        rope_type = config.rope_parameters["rope_type"]
        head_dim = fields["head_dim"]
        dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        cases = []
        for seq_len in lengths:
            if rope_type == "default":
                # GPT-NeoX's default honours partial_rotary_factor (Llama's ignores it).
                inv_freq, factor = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
            else:
                arg = None if seq_len is None else torch.tensor(seq_len)
                if rope_type == "longrope" and seq_len is not None:
                    arg = seq_len  # longrope_frequency_update passes a Python int
                inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=arg)
            assert inv_freq.dtype == torch.float32 and inv_freq.numel() == dim // 2, name
            cases.append({
                "seq_len": seq_len,
                "inv_freq": [float(x) for x in inv_freq.tolist()],
                "attention_factor": float(factor),
            })
        record = {
            "transformers": transformers.__version__,
            "rope_type": rope_type,
            "head_dim": head_dim,
            "dim": dim,
            "config": fields,
            "cases": cases,
        }
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: {rope_type}, dim {dim}, attention factor {cases[0]['attention_factor']:.6f} -> {path}")


if __name__ == "__main__":
    main()
