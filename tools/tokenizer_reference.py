#!/usr/bin/env python3
"""Writes transformers' token ids for Gemma 3 270M, the reference the engine's tokenizer test
(worker/tests/engine/tokenizers.rs) compares against.

Run by hand (not in CI), from the repository root, in an environment with transformers,
tokenizers and gguf from PyPI (tools/golden-requirements.txt); it needs no network:

    python tools/tokenizer_reference.py --gguf "$(scripts/fetch-gemma3.sh)" \\
        --knowns ../shared/data/known_1000.json

The tokenizer is `AutoTokenizer.from_pretrained(folder, gguf_file=name)`: transformers builds
it from the GGUF file's metadata, as the engine does. It writes, under tests/fixtures/gemma3/:

- known_1000_ids.json: `{known_id: ids}` of every prompt of known_1000.json, special tokens
  included (`<bos>` first, since the file sets tokenizer.ggml.add_bos_token);
- answer_ids.json: `{known_id: ids}` of " " + attribute without special tokens, whose first
  id is the answer token the tracer scores.

It also prints ROME's `find_token_range` (tools/rome_reference.py, same rule: decode each
token alone, join, find the subject) on the prompts the engine's find_token_range test checks,
so the ranges written in that test can be regenerated.
"""

import argparse
import json
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gemma3"

# The known_ids whose subject ranges the engine's test pins (a subject at the start, one in
# the middle, one after punctuation, non-ASCII letters).
RANGE_IDS = [0, 3, 200, 253, 474, 1190]


def compact(data: dict) -> str:
    return json.dumps(data, separators=(",", ":")) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--knowns", type=Path, required=True, help="known_1000.json")
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rome_reference import find_token_range

    tokenizer = AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
    knowns = json.loads(args.knowns.read_text())
    prompts = {str(k["known_id"]): tokenizer(k["prompt"]).input_ids for k in knowns}
    answers = {
        str(k["known_id"]): tokenizer(" " + k["attribute"], add_special_tokens=False).input_ids
        for k in knowns
    }
    assert all(ids[0] == tokenizer.bos_token_id for ids in prompts.values()), "BOS first"

    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / "known_1000_ids.json").write_text(compact(prompts))
    (FIXTURES / "answer_ids.json").write_text(compact(answers))
    print(f"transformers {transformers.__version__}: {len(prompts)} prompts and answers -> {FIXTURES}")

    by_id = {k["known_id"]: k for k in knowns}
    for known_id in RANGE_IDS:
        fact = by_id[known_id]
        ids = prompts[str(known_id)]
        b, e = find_token_range(tokenizer, ids, fact["subject"])
        pieces = [tokenizer.decode([t]) for t in ids]
        print(f"{known_id}: {fact['subject']!r} in {fact['prompt']!r} -> ({b}, {e}) {pieces[b:e]}")


if __name__ == "__main__":
    main()
