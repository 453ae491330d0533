"""fxforge.CaptureCache never runs a stale program: a kept capture is reused only for the
model as it is now (training flags, parameter dtypes and devices in the key), and a hit
reads the model's current weights by name, not the tensors the first capture saw."""
import pytest
import torch
import torch.nn as nn

import fxforge
import fxforge.api
import zoo


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_a_replaced_parameter_reaches_the_output():
    model = _mlp()
    ex, x = torch.randn(2, 8), torch.randn(3, 8)
    cache = fxforge.CaptureCache()
    with torch.no_grad():
        fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        model[2].weight = nn.Parameter(torch.randn(4, 8))
        model[0].bias = nn.Parameter(torch.randn(8))
        fast = fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        assert _max_diff(fast(x), model(x)) < 1e-6
    assert (cache.hits, cache.misses) == (1, 1)  # same shapes and dtypes: still a hit


def test_in_place_and_data_edits_reach_the_output():
    model = _mlp()
    ex, x = torch.randn(2, 8), torch.randn(3, 8)
    cache = fxforge.CaptureCache()
    with torch.no_grad():
        fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        model[2].weight = nn.Parameter(torch.randn(4, 8))
        first = fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        before = first(x).clone()
        model[2].weight.mul_(3)  # in place, on the parameter that replaced the captured one
        fast = fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        assert _max_diff(fast(x), model(x)) < 1e-6
        model[0].weight.data = torch.randn(8, 8)  # new storage behind the same Parameter
        fast = fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        assert _max_diff(fast(x), model(x)) < 1e-6
        assert torch.equal(first(x), before)  # an earlier optimized model keeps its copy
    assert (cache.hits, cache.misses) == (3, 1)


def test_train_then_eval_captures_again():
    torch.manual_seed(0)
    model, vocab = zoo.gpt2()
    ids, x = torch.randint(1, vocab, (1, 8)), torch.randint(1, vocab, (2, 9))
    cache = fxforge.CaptureCache()
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
    model.eval()
    fast = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
    assert not any("dropout" in line for line in fast.ir.splitlines())
    with torch.no_grad():
        eager = zoo.logits_of(model(x))
        for _ in range(2):
            assert torch.allclose(zoo.logits_of(fast(x)), eager, atol=1e-5, rtol=1e-4)
    assert (cache.hits, cache.misses) == (0, 2)


def test_to_float16_after_a_float32_capture():
    """Token ids do not change with the model's dtype: only the key's parameter dtypes can
    tell the float32 capture from the float16 one."""
    torch.manual_seed(0)
    model, vocab = zoo.gpt2()
    model.eval()
    ids, x = torch.randint(1, vocab, (1, 8)), torch.randint(1, vocab, (2, 9))
    cache = fxforge.CaptureCache()
    fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
    model.to(torch.float16)
    with torch.no_grad():
        fast = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
        out, eager = zoo.logits_of(fast(x)), zoo.logits_of(model(x))
    assert out.dtype == eager.dtype == torch.float16
    assert _max_diff(out, eager) < 5e-2
    assert (cache.hits, cache.misses) == (0, 2)


def test_nothing_changed_still_hits_without_exporting_again(monkeypatch):
    model = _mlp()
    ex, x = torch.randn(2, 8), torch.randn(3, 8)
    cache = fxforge.CaptureCache()
    calls = []
    real = fxforge.api.capture_with_spec
    monkeypatch.setattr(fxforge.api, "capture_with_spec", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        first = fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        second = fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
        assert torch.equal(first(x), second(x))
        assert _max_diff(second(x), model(x)) < 1e-6
    assert len(calls) == 1
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_the_cache_keeps_no_weights_of_the_model():
    """A kept capture holds none of the model's weights (a hit reads them from the model
    by name): a replaced parameter is not kept alive, nor read, by the cache."""
    model = _mlp()
    ex = torch.randn(2, 8)
    cache = fxforge.CaptureCache()
    fxforge.optimize(model, (ex,), capture_cache=cache, verbose=False)
    model_storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    kept = [t for entry in cache._entries.values() for t in entry.graph.params.values()]
    assert not [t for t in kept if t.untyped_storage().data_ptr() in model_storages]


def test_untied_weights_and_tensor_attributes_are_read_as_they_are_now():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight
            self.scale = torch.full((8,), 2.0)  # a plain tensor attribute: a constant of the capture

        def forward(self, ids):
            return self.head(self.emb(ids) * self.scale + torch.tensor([1.0]))

    torch.manual_seed(0)
    model, ids = Tied().eval(), torch.randint(0, 16, (2, 5))
    cache = fxforge.CaptureCache()
    with torch.no_grad():
        fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
        model.head.weight = nn.Parameter(torch.randn(16, 8))  # untied: captured again
        fast = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
        assert _max_diff(fast(ids), model(ids)) < 1e-5
        model.scale = torch.full((8,), 3.0)
        fast = fxforge.optimize(model, (ids,), capture_cache=cache, verbose=False)
        assert _max_diff(fast(ids), model(ids)) < 1e-5
    assert (cache.hits, cache.misses) == (1, 2)
