#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2/rome_traces.json: causal traces computed the way ROME's own
code computes them, for the test that the Rust tracer reproduces ROME's numbers.

The functions below follow ROME's experiments/causal_trace.py (kmeng01/rome, MIT licence)
line for line -- make_inputs, predict_from_input, decode_tokens, find_token_range,
collect_embedding_std, trace_with_patch, trace_important_states/window,
calculate_hidden_flow -- with two adaptations: forward hooks stand in for ROME's nethook, and
the layer names are Llama's (model.model.embed_tokens, model.model.layers.N, .mlp, .self_attn)
since the model is SmolLM2 loaded by transformers from its GGUF file (dequantized to f32).

Run by hand (torch, transformers, gguf, numpy; see tools/golden-requirements.txt):

    python tools/rome_reference.py --smollm2 "$(scripts/fetch-model.sh)" \\
        --knowns ../shared/data/known_1000.json
"""

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy
import torch
import transformers

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2" / "rome_traces.json"
FACTS = [78, 7]  # Joseph Goebbels (subject first), and a fact whose subject starts later


def layername(model, num, kind=None):
    if kind == "embed":
        return "model.embed_tokens"
    return f"model.layers.{num}" + ("" if kind is None else {"mlp": ".mlp", "attn": ".self_attn"}[kind])


class TraceDict:
    """The part of ROME's nethook.TraceDict that causal tracing uses: edit_output hooks."""

    def __init__(self, model, layers, edit_output):
        modules = dict(model.named_modules())
        self.handles = [
            modules[name].register_forward_hook(lambda m, i, o, name=name: edit_output(o, name)) for name in layers
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def make_inputs(tokenizer, prompts, device="cpu"):
    token_lists = [tokenizer.encode(p) for p in prompts]
    maxlen = max(len(t) for t in token_lists)
    pad_id = 0
    input_ids = [[pad_id] * (maxlen - len(t)) + t for t in token_lists]
    attention_mask = [[0] * (maxlen - len(t)) + [1] * len(t) for t in token_lists]
    return dict(input_ids=torch.tensor(input_ids).to(device), attention_mask=torch.tensor(attention_mask).to(device))


def decode_tokens(tokenizer, token_array):
    if hasattr(token_array, "shape") and len(token_array.shape) > 1:
        return [decode_tokens(tokenizer, row) for row in token_array]
    return [tokenizer.decode([t]) for t in token_array]


def find_token_range(tokenizer, token_array, substring):
    toks = decode_tokens(tokenizer, token_array)
    whole_string = "".join(toks)
    char_loc = whole_string.index(substring)
    loc = 0
    tok_start, tok_end = None, None
    for i, t in enumerate(toks):
        loc += len(t)
        if tok_start is None and loc > char_loc:
            tok_start = i
        if tok_end is None and loc >= char_loc + len(substring):
            tok_end = i + 1
            break
    return (tok_start, tok_end)


def predict_from_input(model, inp):
    out = model(**inp)["logits"]
    probs = torch.softmax(out[:, -1], dim=1)
    p, preds = torch.max(probs, dim=1)
    return preds, p


def collect_embedding_std(model, tokenizer, subjects):
    alldata = []
    for s in subjects:
        inp = make_inputs(tokenizer, [s])
        captured = {}
        with TraceDict(model, [layername(model, 0, "embed")], lambda o, n: captured.setdefault("out", o)):
            model(**inp)
        alldata.append(captured["out"][0])
    alldata = torch.cat(alldata)
    return alldata.std().item()


def trace_with_patch(model, inp, states_to_patch, answers_t, tokens_to_mix, noise=0.1, uniform_noise=False, replace=False):
    rs = numpy.random.RandomState(1)
    if uniform_noise:
        prng = lambda *shape: rs.uniform(-1, 1, shape)
    else:
        prng = lambda *shape: rs.randn(*shape)
    patch_spec = defaultdict(list)
    for t, l in states_to_patch:
        patch_spec[l].append(t)
    embed_layername = layername(model, 0, "embed")

    def untuple(x):
        return x[0] if isinstance(x, tuple) else x

    noise_fn = lambda x: noise * x

    def patch_rep(x, layer):
        if layer == embed_layername:
            if tokens_to_mix is not None:
                b, e = tokens_to_mix
                noise_data = noise_fn(torch.from_numpy(prng(x.shape[0] - 1, e - b, x.shape[2]))).to(x.device)
                if replace:
                    x[1:, b:e] = noise_data
                else:
                    x[1:, b:e] += noise_data
            return x
        if layer not in patch_spec:
            return x
        h = untuple(x)
        for t in patch_spec[layer]:
            h[1:, t] = h[0, t]
        return x

    with torch.no_grad(), TraceDict(model, [embed_layername] + list(patch_spec.keys()), patch_rep):
        outputs_exp = model(**inp)
    return torch.softmax(outputs_exp.logits[1:, -1, :], dim=1).mean(dim=0)[answers_t]


def trace_important_states(model, num_layers, inp, e_range, answer_t, noise, kind=None, window=10):
    ntoks = inp["input_ids"].shape[1]
    table = []
    for tnum in range(ntoks):
        row = []
        for layer in range(num_layers):
            if kind is None:
                layerlist = [(tnum, layername(model, layer))]
            else:
                layerlist = [
                    (tnum, layername(model, L, kind))
                    for L in range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))
                ]
            row.append(trace_with_patch(model, inp, layerlist, answer_t, tokens_to_mix=e_range, noise=noise))
        table.append(torch.stack(row))
    return torch.stack(table)


def calculate_hidden_flow(model, tokenizer, prompt, subject, samples=10, noise=0.1, window=10, kind=None, expect=None):
    inp = make_inputs(tokenizer, [prompt] * (samples + 1))
    with torch.no_grad():
        answer_t, base_score = [d[0] for d in predict_from_input(model, inp)]
    [answer] = decode_tokens(tokenizer, [answer_t])
    correct = expect is None or answer.strip() == expect
    e_range = find_token_range(tokenizer, inp["input_ids"][0], subject)
    low_score = trace_with_patch(model, inp, [], answer_t, e_range, noise=noise).item()
    num_layers = model.config.num_hidden_layers
    scores = trace_important_states(model, num_layers, inp, e_range, answer_t, noise, kind=kind, window=window)
    return dict(
        scores=scores.tolist(),
        low_score=low_score,
        high_score=base_score.item(),
        tokens=decode_tokens(tokenizer, inp["input_ids"][0]),
        subject_range=list(e_range),
        answer=answer,
        answer_id=int(answer_t),
        correct_prediction=correct,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, required=True)
    parser.add_argument("--knowns", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder, name = str(args.smollm2.parent), args.smollm2.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    knowns = json.loads(args.knowns.read_text())
    with torch.no_grad():
        std = collect_embedding_std(model, tokenizer, [k["subject"] for k in knowns])
    noise_level = 3 * std  # ROME's default s3
    print(f"embedding std {std!r}, noise level {noise_level!r}")
    facts = []
    for known_id in FACTS:
        k = next(k for k in knowns if k["known_id"] == known_id)
        record = {key: k[key] for key in ("known_id", "prompt", "subject", "attribute")}
        started = time.perf_counter()
        for kind in (None, "mlp", "attn"):
            r = calculate_hidden_flow(model, tokenizer, k["prompt"], k["subject"], noise=noise_level, kind=kind, expect=k["attribute"])
            scores = r.pop("scores")
            record.update(r)
            record.setdefault("scores", {})[kind or "hidden"] = scores
        facts.append(record)
        seconds = time.perf_counter() - started
        print(f"{k['prompt']!r} -> {record['answer']!r}: high {record['high_score']:.4f}, low {record['low_score']:.4f}")
        print(f"  ROME's code traced all three kinds in {seconds:.1f} s ({torch.get_num_threads()} threads)")
    fixture = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "embedding_std": std,
        "noise_level": noise_level,
        "samples": 10,
        "window": 10,
        "facts": facts,
    }
    OUT.write_text(json.dumps(fixture) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
