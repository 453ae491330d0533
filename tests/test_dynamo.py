"""torch.compile(model, backend=fxforge): equal to eager, attention fused inside the
compiled subgraphs, graph breaks and subgraphs fxforge cannot take handled."""
import math
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge.dynamo
from fxforge.dynamo import FxforgeBackend

import zoo
from helpers import assert_close_to_eager

MODELS = {
    "llama_sdpa": lambda: zoo.llama("sdpa"),
    "llama_eager": lambda: zoo.llama("eager"),
    "gpt2_sdpa": lambda: zoo.gpt2("sdpa"),
    "gpt2_eager": lambda: zoo.gpt2("eager"),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled frames of one test must not serve the next
    yield
    torch._dynamo.reset()


class CausalSelfAttention(nn.Module):
    """Hand-written attention: scores, causal mask from the sequence length, softmax."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = F.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, c))


def attention_ops(fx: FxforgeBackend) -> int:
    return sum(node.op == "attention" for model in fx.models for node in model.graph.nodes)


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_equals_eager_with_attention_fused(name):
    model, vocab = MODELS[name]()
    fx = FxforgeBackend()
    compiled = torch.compile(model, backend=fx)
    with torch.no_grad():
        for t in (5, 11):  # the second length makes dynamo recompile with a dynamic size
            ids = torch.randint(0, vocab, (1, t))
            assert_close_to_eager(model(ids), compiled(ids))
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    assert fx.compiled and attention_ops(fx) >= 1
    # the dynamic recompile serves every length from one fxforge graph
    assert any("T" in map(str, m.graph.inputs[0].shape) for m in fx.models)


def test_hand_written_attention_and_passing_the_function():
    model = CausalSelfAttention().eval()
    fx = FxforgeBackend()
    compiled = torch.compile(model, backend=fx)
    plain = torch.compile(model, backend=fxforge.dynamo.backend)  # the stateless function works too
    with torch.no_grad():
        for t in (4, 9):
            x = torch.randn(2, t, 32)
            ref = model(x)
            assert_close_to_eager(ref, compiled(x))
            assert_close_to_eager(ref, plain(x))
    assert attention_ops(fx) >= 1 and not fx.fallbacks


def test_graph_break_compiles_each_subgraph():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = CausalSelfAttention(), CausalSelfAttention()

        def forward(self, x):
            x = self.first(x)
            torch._dynamo.graph_break()
            return self.second(x)

    model = Broken().eval()
    fx = FxforgeBackend()
    compiled = torch.compile(model, backend=fx)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        assert_close_to_eager(model(x), compiled(x))
    assert len(fx.compiled) == 2 and attention_ops(fx) == 2


def test_a_subgraph_fxforge_cannot_capture_runs_as_pytorch():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            # a higher-order op fxforge's capture does not inline
            return torch.cond(x.sum() > 0, lambda y: self.lin(y), lambda y: -y, (x,))

    model = Branches().eval()
    fx = FxforgeBackend()
    compiled = torch.compile(model, backend=fx)
    x = torch.randn(2, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    assert torch.allclose(out, model(x))
    assert len(fx.fallbacks) == 1 and not fx.compiled
    assert any("fxforge could not compile" in str(w.message) for w in caught)


def test_autograd_falls_back_instead_of_returning_wrong_gradients():
    model = CausalSelfAttention()
    fx = FxforgeBackend()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend=fx)(torch.randn(1, 4, 32))
    out.sum().backward()
    assert model.qkv.weight.grad is not None
    assert "autograd" in fx.fallbacks[0].reason


def test_weights_held_by_the_graph_module_stay_parameters():
    """Older dynamo (inline_inbuilt_nn_modules=False) hands over a GraphModule that holds
    the weights; quantize still finds them as parameters."""
    gm, vocab = zoo.nanogpt_traced()  # a GraphModule with its weights as attributes
    fx = FxforgeBackend(quantize="int8")
    x = torch.randint(0, vocab, (1, 5))
    run = fx(gm, [x])
    with torch.no_grad():
        out = run(x)
    assert_close_to_eager(gm(x), out[0], rel=5e-2)
    ops = [n.op for n in fx.models[0].graph.nodes]
    assert "quant_linear" in ops and "attention" in ops, ops


def test_options_reach_the_pipeline_and_weights_are_not_copied():
    model, vocab = zoo.llama("sdpa")
    fx = FxforgeBackend(disable=["fuse_attention"], cpu_linear=False)
    compiled = torch.compile(model, backend=fx)
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, 6))
        assert_close_to_eager(model(ids), compiled(ids))
    assert attention_ops(fx) == 0
    norm = fx.models[0].graph.params["model.norm.weight"]
    assert norm.data_ptr() == model.model.norm.weight.data_ptr()


def test_the_name_fxforge_through_the_entry_point(tmp_path, monkeypatch):
    """What `pip install` writes for the pyproject entry point, on sys.path: torch finds
    backend="fxforge" by name."""
    from torch._dynamo.backends import registry

    info = tmp_path / "fxforge_entry-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fxforge-entry\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[torch_dynamo_backends]\nfxforge = fxforge.dynamo:fxforge_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(registry._BACKENDS, "fxforge", raising=False)
    monkeypatch.delitem(registry._COMPILER_FNS, "fxforge", raising=False)
    _forget_discovered_backends(registry)
    try:
        assert registry.lookup_backend("fxforge") is fxforge.dynamo.fxforge_backend
        model = CausalSelfAttention().eval()
        x = torch.randn(1, 5, 32)
        with torch.no_grad():
            assert_close_to_eager(model(x), torch.compile(model, backend="fxforge")(x))
    finally:
        _forget_discovered_backends(registry)
        registry._BACKENDS.pop("fxforge", None)
        registry._COMPILER_FNS.pop("fxforge", None)


def _forget_discovered_backends(registry):
    # torch looks entry points up once per process (both functions are functools.cache'd)
    for fn in (registry._lazy_import, registry._discover_entrypoint_backends):
        getattr(fn, "cache_clear", lambda: None)()


def test_register_without_installation():
    from torch._dynamo.backends import registry

    try:
        fxforge.dynamo.register()
        fxforge.dynamo.register()  # twice is harmless
        assert registry.lookup_backend("fxforge") is fxforge.dynamo.backend
    finally:
        registry._BACKENDS.pop("fxforge", None)
        registry._COMPILER_FNS.pop("fxforge", None)


def test_import_fxforge_does_not_import_dynamo():
    import subprocess

    code = "import sys, fxforge; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_options_given_to_torch_compile_reach_optimize():
    """torch.compile(..., backend=fxforge's, options={...}) passes optimize()'s options (it
    raised TypeError: backend() got an unexpected keyword argument 'options')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        plain = torch.compile(model, backend=fxforge.dynamo.backend)(x)
        torch._dynamo.reset()
        quantized = torch.compile(model, backend=fxforge.dynamo.backend, options={"quantize": "int8"})(x)
        want = model(x)
    assert torch.equal(plain, want)
    assert 0 < (quantized - want).abs().max().item() < 0.05  # int8 weights: close, not equal
