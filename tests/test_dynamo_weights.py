"""torch.compile(model, backend=fxforge) with the weights dynamo passes as graph inputs: one
dynamo graph serves two instances of a class, every layer of a loop with a graph break,
a replaced Parameter, an in-place edit. Each call must compute with its own weights, as
eager does, never with the weights the first call compiled."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxforge.dynamo import FxforgeBackend
from helpers import compile_count

from helpers import assert_close_to_eager


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled frames of one test must not serve the next
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """Separate q/k/v projections (fxforge concatenates them: a weight the passes rewrite),
    attention, and an MLP."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, t, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(x)))


def block(seed: int) -> Block:
    torch.manual_seed(seed)
    return Block().eval()


def test_two_instances_of_one_class_each_use_their_own_weights():
    first, second = block(0), block(1)
    fx = FxforgeBackend()
    fast_first, fast_second = torch.compile(first, backend=fx), torch.compile(second, backend=fx)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for _ in range(2):  # alternating: each call finds its own compiled model again
            assert_close_to_eager(first(x), fast_first(x))
            assert_close_to_eager(second(x), fast_second(x))
    assert len(fx.compiled) == 2 and not fx.fallbacks, fx.fallbacks


def test_a_graph_break_inside_a_layer_loop_runs_each_layer_with_its_weights():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(block(seed) for seed in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
                torch._dynamo.graph_break()  # dynamo reuses the layer's graph for each layer
            return x

    model = Stack().eval()
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    with torch.no_grad():
        for t in (4, 4, 6):
            x = torch.randn(1, t, 16)
            assert_close_to_eager(model(x), fast(x))
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    # each layer got compiled models of its own weights (the new length makes dynamo trace
    # the layer again, with a dynamic size: a second subgraph, compiled for each layer too)
    assert len({c.weights.key for c in fx.compiled}) == 3


def test_a_replaced_parameter_reaches_the_output(monkeypatch):
    model = block(0)
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_close_to_eager(model(x), fast(x))
        old_q, old_down = model.q.weight, model.down.weight
        model.q.weight = nn.Parameter(torch.randn(16, 16))  # a fused (rewritten) weight
        assert_close_to_eager(model(x), fast(x))
        model.down.weight = nn.Parameter(torch.randn(16, 32))  # one the model shares as is
        assert_close_to_eager(model(x), fast(x))
        compiles = compile_count(monkeypatch)
        model.q.weight, model.down.weight = old_q, old_down  # weights seen before: no new compile
        assert_close_to_eager(model(x), fast(x))
    assert compiles[0] == 0
    assert len(fx.compiled) == 3 and not fx.fallbacks


def test_an_in_place_edit_reaches_the_output(monkeypatch):
    model = block(0)
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_close_to_eager(model(x), fast(x))
        compiles = compile_count(monkeypatch)
        model.k.weight.mul_(2)  # fused with q and v into one weight by fxforge
        assert_close_to_eager(model(x), fast(x))
        model.up.bias.add_(1)
        assert_close_to_eager(model(x), fast(x))
        model.v.weight.data = torch.randn(16, 16)  # new storage, no version bump
        assert_close_to_eager(model(x), fast(x))
        assert_close_to_eager(model(x), fast(x))  # unchanged since: the rebuilt model serves it
    assert compiles[0] == 3
    assert len(fx.compiled) == 1 and not fx.fallbacks  # each rebuild took its stale model's place


class Cached(nn.Module):
    """A buffer the forward writes in place (as a KV cache): the compiled model holds and
    writes that very tensor."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("cache", torch.zeros(2, 16, 8))

    def forward(self, x, pos):
        self.cache[:, pos] = self.proj(x)
        return self.cache.sum(1)


def test_state_written_by_the_model_is_no_reason_to_recompile(monkeypatch):
    """Two instances with a cache each, called in turn: each writes its own cache, and the
    model's own writes (or resetting the cache in place) compile nothing new."""
    models = [Cached(0).eval(), Cached(1).eval()]
    eager = [Cached(0).eval(), Cached(1).eval()]
    fx = FxforgeBackend()
    fast = [torch.compile(m, backend=fx) for m in models]
    with torch.no_grad():
        for step in range(4):
            x, pos = torch.randn(2, 1, 8), torch.tensor([step])
            for m, e, f in zip(models, eager, fast):
                assert_close_to_eager(e(x, pos), f(x, pos))
                assert torch.equal(m.cache, e.cache)
            if step == 1:
                compiles = compile_count(monkeypatch)
            if step == 2:
                for m in (*models, *eager):
                    m.cache.zero_()
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    assert compiles[0] == 0


def test_more_weight_sets_than_the_limit_run_as_pytorch():
    models = [block(seed) for seed in range(3)]
    fx = FxforgeBackend(max_weight_sets=2)
    x = torch.randn(1, 4, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for m in models:
                assert_close_to_eager(m(x), torch.compile(m, backend=fx)(x))
    assert len(fx.compiled) == 2 and len(fx.fallbacks) == 1
    assert "max_weight_sets" in fx.fallbacks[0].reason
    assert sum("fxforge could not compile" in str(w.message) for w in caught) == 1


class _Headed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 64)

    def forward(self, x):
        return self.lm_head(torch.relu(self.a(x)))


_GLOBAL_MODEL = None


def test_quantize_patterns_name_a_global_models_weights_by_its_own_names():
    # a function calling a global model reaches its weights as _GLOBAL_MODEL.lm_head.weight:
    # the default lm_head* and the user's a.* excluded nothing, and both layers were quantized
    import fxforge
    global _GLOBAL_MODEL
    torch.manual_seed(0)
    _GLOBAL_MODEL = _Headed().eval()
    fx = FxforgeBackend(quantize=fxforge.QuantConfig("int8", exclude=("a.*", "lm_head*")))
    step = torch.compile(lambda x: _GLOBAL_MODEL(x), backend=fx)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(step(x), _GLOBAL_MODEL(x), rtol=1e-5, atol=1e-6)
    report = fx.models[0].report()
    assert "_GLOBAL_MODEL.lm_head.weight: excluded by '_GLOBAL_MODEL.lm_head*'" in report
    assert "_GLOBAL_MODEL.a.weight: excluded by '_GLOBAL_MODEL.a.*'" in report
    assert "quant_linear" not in report.split("final ops:")[1]


class _Holder:
    model = None


_HOLDER = _Holder()


def test_quantize_patterns_reach_a_model_held_by_an_object():
    import fxforge
    torch.manual_seed(0)
    _HOLDER.model = _Headed().eval()
    fx = FxforgeBackend(quantize=fxforge.QuantConfig("int8", exclude=("a.*", "lm_head*")))
    step = torch.compile(lambda x: _HOLDER.model(x), backend=fx)
    with torch.no_grad():
        step(torch.randn(2, 64))
    report = fx.models[0].report()
    assert "quant_linear" not in report.split("final ops:")[1], report


class _CallsAGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)

    def forward(self, x):
        return _GLOBAL_HELPER(self.a(x))


_GLOBAL_HELPER = None


def test_a_compiled_modules_patterns_do_not_widen_into_a_global_it_calls():
    # include=("a.*",) names the compiled module's own a; the global helper's a was quantized too
    import fxforge
    global _GLOBAL_HELPER
    torch.manual_seed(0)
    _GLOBAL_HELPER = _Headed().eval()
    model = _CallsAGlobal().eval()
    fx = FxforgeBackend(quantize=fxforge.QuantConfig("int8", include=("a.*",)))
    compiled = torch.compile(model, backend=fx)
    with torch.no_grad():
        compiled(torch.randn(2, 64))
    report = fx.models[0].report()
    assert "quant_linear=1" in report.split("final ops:")[1], report
    assert "skipped _GLOBAL_HELPER.a.weight: not in include" in report, report
