#!/usr/bin/env python3
"""ROME's own causal-tracing code, timed fact by fact, for `trace-bench` to run side by side
with the Rust tracer on the same machine in the same run.

It loads a model with transformers -- a GGUF file (dequantized to f32, as
tools/rome_reference.py does) or a Hugging Face folder (safetensors, e.g. the random GPT-2
XL-shaped model of tools/random_model.py) -- on the given device and dtype, prints one JSON
line {"ready": ...} once loaded, then reads known_ids from stdin, one per line, and for each
prints one JSON line: the seconds ROME's calculate_hidden_flow took for the three kinds
(hidden, mlp, attn; 10 samples, window 10, the given noise level), PyTorch's GEMM rate on that
device in that dtype measured just before and after (median of seven 2048^3 products; 8192^3
on CUDA), and the answer ROME's code predicted. The functions are tools/rome_reference.py's,
which follow ROME's experiments/causal_trace.py line for line.

    python tools/rome_bench.py --model MODEL.gguf --knowns ../shared/data/known_1000.json \\
        --noise-level 0.35 --threads 2 [--device cuda] [--dtype bf16 | --tf32]

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


def gemm_gflops(device, dtype, reps=7):
    # A GPU needs a larger product to reach its rate; .item() waits for the device.
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        (a @ b).sum().item()
        rates.append(2 * n**3 / (time.perf_counter() - started) / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def load(path: Path, device: str, dtype):
    if path.is_dir():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        folder, name = str(path.parent), path.name
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return tokenizer, model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--gguf", type=Path, required=True, help="a GGUF file or a Hugging Face folder")
    parser.add_argument("--knowns", type=Path, required=True)
    parser.add_argument("--noise-level", type=float, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    parser.add_argument("--tf32", action="store_true", help="let f32 matmuls use TF32 tensor cores (CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    tokenizer, model = load(args.model, args.device, dtype)
    device = next(model.parameters()).device
    knowns = {k["known_id"]: k for k in json.loads(args.knowns.read_text())}
    ready = {
        "ready": True,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "tf32": args.tf32,
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        known_id = int(line)
        k = knowns[known_id]
        before = gemm_gflops(device, dtype)
        started = time.perf_counter()
        answer = None
        for kind in (None, "mlp", "attn"):
            r = calculate_hidden_flow(model, tokenizer, k["prompt"], k["subject"], noise=args.noise_level, kind=kind, expect=k["attribute"])
            answer = r["answer"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        after = gemm_gflops(device, dtype)
        record = {"known_id": known_id, "seconds": seconds, "gemm_gflops": (before + after) / 2, "answer": answer}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
