"""OptimizedModel.to(dtype) on a KV-cached model computes what a fresh optimize of the model
in that dtype computes, or refuses (runtime/retarget.py). The dense cache's store is a
fused body with a cast to the cache dtype (fuse_elementwise writes kv_append so); it kept
the dtype of the optimize, so after bf16 -> f32 every K/V was still rounded to bf16
(logits ~1e-3 off, no error). A cast the model makes inside a fused body, hidden from the
node's output types, and a cache dtype set at optimize refuse instead."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxforge
import zoo
from fxforge.runtime.retarget import DtypePinnedError

PAIRS = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
         (torch.float32, torch.bfloat16)]
LAYOUTS = {"dense": fxforge.KVCacheConfig(), "paged": fxforge.KVCacheConfig(layout="paged", block_size=4)}
IDS = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))


class _RMSNorm(nn.Module):
    """Llama's RMSNorm without its float32 round trip (which pins the dtype: to() refuses)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = nn.Parameter(norm.weight.detach().clone()), norm.variance_epsilon

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Rotary(nn.Module):
    """Llama's rotary tables in the model's dtype (transformers computes them in float32)."""

    def __init__(self, rotary):
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.clone(), persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[:, :, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _llama_without_casts():
    """A tiny Llama (rotary, GQA) whose code casts to no fixed dtype, so to() may retype it."""
    model, _ = zoo.llama("sdpa", n_layer=1)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__.endswith("RMSNorm"):
                setattr(module, name, _RMSNorm(child))
            elif type(child).__name__.endswith("RotaryEmbedding"):
                setattr(module, name, _Rotary(child))
    return model


def _gpt2():
    model, _ = zoo.gpt2("eager", n_layer=1)
    with torch.no_grad():  # larger weights, so that a rounding left behind shows in the logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3)
    return model


MODELS = {"gpt2": _gpt2, "llama": _llama_without_casts}


@pytest.fixture(scope="module")
def models():
    """Each model built once per module (seeded), by name."""
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            built[name] = MODELS[name]()
        return built[name]

    return get


# every pair and layout on GPT-2 (its dense store was the bug); the Llama, whose casts pin
# more, on the dense layout for the pairs into float32 (a regression guard: it followed)
CASES = [("gpt2", layout, src, dst) for layout in LAYOUTS for src, dst in PAIRS] + \
        [("llama", "dense", src, dst) for src, dst in PAIRS if dst == torch.float32]


def _assert_same_logits(got, expected, dtype):
    assert got.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-6
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name,layout,src,dst", CASES,
                         ids=lambda d: str(d).removeprefix("torch.") if isinstance(d, torch.dtype) else d)
def test_to_dtype_computes_what_a_fresh_optimize_in_that_dtype_does(models, name, layout, src, dst):
    source = copy.deepcopy(models(name)).to(src)
    target = copy.deepcopy(source).to(dst)  # (the same weights: src's rounding, then dst)
    kv = LAYOUTS[layout]
    moved = fxforge.optimize(source, (IDS,), backend="torch", kv_cache=kv).to(dst)
    fresh = fxforge.optimize(target, (IDS,), backend="torch", kv_cache=kv)
    _assert_same_logits(moved(IDS).logits, fresh(IDS).logits, dst)
    assert torch.equal(moved.generate(IDS, 12, do_sample=False), fresh.generate(IDS, 12, do_sample=False))


def test_to_dtype_on_the_interpret_backend():
    torch.manual_seed(0)
    source = _gpt2().to(torch.bfloat16)
    moved = fxforge.optimize(source, (IDS,), backend="interpret", kv_cache=True).to(torch.float32)
    fresh = fxforge.optimize(copy.deepcopy(source).float(), (IDS,), backend="interpret", kv_cache=True)
    _assert_same_logits(moved(IDS).logits, fresh(IDS).logits, torch.float32)
    assert torch.equal(moved.generate(IDS, 12, do_sample=False), fresh.generate(IDS, 12, do_sample=False))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_cache_dtype_set_at_optimize_refuses(layout):
    # KVCacheConfig(dtype=bf16) on a bf16 model leaves no cast to show it; a fresh optimize of
    # the float32 model with it rounds K/V to bf16, to() made the cache float32 and said nothing
    torch.manual_seed(0)
    source = _gpt2().to(torch.bfloat16)
    kv = dataclasses.replace(LAYOUTS[layout], dtype=torch.bfloat16)
    fast = fxforge.optimize(source, (IDS,), backend="torch", kv_cache=kv)
    expected = fast(IDS).logits
    with pytest.raises(DtypePinnedError, match=r"(?s)KV cache's dtype was set to torch.bfloat16 at optimize.*"
                                               r"KVCacheConfig\(dtype=torch.bfloat16\) at optimize"):
        fast.to(torch.float32)
    assert fast.dtype == torch.bfloat16 and torch.equal(fast(IDS).logits, expected)


class _RoundsInside(nn.Module):
    """A bf16 round trip the model's code makes (`.to(x.dtype)`, which follows the model's
    dtype) whose result only feeds a comparison: the fused node's output types do not show it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return torch.where((x.float() * 3).to(x.dtype) > 0.3, x, -x) * self.w


def test_a_cast_hidden_in_a_fused_body_refuses():
    # 3 * 0.09997 is below 0.3 in float32 but rounds above it in bfloat16: to(float32) kept the
    # bf16 cast inside the kernel and flipped the sign of every element, without an error
    x = torch.full((2, 8), 0.09997)
    fast = fxforge.optimize(_RoundsInside().to(torch.bfloat16), (x.to(torch.bfloat16),), backend="torch")
    assert any(n.op == "fused_pointwise" for n in fast.graph.nodes)
    with pytest.raises(DtypePinnedError, match=r"(?s)fix their float dtype.*fused_pointwise.*\"cast\".*bf16"):
        fast.to(torch.float32)
