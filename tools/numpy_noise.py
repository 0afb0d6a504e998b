#!/usr/bin/env python3
"""Writes tests/fixtures/numpy_noise.json: numbers numpy's legacy RandomState(1) draws, for the
test that the tracing noise is ROME's bit for bit (ROME re-seeds RandomState(1) before every
run and draws randn(S, e - b, d), or uniform(-1, 1, (S, e - b, d)) for uniform noise).

Run by hand with numpy installed: python tools/numpy_noise.py
Floats are written with repr(), which round-trips doubles exactly.
"""

import json
from pathlib import Path

import numpy

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "numpy_noise.json"
PICK = [0, 1, 2, 3, 575, 576, 1151, 4031, 20000, 40319]


def main() -> None:
    shape = (10, 7, 576)  # S = 10 samples, a 7-token subject, SmolLM2's width
    fixture = {"numpy": numpy.__version__, "shape": list(shape), "pick": PICK}
    fixture["random_sample"] = numpy.random.RandomState(1).random_sample(6).tolist()
    fixture["randn_small"] = numpy.random.RandomState(1).randn(3, 2, 5).ravel().tolist()
    big = numpy.random.RandomState(1).randn(*shape).ravel()
    fixture["randn_pick"] = [float(big[i]) for i in PICK]
    fixture["randn_sum"] = float(big.sum())
    fixture["uniform_small"] = numpy.random.RandomState(1).uniform(-1, 1, (3, 2, 5)).ravel().tolist()
    big = numpy.random.RandomState(1).uniform(-1, 1, shape).ravel()
    fixture["uniform_pick"] = [float(big[i]) for i in PICK]
    # An odd count leaves a cached Gaussian behind; the next draw must use it.
    rs = numpy.random.RandomState(1)
    rs.randn(3)
    fixture["randn_after_odd"] = rs.randn(4).tolist()
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
