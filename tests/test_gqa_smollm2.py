"""gqa on SmolLM2-135M real weights (slow; runs in CI): 3 -> 1 KV heads, "aligned" beats
"mean" in perplexity on held-out text, and the cached model still generates."""
import os


import fxforge
from fxforge.evaluate import perplexity
from fxforge.passes.gqa import GQAConfig

import zoo

pytestmark = zoo.smollm2_marks()

TEXT = os.path.join(os.path.dirname(__file__), "data", "eval_text.txt")


def test_smollm2_aligned_beats_mean(smollm2_captures):
    model, tok = zoo.smollm2()
    ids = tok(open(TEXT).read(), return_tensors="pt").input_ids
    calib, held_out = ids[:, :256], ids[:, 256:768]
    ppl = {}
    for method in ("mean", "aligned"):
        fast = fxforge.optimize(model, (ids[:, :8],), gqa=GQAConfig(1, method, calibration=calib), kv_cache=True,
                                capture_cache=smollm2_captures)
        assert fast.kv_layout.bytes_per_token == 30 * 2 * 1 * 64 * 4  # 3 -> 1 KV heads: a third of the cache
        ppl[method] = perplexity(fast, held_out)
        out = fast.generate(tok("The capital of France is", return_tensors="pt").input_ids, 8)
        assert out.shape[1] > 6
    assert ppl["aligned"] < ppl["mean"] / 10, ppl  # measured with 512 calibration tokens: ~136 vs ~12661
