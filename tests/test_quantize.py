"""The quantize pass: which layers it takes (by what the graph computes, not module class),
what it skips and why, the bytes it saves, and outputs close to the float model."""
import pytest
import torch

import fxforge
from fxforge.passes.quantize import QuantConfig

import zoo

# max |quantized - float| / max |float| on the random test models
TOLERANCE = {"int8": 0.03, "w8a8": 0.04, "int4": 0.3, "nf4": 0.3}


def quant_stats(fast):
    return next(s for s in fast.stats if s.name == "quantize")


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantized_model_stays_close(scheme, family):
    model, vocab = zoo.llama("sdpa", hidden=128) if family == "llama" else zoo.gpt2("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=scheme)
    stats = quant_stats(fast)
    rule = "linear" if family == "llama" else "matmul_param"  # GPT-2's Conv1D is addmm(W[in, out])
    assert stats.rules[rule] >= 2
    assert fast.graph.count("quant_linear") == sum(stats.rules.values())
    for b, t in [(1, 1), (3, 9)]:
        ids = torch.randint(0, vocab, (b, t))
        with torch.no_grad():
            ref = model(ids).logits
        err = ((fast(ids).logits - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE[scheme], err


def test_report_gives_bytes_and_skip_reasons():
    model, vocab = zoo.llama("sdpa", hidden=128)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int8")
    details = quant_stats(fast).details["quantize"]
    assert details["bytes_after"] / details["bytes_before"] <= 0.26
    names = [n for n, *_ in details["layers"]]
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names
    assert ("lm_head.weight", "excluded by 'lm_head*'") in details["skipped"]
    report = fast.report()
    assert "int8: 14 layers" in report and "skipped lm_head.weight" in report
    fast4 = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int4")
    d4 = quant_stats(fast4).details["quantize"]
    assert d4["bytes_after"] / d4["bytes_before"] <= 0.14


def test_shape_that_does_not_fit_is_skipped_with_reason():
    model, vocab = zoo.gpt2("sdpa")  # n_embd=64: K=64 is not a multiple of group 128
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int4")
    skipped = dict(quant_stats(fast).details["quantize"]["skipped"])
    assert "not divisible by group_size=128" in skipped["transformer.h.0.attn.c_attn.weight"]
    cfg = QuantConfig("int4", group_size=32)
    fast32 = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=cfg)
    assert "transformer.h.0.attn.c_attn.weight" in [n for n, *_ in quant_stats(fast32).details["quantize"]["layers"]]


def test_include_exclude_globs_and_unknown_scheme():
    model, vocab = zoo.llama("sdpa", hidden=128)
    cfg = QuantConfig("int8", include=("*mlp*",))
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=cfg)
    names = [n for n, *_ in quant_stats(fast).details["quantize"]["layers"]]
    assert names and all(".mlp." in n for n in names)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; known schemes: int8, int4, nf4, w8a8"):
        fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int3")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_interpret_backend_runs_the_triton_kernels(scheme):
    model, vocab = zoo.llama("sdpa", hidden=128, n_layer=1)
    ids = torch.randint(0, vocab, (1, 5))
    ref = fxforge.optimize(model, (ids,), quantize=scheme)
    fast = fxforge.optimize(model, (ids,), quantize=scheme, backend="interpret")
    torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
def test_compute_dtype_runs_the_products_in_bfloat16(scheme):
    model, vocab = zoo.llama("sdpa", hidden=128)
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig(scheme, compute_dtype=torch.bfloat16))
    products = [n for n in fast.graph.nodes if n.op == "quant_linear"]
    assert products and all(n.inputs[0].dtype == n.outputs[0].dtype == torch.bfloat16 for n in products)
    # one cast per distinct input: q/k/v share one, gate/up another (2 layers x 4 inputs)
    assert len(products) == 14 and len({n.inputs[0] for n in products}) == 8
    assert "products in bfloat16" in fast.report()
    with torch.no_grad():
        ref = model(ids).logits
    out = fast(ids).logits
    assert out.dtype == torch.float32
    assert ((out - ref).abs().max() / ref.abs().max()).item() < TOLERANCE[scheme] + 0.02
    # the bf16 rounding moves the result a little away from float32 compute, not far
    moved = ((out - fxforge.optimize(model, (ids,), quantize=scheme)(ids).logits).abs().max() / ref.abs().max()).item()
    assert 0 < moved < 0.02


def test_compute_dtype_is_checked():
    with pytest.raises(ValueError, match="compute_dtype must be one of None, torch.float32"):
        QuantConfig("int8", compute_dtype=torch.int8)


def test_interpret_backend_with_bfloat16_compute():
    model, vocab = zoo.llama("sdpa", hidden=128, n_layer=1)
    ids = torch.randint(0, vocab, (1, 5))
    cfg = QuantConfig("int8", compute_dtype=torch.bfloat16)
    ref = fxforge.optimize(model, (ids,), quantize=cfg)
    fast = fxforge.optimize(model, (ids,), quantize=cfg, backend="interpret")
    torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=3e-2, rtol=3e-2)
