#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2/patching.json: an independent PyTorch reference (a test oracle)
for activation patching in both directions (denoising and noising), under two corruptions
(ROME's Gaussian embedding noise, and symmetric token replacement of the subject), with four
metrics (prob, logprob, logit_diff, kl), for the three kinds of state ROME traces (hidden,
mlp, attn), on SmolLM2-135M-Instruct (Q4_1 GGUF, loaded by transformers and dequantized to f32,
exactly as tools/rome_reference.py loads it).

Only the GGUF loading and ROME's tokenisation helpers (make_inputs' tokenisation,
find_token_range, decode_tokens, layername) are shared with tools/rome_reference.py; the
patching below is written from scratch with plain forward hooks (no trace_with_patch).

What it computes, per fact (prompt tokens = tokenizer(prompt) ids, no BOS; subject range
[b, e) = ROME's find_token_range; T tokens, L = 30 layers):

* clean run (1 row): answer a = argmax of the last position's softmax; p_clean = that softmax.
* corruption "noise": S = 10 rows of the prompt with level * RandomState(1).randn(S, e-b, d)
  (float64, a fresh RandomState(1) for every run) added to the output of
  model.model.embed_tokens at tokens b..e, with ROME's dtype handling (float32 activations
  += a float64 tensor, computed in float64 and stored in float32); level =
  0.34998276829719543 (3 x ROME's collect_embedding_std for this model). Foil f = the token,
  other than a, with the highest mean probability over the S corrupted rows.
* corruption "str": 1 row of prompt.replace(subject, donor_subject, 1), the donor being the
  first fact after this one (cyclic over all 1209 records, excluding itself) with the same
  relation_id whose first token of " " + attribute differs from this fact's and from a, and
  whose substituted prompt has the same length, the same tokens outside [b, e) and not the
  same tokens inside [b, e). Foil f = first token of " " + donor attribute.
* metrics, per row at the last position's logits z, computed in float64 from the float32
  logits (softmax and log_softmax in float64), then averaged over the rows:
  prob = softmax(z)[a], logprob = log_softmax(z)[a], logit_diff = z[a] - z[f],
  kl = sum_v p_clean[v] (log p_clean[v] - log p_run[v]).
* kinds: hidden = the output of model.model.layers[l] (in transformers 5 a decoder layer
  returns a plain tensor; ROME's untuple would take that tensor itself); mlp / attn = the
  outputs of .mlp / .self_attn (output[0], after o_proj) of every layer j in
  range(max(0, l - 5), min(L, l + 5)) (ROME's window of 10).
* directions: denoising = the corrupted rows with the cell's state(s) at token t overwritten
  by the clean run's value (same in every row); noising = the clean prompt in S rows with the
  cell's state(s) at token t in row s overwritten by the value of corrupted sample s, taken
  from a corrupted run with nothing restored.

Each (direction, kind, token) is run as one batch of L cells x S rows (logits_to_keep=1), so
every cell's rows get the same noise and the same overwrites they would get alone.

It also prints how many of the 1209 facts have a donor when the answer is taken to be the
first token of " " + attribute, and the sanity checks (agreement with ROME's own hidden trace
in rome_traces.json for known_id 78; cells that can change nothing; restoring the last
layer at the last token).

Run by hand (torch, transformers, gguf, numpy; see tools/golden-requirements.txt):

    python tools/patching_reference.py --smollm2 "$(scripts/fetch-model.sh)" \\
        --knowns ../shared/data/known_1000.json

It uses 1 torch thread (--threads overrides). It ran in 1526 s (about 25 minutes) on one core
of a 2-core machine that was busy with other work: 518 s for known_id 78, 688 s for 7, 209 s for
390, 97 s for 81; the noise corruption (10 rows per cell) takes about 90% of each fact's time.

Its output on that run (transformers 5.24.0, torch 2.15.0): 1074 of the 1209 facts have a donor;
noise/denoising/{hidden,mlp,attn}/prob agrees with ROME's own tables in rome_traces.json to
3.4e-6 (known_id 78) and 3.8e-6 (known_id 7), the corrupted and clean probs with its low_score
and high_score to 6e-8 and 2e-7; cells at tokens before the subject give the corrupted run's
metrics when denoising and the clean run's when noising (the states there are bitwise equal in
clean and corrupted runs, for both corruptions); restoring the last layer at the last token
gives the clean metrics. The last two agree to within 8e-6 of the 1-row clean/corrupted runs
and to within 1e-15 of the same runs made in the tables' batch shape: the only difference is
the float32 lm_head matmul, which rounds differently for 1 row than for L x S rows.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rome_reference import decode_tokens, find_token_range, layername  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2"
OUT = FIXTURES / "patching.json"
ROME_TRACES = FIXTURES / "rome_traces.json"
NOISE_LEVEL = 0.34998276829719543
SAMPLES = 10
WINDOW = 10
KINDS = ("hidden", "mlp", "attn")
METRICS = ("prob", "logprob", "logit_diff", "kl")
# Joseph Goebbels (a 5-token subject at the start; in rome_traces.json), Marshall Islands (a
# 2-token subject after one token; in rome_traces.json), Peru (a one-token subject at token 4,
# just before the last token; in rome_severed.json), Italy (a one-token subject at token 0 of a
# 4-token prompt). All four are predicted by the model and have a donor.
FACTS = [78, 7, 390, 81]


def first_token(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def prompt_ids(tokenizer, prompt):
    return tokenizer(prompt)["input_ids"]


def find_donor(tokenizer, knowns, index, answer_id, cache=None):
    """The donor of knowns[index] (see the module docstring), as (record, token ids), or None."""
    cache = {} if cache is None else cache

    def first(text):
        if text not in cache:
            cache[text] = first_token(tokenizer, text)
        return cache[text]

    k = knowns[index]
    ids = prompt_ids(tokenizer, k["prompt"])
    b, e = find_token_range(tokenizer, ids, k["subject"])
    own = first(" " + k["attribute"])
    n = len(knowns)
    for step in range(1, n):
        d = knowns[(index + step) % n]
        if d["relation_id"] != k["relation_id"]:
            continue
        foil = first(" " + d["attribute"])
        if foil == own or foil == answer_id:
            continue
        new_ids = prompt_ids(tokenizer, k["prompt"].replace(k["subject"], d["subject"], 1))
        if len(new_ids) != len(ids) or new_ids[:b] != ids[:b] or new_ids[e:] != ids[e:]:
            continue
        if new_ids[b:e] == ids[b:e]:
            continue
        return d, new_ids
    return None


def window_layers(layer, num_layers, window=WINDOW):
    return list(range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2))))


def untuple(out):
    return out[0] if isinstance(out, tuple) else out


def state_names(model):
    n = model.config.num_hidden_layers
    return [layername(model, l, kind) for kind in (None, "mlp", "attn") for l in range(n)]


def run_last(model, input_ids, edits=None, noise=None, capture=None):
    """One forward pass over input_ids [R, T]; returns the last position's float32 logits [R, V].

    edits: {module name: [(row index tensor, token t, values broadcastable to [len(rows), d])]}
    -- the module's output at token t in those rows is overwritten with the values.
    noise: (b, e, tensor [R, e-b, d], float64) added to the token embeddings at b..e.
    capture: a list of module names whose (edited) outputs are returned too, as {name: [R, T, d]}.
    """
    modules = dict(model.named_modules())
    handles = []
    captured = {}

    def embed_hook(module, inputs, out):
        b, e, data = noise
        x = out.clone()
        x[:, b:e] += data  # float32 += float64, as ROME does
        return x

    def make_hook(name):
        def hook(module, inputs, out):
            h = untuple(out)
            if edits and name in edits:
                h = h.clone()
                for rows, t, values in edits[name]:
                    h[rows, t] = values
                out = (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            if capture and name in capture:
                captured[name] = h.detach().clone()
            return out

        return hook

    try:
        if noise is not None:
            handles.append(modules[layername(model, 0, "embed")].register_forward_hook(embed_hook))
        for name in set(edits or {}) | set(capture or []):
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1
            ).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return (logits, captured) if capture is not None else logits


def row_metrics(logits, answer_id, foil_id, clean_logp):
    """Per-row metrics [R] each, in float64, from float32 logits [R, V]."""
    z = logits.double()
    logp = torch.log_softmax(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    return {
        "prob": p[:, answer_id],
        "logprob": logp[:, answer_id],
        "logit_diff": z[:, answer_id] - z[:, foil_id],
        "kl": (clean_logp.exp() * (clean_logp - logp)).sum(dim=-1),
    }


def mean_metrics(logits, answer_id, foil_id, clean_logp):
    return {m: v.mean().item() for m, v in row_metrics(logits, answer_id, foil_id, clean_logp).items()}


def trace_tables(model, t_count, direction, kind, base_ids, rows, noise, clean, corrupted, answer_id, foil_id, clean_logp):
    """{metric: T x L table} for one direction and kind. base_ids: the [T] ids each row runs;
    rows: S; noise: (b, e, [S, e-b, d]) or None, added to every row; clean/corrupted: captured
    states {name: [1 or S, T, d]}."""
    num_layers = model.config.num_hidden_layers
    tables = {m: [] for m in METRICS}
    batch_ids = base_ids.unsqueeze(0).repeat(num_layers * rows, 1)
    batch_noise = None if noise is None else (noise[0], noise[1], noise[2].repeat(num_layers, 1, 1))
    for t in range(t_count):
        edits = {}
        for l in range(num_layers):
            row_index = torch.arange(l * rows, (l + 1) * rows)
            layers = [l] if kind == "hidden" else window_layers(l, num_layers)
            for j in layers:
                name = layername(model, j, None if kind == "hidden" else kind)
                if direction == "denoising":
                    values = clean[name][0, t]  # the same clean value in every row
                else:
                    values = corrupted[name][:, t]  # row s gets corrupted sample s
                edits.setdefault(name, []).append((row_index, t, values))
        logits = run_last(model, batch_ids, edits=edits, noise=batch_noise)
        per_row = row_metrics(logits, answer_id, foil_id, clean_logp)
        for m in METRICS:
            tables[m].append([per_row[m][l * rows : (l + 1) * rows].mean().item() for l in range(num_layers)])
    return tables


def round7(x):
    if isinstance(x, list):
        return [round7(v) for v in x]
    if isinstance(x, dict):
        return {k: round7(v) for k, v in x.items()}
    if isinstance(x, float):
        return float(f"{x:.7g}") if math.isfinite(x) else x
    return x


def trace_fact(model, tokenizer, knowns, index, log):
    k = knowns[index]
    ids_list = prompt_ids(tokenizer, k["prompt"])
    ids = torch.tensor(ids_list)
    T = len(ids_list)
    b, e = find_token_range(tokenizer, ids_list, k["subject"])
    names = state_names(model)
    d_model = model.config.hidden_size

    clean_logits, clean = run_last(model, ids.unsqueeze(0), capture=names)
    clean_logp = torch.log_softmax(clean_logits.double(), dim=-1)
    answer_id = int(clean_logits[0].argmax())
    expected = first_token(tokenizer, " " + k["attribute"])
    assert answer_id == expected, (k["known_id"], answer_id, expected)
    found = find_donor(tokenizer, knowns, index, answer_id)
    assert found is not None, k["known_id"]
    donor, donor_ids = found

    record = {key: k[key] for key in ("known_id", "prompt", "subject", "attribute")}
    record.update(token_ids=ids_list, subject_range=[b, e], answer_id=answer_id)
    record["donor"] = {
        "known_id": donor["known_id"],
        "subject": donor["subject"],
        "prompt": k["prompt"].replace(k["subject"], donor["subject"], 1),
        "token_ids": donor_ids,
    }
    record["corruptions"] = {}
    checks = {}

    for corruption in ("noise", "str"):
        started = time.perf_counter()
        if corruption == "noise":
            rows = SAMPLES
            prng = numpy.random.RandomState(1)
            noise_data = NOISE_LEVEL * torch.from_numpy(prng.randn(rows, e - b, d_model))
            noise = (b, e, noise_data)
            corrupt_ids = ids
        else:
            rows = 1
            noise = None
            corrupt_ids = torch.tensor(donor_ids)
        corrupt_logits, corrupted = run_last(
            model, corrupt_ids.unsqueeze(0).repeat(rows, 1), noise=noise, capture=names
        )
        if corruption == "noise":
            mean_p = torch.softmax(corrupt_logits.double(), dim=-1).mean(dim=0)
            mean_p[answer_id] = -1.0
            foil_id = int(mean_p.argmax())
        else:
            foil_id = first_token(tokenizer, " " + donor["attribute"])
        entry = {
            "foil_id": foil_id,
            "clean": mean_metrics(clean_logits, answer_id, foil_id, clean_logp),
            "corrupted": mean_metrics(corrupt_logits, answer_id, foil_id, clean_logp),
        }
        for direction in ("denoising", "noising"):
            entry[direction] = {}
            for kind in KINDS:
                if direction == "denoising":
                    base_ids, run_noise = corrupt_ids, noise
                else:
                    base_ids, run_noise = ids, None
                entry[direction][kind] = trace_tables(
                    model, T, direction, kind, base_ids, rows, run_noise, clean, corrupted, answer_id, foil_id, clean_logp
                )
        record["corruptions"][corruption] = entry
        seconds = time.perf_counter() - started
        log(f"  {corruption}: foil {foil_id} {decode_tokens(tokenizer, [foil_id])}, clean {fmt(entry['clean'])}, "
            f"corrupted {fmt(entry['corrupted'])} ({seconds:.0f} s)")
        # The clean and corrupted runs again, in the tables' batch shape (L cells x S rows): the
        # f32 lm_head matmul rounds differently for 1 row than for many, so "exactly the clean
        # metrics" is checked against these.
        R = model.config.num_hidden_layers * rows
        same_shape = {
            "clean": mean_metrics(run_last(model, ids.unsqueeze(0).repeat(R, 1)), answer_id, foil_id, clean_logp),
            "corrupted": mean_metrics(
                run_last(
                    model,
                    corrupt_ids.unsqueeze(0).repeat(R, 1),
                    noise=None if noise is None else (b, e, noise[2].repeat(model.config.num_hidden_layers, 1, 1)),
                ),
                answer_id,
                foil_id,
                clean_logp,
            ),
        }
        checks[corruption] = sanity_checks(entry, b, e, T, clean, corrupted, names, same_shape, log)
    return record, checks


def fmt(metrics):
    return ", ".join(f"{m} {v:.5g}" for m, v in metrics.items())


def max_diff(table_value, reference):
    return max(abs(table_value[m] - reference[m]) for m in METRICS)


def cell(entry, direction, kind, t, l):
    return {m: entry[direction][kind][m][t][l] for m in METRICS}


def sanity_checks(entry, b, e, T, clean, corrupted, names, same_shape, log):
    L = len(entry["denoising"]["hidden"]["prob"][0])
    out = {}
    # Restoring the last layer's output at the last token gives the clean run's metrics.
    den = cell(entry, "denoising", "hidden", T - 1, L - 1)
    out["denoise_last_token_last_layer_vs_clean"] = max_diff(den, entry["clean"])
    out["denoise_last_token_last_layer_vs_clean_same_batch_shape"] = max_diff(den, same_shape["clean"])
    # Noising the last layer at the last token gives the corrupted run's metrics.
    noi = cell(entry, "noising", "hidden", T - 1, L - 1)
    out["noise_last_token_last_layer_vs_corrupted"] = max_diff(noi, entry["corrupted"])
    out["noise_last_token_last_layer_vs_corrupted_same_batch_shape"] = max_diff(noi, same_shape["corrupted"])
    if b > 0:
        equal = all(torch.equal(clean[n][0, :b].expand_as(corrupted[n][:, :b]), corrupted[n][:, :b]) for n in names)
        out["states_before_subject_bitwise_equal"] = equal
        worst_den = worst_noi = 0.0
        for t in range(b):
            for kind in KINDS:
                for l in range(L):
                    worst_den = max(worst_den, max_diff(cell(entry, "denoising", kind, t, l), entry["corrupted"]))
                    worst_noi = max(worst_noi, max_diff(cell(entry, "noising", kind, t, l), entry["clean"]))
        out["pre_subject_denoising_vs_corrupted"] = worst_den
        out["pre_subject_noising_vs_clean"] = worst_noi
        worst_den = worst_noi = 0.0
        for t in range(b):
            for kind in KINDS:
                for l in range(L):
                    worst_den = max(worst_den, max_diff(cell(entry, "denoising", kind, t, l), same_shape["corrupted"]))
                    worst_noi = max(worst_noi, max_diff(cell(entry, "noising", kind, t, l), same_shape["clean"]))
        out["pre_subject_denoising_vs_corrupted_same_batch_shape"] = worst_den
        out["pre_subject_noising_vs_clean_same_batch_shape"] = worst_noi
    log("    checks: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def count_donors(tokenizer, knowns):
    cache = {}
    count = 0
    for i, k in enumerate(knowns):
        if find_donor(tokenizer, knowns, i, first_token(tokenizer, " " + k["attribute"]), cache) is not None:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, required=True)
    parser.add_argument("--knowns", type=Path, required=True)
    parser.add_argument("--facts", type=int, nargs="*", default=FACTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begun = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - begun:7.1f} s] {msg}", flush=True)

    folder, name = str(args.smollm2.parent), args.smollm2.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    knowns = json.loads(args.knowns.read_text())
    log(f"facts with a donor (answer = first token of ' ' + attribute): {count_donors(tokenizer, knowns)} of {len(knowns)}")

    facts, all_checks = [], {}
    for known_id in args.facts:
        index = next(i for i, k in enumerate(knowns) if k["known_id"] == known_id)
        log(f"known_id {known_id}: {knowns[index]['prompt']!r} -> {knowns[index]['attribute']!r}")
        started = time.perf_counter()
        record, checks = trace_fact(model, tokenizer, knowns, index, log)
        log(f"  traced in {time.perf_counter() - started:.0f} s")
        facts.append(record)
        all_checks[known_id] = checks

    if ROME_TRACES.exists():
        rome = json.loads(ROME_TRACES.read_text())
        for f in facts:
            r = next((r for r in rome["facts"] if r["known_id"] == f["known_id"]), None)
            if r is None:
                continue
            for kind in KINDS:
                theirs = numpy.array(r["scores"][kind])
                ours = numpy.array(f["corruptions"]["noise"]["denoising"][kind]["prob"])
                log(f"known_id {f['known_id']}: noise/denoising/{kind}/prob vs rome_traces.json: max |diff| "
                    f"{numpy.abs(ours - theirs).max():.3g}")
            log(f"  corrupted prob {f['corruptions']['noise']['corrupted']['prob']!r} vs ROME low_score {r['low_score']!r}; "
                f"clean prob {f['corruptions']['noise']['clean']['prob']!r} vs high_score {r['high_score']!r}")

    fixture = {
        "model": args.smollm2.name,
        "noise_level": NOISE_LEVEL,
        "samples": SAMPLES,
        "window": WINDOW,
        "metric_dtype": "float64",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "facts": round7(facts),
    }
    args.out.write_text(json.dumps(fixture) + "\n")
    log(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.perf_counter() - begun:.0f} s")


if __name__ == "__main__":
    main()
