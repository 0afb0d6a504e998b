#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2/rome_traces.json: causal traces computed the way ROME's own
code computes them, for the test that the Rust tracer reproduces ROME's numbers; with
--severed, writes tests/fixtures/smollm2/rome_severed.json instead: the paper's Figure 3
traces with MLP or attention paths severed, computed by ROME's own notebook code.

The functions below follow ROME's experiments/causal_trace.py (kmeng01/rome, MIT licence)
line for line -- make_inputs, predict_from_input, decode_tokens, find_token_range,
collect_embedding_std, trace_with_patch, trace_important_states/window,
calculate_hidden_flow -- with two adaptations: forward hooks stand in for ROME's nethook, and
layername knows Llama's names (model.model.embed_tokens, model.model.layers.N, .mlp,
.self_attn) beside ROME's own GPT-2 branch, since the model is SmolLM2 loaded by transformers
from its GGUF file (dequantized to f32); make_inputs' batch goes to the model's device, where
ROME's goes to "cuda".

The --severed functions follow notebooks/causal_trace_frozen_mlp_attn.ipynb (same repository)
line for line -- trace_with_repatch, calculate_hidden_flow_3, trace_important_states_3 -- with
the same two adaptations, plus: the notebook hard-codes GPT-2's embedding name
"transformer.wte" in trace_with_repatch, which here is layername(model, 0, "embed"), and
nethook.TraceDict's retention of each hooked output (clone=False, detach=False: the very object
the hook returned) is RetainingTraceDict. As in the notebook, trace_with_repatch seeds
RandomState(1) once per call and, when it has states to unpatch, runs two passes that each
draw fresh noise, so the frozen MLP/attention outputs come from the stream's first
S x (e-b) x d normals and the measured pass uses the next ones.

Run by hand (torch, transformers, gguf, numpy; see tools/golden-requirements.txt):

    python tools/rome_reference.py --smollm2 "$(scripts/fetch-model.sh)" \\
        --knowns ../shared/data/known_1000.json

    python tools/rome_reference.py --smollm2 "$(scripts/fetch-model.sh)" \\
        --knowns ../shared/data/known_1000.json --severed

The first takes 2 threads, the second 1 (--threads overrides); the second ran in about 10
minutes on one core.

With --gemma3 PATH instead of --smollm2 the same functions run on Gemma 3 270M base (its
Q4_K_M GGUF, dequantized to f32 by transformers) and write tests/fixtures/gemma3/
rome_traces.json (or rome_severed.json with --severed; not run so far: the severed
functions need nothing Gemma-specific, and trace_with_repatch unpatching 18 MLP or
attention outputs ran on Gemma as a check). Gemma's module names are Llama's, so layername is
unchanged. Two things differ in what the code sees: Gemma's embedding module
(Gemma3TextScaledWordEmbedding) returns the embeddings already scaled by sqrt(640), so the
noise, added to that module's output, and collect_embedding_std both work at that scale; and
the tokenizer prepends <bos>, so make_inputs' token lists, and with them each subject
collect_embedding_std encodes, include <bos>'s (scaled) row, and find_token_range finds a
subject at the start of a prompt at token 1 ("<bos>" decodes to five characters that
precede it). The Gemma fixture also records how many known_1000 facts ROME's code counts as
known: ROME's predict_token on each prompt alone (make_inputs, predict_from_input, decode),
with calculate_hidden_flow's rule (answer.strip() == attribute), and, for comparison, how
many pass the first-token rule (argmax = first token of " " + attribute, no <bos>).

    python tools/rome_reference.py --gemma3 ~/.cache/causal-trace/models/gemma-3-270m-q4_k_m.gguf \\
        --knowns ../shared/data/known_1000.json

On two cores shared with other jobs it took about 40 minutes for collect_embedding_std (a
full forward per subject, the LM head being 262144 x 640), 30 for the known count, and 22
for each fact's three tables.
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
SEVERED_OUT = OUT.with_name("rome_severed.json")
# (known_id, token_range): one short fact with tokens before its subject, traced over every
# token; then the notebook's setting, the last subject token only: Joseph Goebbels (subject
# first), Peru (a one-token subject at token 4), Kingdom of Hungary (subject at tokens 4..7),
# Marshall Islands (subject at 1..3, also in rome_traces.json).
SEVERED_FACTS = [(21, None), (78, "last_subject"), (390, "last_subject"), (149, "last_subject"), (7, "last_subject")]
GEMMA3_OUT = OUT.parent.parent / "gemma3" / "rome_traces.json"
# Criminal Minds (subject at tokens 1..3, right after <bos>), Roman Republic (tokens 4..6).
GEMMA3_FACTS = [818, 21]


def layername(model, num, kind=None):
    # ROME's own branch for GPT-2 (its models), then Llama's names (SmolLM2, Gemma).
    if hasattr(model, "transformer"):
        if kind == "embed":
            return "transformer.wte"
        return f'transformer.h.{num}{"" if kind is None else "." + kind}'
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


class RetainingTraceDict(dict):
    """nethook.TraceDict as the severed-path notebook uses it: edit_output hooks that also retain,
    per layer name, the output each hook returned (ROME's Trace does recursive_copy(output,
    clone=False, detach=False), which is the object itself), as trace[layer].output."""

    class Retained:
        output = None

    def __init__(self, model, layers, edit_output):
        super().__init__()
        modules = dict(model.named_modules())
        self.handles = []
        for name in dict.fromkeys(layers):  # nethook's flag_last_unseen drops repeated names
            self[name] = RetainingTraceDict.Retained()

            def hook(m, i, o, name=name):
                o = edit_output(o, name)
                self[name].output = o
                return o

            self.handles.append(modules[name].register_forward_hook(hook))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in reversed(self.handles):
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
    # ROME's make_inputs puts the batch on "cuda"; here on the model's device.
    inp = make_inputs(tokenizer, [prompt] * (samples + 1), device=next(model.parameters()).device)
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


# From notebooks/causal_trace_frozen_mlp_attn.ipynb.


def trace_with_repatch(
    model,  # The model
    inp,  # A set of inputs
    states_to_patch,  # A list of (token index, layername) triples to restore
    states_to_unpatch,  # A list of (token index, layername) triples to re-randomize
    answers_t,  # Answer probabilities to collect
    tokens_to_mix,  # Range of tokens to corrupt (begin, end)
    noise=0.1,  # Level of noise to add
):
    prng = numpy.random.RandomState(1)  # For reproducibility, use pseudorandom noise
    patch_spec = defaultdict(list)
    for t, l in states_to_patch:
        patch_spec[l].append(t)
    unpatch_spec = defaultdict(list)
    for t, l in states_to_unpatch:
        unpatch_spec[l].append(t)
    embed_layername = layername(model, 0, "embed")  # the notebook: "transformer.wte"

    def untuple(x):
        return x[0] if isinstance(x, tuple) else x

    # Define the model-patching rule.
    def patch_rep(x, layer):
        if layer == embed_layername:
            # If requested, we corrupt a range of token embeddings on batch items x[1:]
            if tokens_to_mix is not None:
                b, e = tokens_to_mix
                x[1:, b:e] += noise * torch.from_numpy(prng.randn(x.shape[0] - 1, e - b, x.shape[2])).to(x.device)
            return x
        if first_pass or (layer not in patch_spec and layer not in unpatch_spec):
            return x
        # If this layer is in the patch_spec, restore the uncorrupted hidden state
        # for selected tokens.
        h = untuple(x)
        for t in patch_spec.get(layer, []):
            h[1:, t] = h[0, t]
        for t in unpatch_spec.get(layer, []):
            h[1:, t] = untuple(first_pass_trace[layer].output)[1:, t]
        return x

    # With the patching rules defined, run the patched model in inference.
    for first_pass in [True, False] if states_to_unpatch else [False]:
        with torch.no_grad(), RetainingTraceDict(
            model,
            [embed_layername] + list(patch_spec.keys()) + list(unpatch_spec.keys()),
            edit_output=patch_rep,
        ) as td:
            outputs_exp = model(**inp)
            if first_pass:
                first_pass_trace = td

    # We report softmax probabilities for the answers_t token predictions of interest.
    probs = torch.softmax(outputs_exp.logits[1:, -1, :], dim=1).mean(dim=0)[answers_t]

    return probs


def calculate_hidden_flow_3(
    model,
    tokenizer,
    prompt,
    subject,
    token_range=None,
    samples=10,
    noise=0.1,
    window=10,
    extra_token=0,
    disable_mlp=False,
    disable_attn=False,
):
    # ROME's make_inputs puts the batch on "cuda"; here on the model's device.
    inp = make_inputs(tokenizer, [prompt] * (samples + 1), device=next(model.parameters()).device)
    with torch.no_grad():
        answer_t, base_score = [d[0] for d in predict_from_input(model, inp)]
    [answer] = decode_tokens(tokenizer, [answer_t])
    e_range = find_token_range(tokenizer, inp["input_ids"][0], subject)
    if token_range == "last_subject":
        token_range = [e_range[1] - 1]
    e_range = (e_range[0], e_range[1] + extra_token)
    low_score = trace_with_patch(model, inp, [], answer_t, e_range, noise=noise).item()
    differences = trace_important_states_3(
        model,
        model.config.num_hidden_layers,
        inp,
        e_range,
        answer_t,
        noise=noise,
        disable_mlp=disable_mlp,
        disable_attn=disable_attn,
        token_range=token_range,
    )
    differences = differences.detach().cpu()
    return dict(
        scores=differences,
        low_score=low_score,
        high_score=base_score,
        input_ids=inp["input_ids"][0],
        input_tokens=decode_tokens(tokenizer, inp["input_ids"][0]),
        subject_range=e_range,
        answer=answer,
        window=window,
        kind="",
        # Not in the notebook's dict; the fixture records them.
        answer_id=int(answer_t),
        tokens_traced=list(range(inp["input_ids"].shape[1]) if token_range is None else token_range),
        inp=inp,
    )


def trace_important_states_3(
    model,
    num_layers,
    inp,
    e_range,
    answer_t,
    noise=0.1,
    disable_mlp=False,
    disable_attn=False,
    token_range=None,
):
    ntoks = inp["input_ids"].shape[1]
    table = []
    zero_mlps = []
    if token_range is None:
        token_range = range(ntoks)
    for tnum in token_range:
        zero_mlps = []
        if disable_mlp:
            zero_mlps = [(tnum, layername(model, L, "mlp")) for L in range(0, num_layers)]
        if disable_attn:
            zero_mlps += [(tnum, layername(model, L, "attn")) for L in range(0, num_layers)]
        row = []
        for layer in range(0, num_layers):
            r = trace_with_repatch(
                model,
                inp,
                [(tnum, layername(model, layer))],
                zero_mlps,  # states_to_unpatch
                answer_t,
                tokens_to_mix=e_range,
                noise=noise,
            )
            row.append(r)
        table.append(torch.stack(row))
    return torch.stack(table)


def severed_fact(model, tokenizer, k, token_range, noise_level):
    """One fact of rome_severed.json: the notebook's three calculate_hidden_flow_3 runs (as in its
    calculate_last_subject, but for any token_range), and what a severed state that changes
    nothing scores: the second pass's plain corrupted probability."""
    record = {key: k[key] for key in ("known_id", "prompt", "subject", "attribute")}
    record["token_range"] = token_range
    seconds, calls, scores = {}, {}, {}
    num_layers = model.config.num_hidden_layers
    for name, flags in (("hidden", {}), ("severed_mlp", {"disable_mlp": True}), ("severed_attn", {"disable_attn": True})):
        started = time.perf_counter()
        r = calculate_hidden_flow_3(model, tokenizer, k["prompt"], k["subject"], token_range=token_range, noise=noise_level, **flags)
        seconds[name] = time.perf_counter() - started
        calls[name] = len(r["tokens_traced"]) * num_layers
        scores[name] = r["scores"].tolist()
        run = dict(
            tokens=r["input_tokens"],
            subject_range=list(r["subject_range"]),
            answer=r["answer"],
            answer_id=r["answer_id"],
            high_score=r["high_score"].item(),
            low_score=r["low_score"],
            tokens_traced=[int(t) for t in r["tokens_traced"]],
        )
        if name == "hidden":
            record.update(run)
            record["correct_prediction"] = run["answer"].strip() == k["attribute"]
            inp = r["inp"]
        else:  # every run predicts and corrupts the same way
            assert all(record[key] == v for key, v in run.items()), (name, run)
    answer_t = record["answer_id"]
    e_range = tuple(record["subject_range"])
    t = 0 if e_range[0] > 0 else None
    started = time.perf_counter()
    if t is None:
        severed_corrupted = None
    else:
        severed_corrupted = trace_with_repatch(
            model, inp, [], [(t, layername(model, L, "mlp")) for L in range(num_layers)], answer_t, e_range, noise_level
        ).item()
    seconds["severed_corrupted"] = time.perf_counter() - started
    record["scores"] = scores
    record["severed_corrupted_token"] = t
    record["severed_corrupted_score"] = severed_corrupted
    record["seconds"] = sum(seconds.values())
    record["seconds_by_run"] = seconds
    record["seconds_per_call"] = {name: seconds[name] / calls[name] for name in calls}
    return record


def count_known(model, tokenizer, knowns):
    """How many facts ROME's code traces: calculate_hidden_flow returns only
    correct_prediction=False unless the decoded top-1 token, stripped, is the attribute; here
    predict_token's steps on each prompt alone. Also the first-token rule's count."""
    rome, first = 0, 0
    for k in knowns:
        with torch.no_grad():  # predict_token(model, tokenizer, [k["prompt"]]), keeping the id
            preds, _ = predict_from_input(model, make_inputs(tokenizer, [k["prompt"]]))
        [answer] = [tokenizer.decode(c) for c in preds]
        rome += answer.strip() == k["attribute"]
        first += int(preds[0]) == tokenizer(" " + k["attribute"], add_special_tokens=False).input_ids[0]
    return rome, first


def severed_main(model, tokenizer, knowns, std, noise_level, out=SEVERED_OUT):
    facts = []
    for known_id, token_range in SEVERED_FACTS:
        k = next(k for k in knowns if k["known_id"] == known_id)
        record = severed_fact(model, tokenizer, k, token_range, noise_level)
        facts.append(record)
        per_call = ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in record["seconds_per_call"].items())
        print(
            f"{k['prompt']!r} -> {record['answer']!r}: high {record['high_score']:.4f}, low {record['low_score']:.4f}, "
            f"severed corrupted {record['severed_corrupted_score']}"
        )
        print(f"  ROME's code traced {len(record['tokens_traced'])} token(s) x 3 runs in {record['seconds']:.1f} s; per call: {per_call}")
    fixture = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "embedding_std": std,
        "noise_level": noise_level,
        "samples": 10,
        "facts": facts,
    }
    out.write_text(json.dumps(fixture) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--smollm2", type=Path)
    which.add_argument("--gemma3", type=Path, help=f"write ../gemma3/{OUT.name} (or {SEVERED_OUT.name})")
    parser.add_argument("--knowns", type=Path, required=True)
    parser.add_argument("--severed", action="store_true", help=f"write {SEVERED_OUT.name} instead of {OUT.name}")
    parser.add_argument("--threads", type=int, help="torch threads (default: 2, or 1 with --severed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or (1 if args.severed else 2))
    gguf = args.smollm2 or args.gemma3
    out, severed_out, fact_ids = (OUT, SEVERED_OUT, FACTS) if args.smollm2 else (GEMMA3_OUT, GEMMA3_OUT.with_name(SEVERED_OUT.name), GEMMA3_FACTS)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    knowns = json.loads(args.knowns.read_text())
    with torch.no_grad():
        std = collect_embedding_std(model, tokenizer, [k["subject"] for k in knowns])
    noise_level = 3 * std  # ROME's default s3
    print(f"embedding std {std!r}, noise level {noise_level!r}")
    if args.severed:
        severed_main(model, tokenizer, knowns, std, noise_level, severed_out)
        return
    if args.gemma3:
        started = time.perf_counter()
        known_rome, known_first = count_known(model, tokenizer, knowns)
        print(f"ROME's code counts {known_rome} of {len(knowns)} facts as known ({known_first} by the first-token rule), "
              f"{time.perf_counter() - started:.1f} s")
    facts = []
    for known_id in fact_ids:
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
    if args.gemma3:
        fixture = {"model": name, **fixture, "known_1000_rome_correct": known_rome, "known_1000_first_token_correct": known_first}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
