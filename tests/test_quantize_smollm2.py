"""Quantization on SmolLM2-135M real weights (slow; runs in CI): bytes of the quantized
layers and perplexity on the repo's fixed text, against the issue's bounds."""
import os

import pytest
import torch

import fxforge
from fxforge.evaluate import perplexity

import zoo

pytestmark = zoo.smollm2_marks()

TEXT = os.path.join(os.path.dirname(__file__), "data", "eval_text.txt")


@pytest.fixture(scope="module")
def smol():
    model, tok = zoo.smollm2()
    ids = tok(open(TEXT).read(), return_tensors="pt").input_ids
    assert ids.shape[1] >= 2000
    base = perplexity(fxforge.optimize(model, (ids[:, :8],)), ids)
    return model, tok, ids, base


def quantized(model, ids, scheme):
    fast = fxforge.optimize(model, (ids[:, :8],), quantize=scheme)
    details = next(s for s in fast.stats if s.name == "quantize").details["quantize"]
    return fast, details["bytes_after"] / details["bytes_before"]


def test_int8_bytes_and_perplexity(smol):
    model, tok, ids, base = smol
    fast, ratio = quantized(model, ids, "int8")
    assert ratio <= 0.26
    assert perplexity(fast, ids) <= base * 1.01
    # greedy text still reads as the float model's
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    out = prompt
    for _ in range(6):
        out = torch.cat([out, fast(out).logits[:, -1:].argmax(-1)], dim=1)
    assert "Paris" in tok.decode(out[0, prompt.shape[1]:])


def test_int4_g128_bytes_and_perplexity(smol):
    model, _, ids, base = smol
    fast, ratio = quantized(model, ids, "int4")
    # only layers whose in_features divide by 128 are taken (the others are reported as skipped)
    assert ratio <= 0.14
    assert perplexity(fast, ids) <= base * 1.10
