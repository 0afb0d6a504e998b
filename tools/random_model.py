#!/usr/bin/env python3
"""Writes a randomly initialised GPT-2 model folder that both our worker and ROME's code load:
config.json, model.safetensors, and GPT-2's tokenizer (vocab.json, merges.txt).

For speed measurements on model shapes nobody can download here: `--shape gpt2-xl` is ROME's
model's shape (48 layers, d = 1600, 25 heads, GPT-2's 50,257-token vocabulary; 1.56 B
parameters, 6.2 GB in f32). The weights are transformers' own initialisation (normal with
std 0.02, as `GPT2PreTrainedModel._init_weights` draws them) under a fixed seed, so a rerun
writes the same file; a random model predicts no fact, so trace such models with
`--correctness none`. Tokens come from GPT-2's real BPE vocabulary
(scripts/fetch-gpt2-vocab.sh), so known_1000's prompts tokenize as they do for GPT-2 XL and
the traces have the paper's lengths.

    python tools/random_model.py --shape gpt2-xl --vocab-dir "$(scripts/fetch-gpt2-vocab.sh)" \\
        --out /tmp/gpt2-xl-random [--device cuda]
"""

import argparse
import shutil
from pathlib import Path

import torch
import transformers

SHAPES = {
    # ROME's model.
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
    # GPT-2 small's shape, and a tiny one for checking the tools on a CPU.
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-tiny": {"n_layer": 12, "n_embd": 64, "n_head": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--vocab-dir", type=Path, required=True, help="GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=20221)
    parser.add_argument("--device", default="cpu", help="where the weights are drawn (cuda is faster for gpt2-xl)")
    args = parser.parse_args()

    encoder, bpe = args.vocab_dir / "encoder.json", args.vocab_dir / "vocab.bpe"
    for f in (encoder, bpe):
        if not f.is_file():
            parser.error(f"{f} is missing (scripts/fetch-gpt2-vocab.sh prints the folder)")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.GPT2LMHeadModel(config)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    # GPT-2's tokenizer files under the names transformers and the worker look for.
    shutil.copyfile(encoder, args.out / "vocab.json")
    shutil.copyfile(bpe, args.out / "merges.txt")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {params / 1e9:.3f} B parameters, seed {args.seed} -> {args.out}")


if __name__ == "__main__":
    main()
