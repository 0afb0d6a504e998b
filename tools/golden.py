#!/usr/bin/env python3
"""Writes the reference fixtures the engine's parity tests compare against.

Run by hand (not in CI), from the repository root, in an environment with PyTorch,
transformers and gguf from PyPI (tools/golden-requirements.txt):

    python tools/golden.py --smollm2 "$(scripts/fetch-model.sh)" --knowns ../shared/data/known_1000.json

It writes, under tests/fixtures/:

- tiny/<family>/: tiny randomly initialised GPT-2, Llama (GQA, untied head, Llama 3 RoPE
  scaling), Qwen2 (q/k/v biases, tied head) and Mistral (sliding window, explicit head_dim)
  models saved by transformers as safetensors folders, with a one-token-per-byte
  tokenizer.json (256 tokens), each with reference.safetensors:
  `input_ids` (2, 12) and `logits` (2, 12, vocab) from transformers' forward in f32.
- smollm2/reference.safetensors + prompts.json: SmolLM2-135M-Instruct loaded by transformers
  from the GGUF file (dequantized to f32): token ids and last-position logits of a few prompts.
- smollm2/known_1000_ids.json: transformers' token ids (tokenizer built from the GGUF) of
  every prompt of known_1000.json, keyed by known_id.
- gemma3/reference.safetensors + prompts.json: Gemma 3 270M (Q4_K_M GGUF, dequantized to
  f32) on the same prompts, with `--gemma3 PATH --no-tiny` (see write_gemma3).

Everything is seeded, so a rerun with the same library versions rewrites the same files.
"""

import argparse
import json
import os
import zlib
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SEQ_LEN = 12
VOCAB = 256
FIRST = ["gpt2", "llama", "qwen2", "mistral"]

SMOLLM2_PROMPTS = [
    "Joseph Goebbels worked in the city of",
    "Vinson Massif is located in the continent of",
    "Beats Music is owned by",
    "The Space Needle is located in the city of",
    "In 1969, the first person to walk on the moon was",
    "Apple A5 was created by",
]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter so activations and logits are O(1)-O(10): with the default
    0.02 init a wrong attention or norm would move logits by less than the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * 1.5)


def tiny_configs():
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # With head_dim 8 this puts frequencies in each of the three regimes.
        "original_max_position_embeddings": 64,
    }
    return {
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4, activation_function="gelu_new",
            bos_token_id=0, eos_token_id=0,
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=llama3,
        ),
        "qwen2": transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "mistral": transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=12, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=4,
        ),
        # Issue 14's Llama-style families. Small windows and soft-caps so that every option
        # bites within the 12-token fixtures.
        "qwen3": transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
            max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "gemma": transformers.GemmaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6,
        ),
        "gemma2": transformers.Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6, query_pre_attn_scalar=12, sliding_window=4,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
        ),
        "gemma3": transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6, query_pre_attn_scalar=12, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
        "phi3": transformers.Phi3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            original_max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=5,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=0, bos_token_id=0,
        ),
        "olmo2": transformers.Olmo2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=0, bos_token_id=0,
        ),
        # Issue 15: parallel blocks with partial rotary, and the RoPE scalings of real
        # checkpoints, each set so that it bites within the 12-token fixtures.
        "gptj": transformers.GPTJConfig(
            vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=3, n_head=4, rotary_dim=8,
            n_inner=128, activation_function="gelu_new", tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0,
        ),
        "gpt_neox": transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25,
            use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
            bos_token_id=0, eos_token_id=0,
        ),
        # Sequential residual, and the other options: no attention biases, tied head, another
        # base and rotated fraction.
        "gpt_neox_seq": transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5,
            rotary_emb_base=100, use_parallel_residual=False, attention_bias=False,
            tie_word_embeddings=True, hidden_act="gelu_new", bos_token_id=0, eos_token_id=0,
        ),
        # With head_dim 8 and an original length of 256, yarn's ramp spans the frequencies:
        # one kept, one blended, two divided; the attention factor is 1 + 0.1 ln 4.
        "llama_yarn": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 256},
        ),
        # 12 tokens exceed the original 8: the long factors, and an attention factor of
        # sqrt(1 + ln 8 / ln 8) from max / original = 8.
        "llama_longrope": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "original_max_position_embeddings": 8,
                             "short_factor": [1.0, 1.1, 1.3, 1.6],
                             "long_factor": [1.0, 2.0, 4.0, 8.0]},
        ),
        # 12 tokens exceed max_position_embeddings 8: the NTK base grows for the call.
        "llama_dynamic": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        ),
        # Dynamic NTK on a partial rotary width (its exponent uses the rotated width).
        "gpt_neox_dynamic": transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=8, rotary_pct=0.5,
            rope_parameters={"rope_type": "dynamic", "factor": 4.0},
            use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
            bos_token_id=0, eos_token_id=0,
        ),
    }


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer with one token per byte (GPT-2's alphabet, no merges): the tiny
    models' 256-token vocabulary, so tests can trace real text on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: byte for byte, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def write_tiny(seed: int, only: set[str] | None) -> None:
    for name, config in tiny_configs().items():
        if only is not None and name not in only:
            continue
        # The first four families keep the seeds they were written with; the others take one
        # from their name, so adding a family changes no other fixture.
        index = FIRST.index(name) if name in FIRST else 1000 + zlib.crc32(name.encode()) % 1000
        torch.manual_seed(seed + index)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model.eval()
        randomize(model, seed + index)
        out = FIXTURES / "tiny" / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        write_byte_tokenizer(out / "tokenizer.json")
        gen = torch.Generator().manual_seed(seed + 100 + index)
        ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=gen)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous()}, out / "reference.safetensors")
        print(f"{name}: logits range [{logits.min():.2f}, {logits.max():.2f}] -> {out}")


def write_smollm2(gguf_path: Path, knowns_path: Path | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    out = FIXTURES / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    tensors, records = {}, []
    rows = []
    for i, prompt in enumerate(SMOLLM2_PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        tensors[f"input_ids.{i}"] = ids[0].to(torch.int64).contiguous()
        rows.append(logits)
        top = torch.topk(logits, 5)
        records.append({
            "prompt": prompt,
            "ids": ids[0].tolist(),
            "top5": top.indices.tolist(),
            "top5_tokens": [tokenizer.decode([t]) for t in top.indices.tolist()],
        })
        print(f"{prompt!r} -> {records[-1]['top5_tokens']}")
    tensors["logits"] = torch.stack(rows).contiguous()
    save_file(tensors, out / "reference.safetensors")
    meta = {
        "model": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prompts": records,
    }
    if knowns_path is not None:
        knowns = json.loads(knowns_path.read_text())
        ids = {str(k["known_id"]): tokenizer(k["prompt"]).input_ids for k in knowns}
        text = json.dumps(ids, separators=(",", ":"))
        (out / "known_1000_ids.json").write_text(text + "\n")
        print(f"token ids of {len(ids)} prompts -> {out / 'known_1000_ids.json'}")
        meta["known_1000_first_token_correct"] = count_known(model, tokenizer, knowns)
        print(f"transformers predicts {meta['known_1000_first_token_correct']} of {len(knowns)} known facts")
    (out / "prompts.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def count_known(model, tokenizer, knowns) -> int:
    """Facts whose argmax next token is the first token of " " + attribute."""
    correct = 0
    for k in knowns:
        ids = tokenizer(k["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        correct += top == tokenizer(" " + k["attribute"], add_special_tokens=False).input_ids[0]
    return correct


GEMMA3_TOP = 1000


def write_gemma3(gguf_path: Path, knowns_path: Path | None) -> None:
    """Gemma 3 270M base loaded by transformers from its Q4_K_M GGUF file (dequantized to f32;
    its loader subtracts the +1 llama.cpp adds to the norm weights) on SMOLLM2_PROMPTS.

    A full last-position row is 262144 f32 logits (1 MiB a prompt), so
    gemma3/reference.safetensors keeps, per prompt i: `input_ids.{i}` (with the <bos> the
    tokenizer prepends), and, stacked over prompts, `top_ids` (P, 1000) i64 and `top_logits`
    (P, 1000) f32, the 1000 largest logits of the row in descending order, and `logsumexp`
    (P,) f32, the log-sum-exp of the whole row (computed in f64). A test gathers its own
    logits at `top_ids` for max |delta logit| over the 1000 likeliest tokens, checks its
    argmax is `top_ids[i, 0]`, its own log-sum-exp against `logsumexp` (the whole row's
    mass), and p(top-1) = exp(top_logits[i, 0] - logsumexp[i]), also in prompts.json as
    `top1_prob`. About 100 KB.

    prompts.json also gives `known_1000_first_token_correct`: the facts of known_1000.json
    whose argmax next token is the first token of " " + attribute (without <bos>).
    The token ids of known_1000 (known_1000_ids.json) are written elsewhere.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    out = FIXTURES / "gemma3"
    out.mkdir(parents=True, exist_ok=True)
    tensors, records = {}, []
    top_ids, top_logits, lse = [], [], []
    for i, prompt in enumerate(SMOLLM2_PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        tensors[f"input_ids.{i}"] = ids[0].to(torch.int64).contiguous()
        top = torch.topk(logits, GEMMA3_TOP)
        top_ids.append(top.indices.to(torch.int64))
        top_logits.append(top.values)
        lse.append(torch.logsumexp(logits.double(), 0))
        p1 = float(torch.exp(logits[top.indices[0]].double() - lse[-1]))
        records.append({
            "prompt": prompt,
            "ids": ids[0].tolist(),
            "top5": top.indices[:5].tolist(),
            "top5_tokens": [tokenizer.decode([t]) for t in top.indices[:5].tolist()],
            "top1_prob": p1,
        })
        print(f"{prompt!r} -> {records[-1]['top5_tokens']} p(top-1) {p1:.4f}")
    tensors["top_ids"] = torch.stack(top_ids).contiguous()
    tensors["top_logits"] = torch.stack(top_logits).contiguous()
    tensors["logsumexp"] = torch.stack(lse).float().contiguous()
    save_file(tensors, out / "reference.safetensors")
    meta = {
        "model": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "top_k": GEMMA3_TOP,
        "prompts": records,
    }
    if knowns_path is not None:
        knowns = json.loads(knowns_path.read_text())
        meta["known_1000_first_token_correct"] = count_known(model, tokenizer, knowns)
        print(f"transformers predicts {meta['known_1000_first_token_correct']} of {len(knowns)} known facts")
    (out / "prompts.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--gemma3", type=Path, help="path of gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--knowns", type=Path, help="known_1000.json, for the tokenizer fixture")
    parser.add_argument("--seed", type=int, default=20221)
    parser.add_argument("--only", help="comma-separated tiny families to write (default: all)")
    parser.add_argument("--no-tiny", action="store_true", help="write no tiny model")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("GOLDEN_THREADS", "2")))
    if not args.no_tiny:
        write_tiny(args.seed, set(args.only.split(",")) if args.only else None)
    if args.smollm2:
        write_smollm2(args.smollm2, args.knowns)
    if args.gemma3:
        write_gemma3(args.gemma3, args.knowns)


if __name__ == "__main__":
    main()
