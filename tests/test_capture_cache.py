"""fxforge.CaptureCache: optimizing one model several ways captures it once, and every
optimize() from a kept capture builds what a fresh capture builds."""
import pytest
import torch

import fxforge
import zoo
from fxforge.ir.printer import print_graph


@pytest.fixture(scope="module")
def llama():
    model, vocab = zoo.llama("sdpa")
    return model, torch.randint(0, vocab, (2, 7))


def test_a_kept_capture_builds_what_a_fresh_one_builds(llama):
    model, ids = llama
    cache = fxforge.CaptureCache()
    variants = [{}, {"kv_cache": True}, {"quantize": "int8"}, {}]
    with torch.no_grad():
        for options in variants:
            cached = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False, **options)
            fresh = fxforge.optimize(model, (ids,), verbose=False, **options)
            # passes rewrote the earlier copies in place: the kept capture is untouched
            assert print_graph(cached.graph) == print_graph(fresh.graph)
            assert torch.equal(zoo.logits_of(cached(ids)), zoo.logits_of(fresh(ids)))
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 1)


def test_other_inputs_or_another_model_capture_again(llama):
    model, ids = llama
    cache = fxforge.CaptureCache()
    fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
    fxforge.optimize(model, (ids[:1],), capture_cache=cache, verbose=False)  # another shape
    fxforge.optimize(model, (ids.int(),), capture_cache=cache, verbose=False)  # another dtype
    fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False, dynamic=False)
    other, _ = zoo.llama("sdpa")
    fxforge.optimize(other, (ids,), capture_cache=cache, verbose=False)
    assert (cache.hits, cache.misses) == (0, 5)
    cache.clear()
    assert len(cache) == 0


def test_weights_are_read_at_optimize_time_not_capture_time(llama):
    """The kept capture holds the model's own weight tensors, and optimize() copies them as it
    always does: an edit between two optimize() calls reaches the second, not the first."""
    model, ids = llama
    cache = fxforge.CaptureCache()
    with torch.no_grad():
        before = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
        old = zoo.logits_of(before(ids))
        weight = model.lm_head.weight
        saved = weight.clone()
        try:
            weight.mul_(2)
            after = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
            assert torch.allclose(zoo.logits_of(after(ids)), zoo.logits_of(model(ids)), atol=1e-5, rtol=1e-4)
            assert torch.equal(zoo.logits_of(before(ids)), old)
        finally:
            weight.copy_(saved)
    assert cache.hits == 1


def test_a_wrong_cache_object_is_a_clear_error(llama):
    model, ids = llama
    with pytest.raises(TypeError, match="capture_cache should be a fxforge.CaptureCache, got dict"):
        fxforge.optimize(model, (ids,), capture_cache={})
