#!/usr/bin/env python3
"""ROME's own causal-tracing code, timed fact by fact, for `trace-bench` to run side by side
with the Rust tracer on the same machine in the same run.

It loads a GGUF model with transformers (dequantized to f32, as tools/rome_reference.py
does), prints one JSON line {"ready": ...} once loaded, then reads known_ids from stdin, one
per line, and for each prints one JSON line: the seconds ROME's calculate_hidden_flow took
for the three kinds (hidden, mlp, attn; 10 samples, window 10, the given noise level),
PyTorch's f32 GEMM rate measured just before and after (median of seven 2048^3 products),
and the answer ROME's code predicted. The functions are tools/rome_reference.py's, which
follow ROME's experiments/causal_trace.py line for line.

    python tools/rome_bench.py --gguf MODEL.gguf --knowns ../shared/data/known_1000.json \\
        --noise-level 0.35 --threads 2

The noise level is passed in (trace-bench computes s3 = 3 x the embedding std the same way
ROME does; the fixtures' tests show the two agree), so the bench skips
collect_embedding_std, which on Gemma 3 takes longer than tracing a fact.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rome_reference import calculate_hidden_flow  # noqa: E402


def gemm_gflops(n=2048, reps=7):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        (a @ b).sum().item()
        rates.append(2 * n**3 / (time.perf_counter() - started) / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--knowns", type=Path, required=True)
    parser.add_argument("--noise-level", type=float, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder, name = str(args.gguf.parent), args.gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    knowns = {k["known_id"]: k for k in json.loads(args.knowns.read_text())}
    ready = {"ready": True, "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        known_id = int(line)
        k = knowns[known_id]
        before = gemm_gflops()
        started = time.perf_counter()
        answer = None
        for kind in (None, "mlp", "attn"):
            r = calculate_hidden_flow(model, tokenizer, k["prompt"], k["subject"], noise=args.noise_level, kind=kind, expect=k["attribute"])
            answer = r["answer"]
        seconds = time.perf_counter() - started
        after = gemm_gflops()
        record = {"known_id": known_id, "seconds": seconds, "gemm_gflops": (before + after) / 2, "answer": answer}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
