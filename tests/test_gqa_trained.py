"""gqa on a GPT-2 trained here (slow; runs in CI): a byte-level GPT2LMHeadModel with 12
heads, trained briefly on CPU from random init (tests/trained_gpt2.py; trained inside the
test on a fresh machine, then cached), so that its perplexity on the fixed text means
something, unlike a random GPT-2's. 12 -> 6 and 12 -> 3 KV heads: "aligned" beats "mean"
in perplexity on held-out text."""
import os

import pytest

import fxforge
from fxforge.evaluate import perplexity
from fxforge.passes.gqa import GQAConfig
from trained_gpt2 import TEST_SPEC, bigram_perplexity, trained_byte_gpt2

pytestmark = pytest.mark.slow

TEXT = os.path.join(os.path.dirname(__file__), "data", "eval_text.txt")
CALIBRATION_BYTES = 2048  # the start of the text; the rest is scored, never these


@pytest.fixture(scope="module")
def trained():
    model, encode = trained_byte_gpt2(TEST_SPEC)
    ids = encode(open(TEXT).read())
    window = TEST_SPEC.n_positions  # score in windows the model was trained on
    calib = ids[:, :CALIBRATION_BYTES].reshape(-1, window)
    return model, ids, calib, ids[:, CALIBRATION_BYTES:], window


def test_trained_gpt2_learned(trained):
    model, ids, _, held_out, window = trained
    ppl = perplexity(fxforge.optimize(model, (ids[:, :8],)), held_out, window=window)
    # measured: 11.69 per byte (training seeds 1, 2: 11.06, 11.63); uniform is 256, and a
    # table of byte pairs counted on the same training text gets 12.33: the model learned
    # more than which byte follows which
    assert ppl < bigram_perplexity(held_out), ppl


# Perplexity per byte measured on TEST_SPEC, mean / aligned (aligned / mean), for its seed
# 0 and, to see how much the margin moves with the weights, seeds 1 and 2:
#   seed  unconverted  12 -> 6                     12 -> 3
#   0     11.69        12.47 / 11.69 (0.938)       13.46 / 11.70 (0.869)
#   1     11.06        12.25 / 11.09 (0.905)       12.55 / 11.10 (0.885)
#   2     11.63        12.73 / 11.63 (0.914)       13.78 / 11.63 (0.844)
# The bounds below leave ~3% and ~6% over the worst of these. (The benchmark's longer-
# trained model widens the gap: 11.49 / 8.46 and 15.43 / 8.58, unconverted 8.42.)
@pytest.mark.parametrize("kv_heads, ratio", [(6, 0.97), (3, 0.95)])
def test_trained_gpt2_aligned_beats_mean(trained, kv_heads, ratio):
    model, ids, calib, held_out, window = trained
    ppl = {}
    for method in ("mean", "aligned"):
        fast = fxforge.optimize(model, (ids[:, :8],), gqa=GQAConfig(kv_heads, method, calibration=calib))
        layers = next(s for s in fast.stats if s.name == "gqa").details["gqa"]["layers"]
        assert [layer["kv_heads"] for layer in layers] == [(12, kv_heads)] * TEST_SPEC.n_layer
        ppl[method] = perplexity(fast, held_out, window=window)
    assert ppl["aligned"] < ratio * ppl["mean"], ppl
