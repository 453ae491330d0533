"""The CPU torch backend's int4 products: PyTorch's packed int4 kernel reads a repacked copy
of each int4 weight, and the values stay those of the IR's dequantize-then-matmul."""
import pytest
import torch

import fxforge
from fxforge.ir.ops import OPS
from fxforge.ir.quant_formats import quant_linear_reference, quantize_weight
from fxforge.passes.quantize import QuantConfig
from fxforge.runtime import cpu_int4
from fxforge.runtime.cpu_int4 import int4pack_available, int4pack_linear, prepare_int4
from fxforge.runtime.program import build_program

import zoo

needs_int4pack = pytest.mark.skipif(not int4pack_available(), reason="this torch build has no int4 CPU kernel")


@needs_int4pack
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("zero_point", ["int", "float"])
@pytest.mark.parametrize("x_shape", [(1, 256), (5, 256), (2, 3, 256), (256,)])
def test_kernel_equals_the_reference_in_float32(group_size, zero_point, x_shape):
    gen = torch.Generator().manual_seed(group_size)
    w = torch.randn(48, 256, generator=gen) * 0.05 + 0.01  # an offset, so zero points matter
    packed = quantize_weight(w, "int4", group_size=group_size, zero_point=zero_point)
    x, bias = torch.randn(x_shape, generator=gen), torch.randn(48, generator=gen)
    weight = prepare_int4(packed, torch.float32)
    for b in (None, bias):
        torch.testing.assert_close(int4pack_linear(x, weight, b), quant_linear_reference(x, packed, b),
                                   rtol=1e-5, atol=1e-5)


@needs_int4pack
@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_kernel_in_half_precision_is_within_rounding(dtype, ulp):
    gen = torch.Generator().manual_seed(0)
    packed = quantize_weight(torch.randn(64, 512, generator=gen) * 0.05, "int4", group_size=64)
    x = torch.randn(3, 512, generator=gen).to(dtype)
    bias = torch.randn(64, generator=gen).to(dtype)
    y = int4pack_linear(x, prepare_int4(packed, dtype), bias)
    ref = quant_linear_reference(x.float(), packed, bias.float())  # float32 products of the same inputs
    assert y.dtype == dtype and y.shape == (3, 64)
    # the scale table and the output are rounded to `dtype`: a few units in the last place
    assert (y.float() - ref).abs().max() <= 4 * ulp * ref.abs().max()


def _reference_program(graph):
    return build_program(graph, {name: op.reference for name, op in OPS.items()}, device=torch.device("cpu"))


@needs_int4pack
@pytest.mark.parametrize("config", [QuantConfig("int4", group_size=32), QuantConfig("int4", group_size=32,
                                                                                    zero_point="float")])
def test_model_uses_the_kernel_and_matches_the_reference(config):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), quantize=config)
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_int4")
    quantized = sum(n.op == "quant_linear" for n in fast.graph.nodes)
    assert stats.rules["int4pack"] == quantized == 8  # 2 layers x (qkv, o, gate_up, down): fuse_linear merged
    assert "int4 weights multiply on PyTorch's packed int4 CPU kernel" in fast.report()
    reference = _reference_program(fast.graph)
    for shape in [(1, 1), (3, 9)]:
        x = torch.randint(0, vocab, shape)
        torch.testing.assert_close(fast(x).logits, reference(x)[0], rtol=1e-5, atol=1e-5)


@needs_int4pack
def test_weights_the_kernel_cannot_take_dequantize_and_say_why():
    ids = torch.randint(0, 128, (1, 5))
    model, vocab = zoo.llama("sdpa", hidden=96, heads=4, kv_heads=1)  # k/v: 24 outputs; q/o: 96; gate/up: 192
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig("int4", group_size=32))
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_int4")
    assert stats.details["cpu_int4"]["skipped"] == {"out_features not a multiple of 16": 4}  # k and v, 2 layers
    assert stats.rules["int4pack"] == 8  # q, o, gate_up (merged: 192 + 192), down; k and v stay apart from q
    torch.testing.assert_close(fast(ids).logits, _reference_program(fast.graph)(ids)[0], rtol=1e-5, atol=1e-5)


def test_no_int4_no_plan_and_a_missing_kernel_falls_back(monkeypatch):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (1, 5))
    fast8 = fxforge.optimize(model, (ids,), quantize="int8")
    assert all(s.name != "cpu_int4" for s in fast8.runtime_stats)
    monkeypatch.setattr(cpu_int4, "int4pack_available", lambda: False)
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig("int4", group_size=32))
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_int4")
    assert not stats.rules and stats.details["cpu_int4"]["skipped"] == {
        "PyTorch's int4 CPU kernel is missing or disagrees": 8}  # 2 layers x (qkv, o, gate_up, down)
    torch.testing.assert_close(fast(ids).logits, _reference_program(fast.graph)(ids)[0], rtol=1e-5, atol=1e-5)


@needs_int4pack
def test_long_inputs_dequantize_once_instead(monkeypatch):
    """The packed kernel costs the same per row at any row count (float32: about 0.7 ms a row
    for a 576x1536 weight), so a prompt goes through dequantize-then-matmul (issue 20)."""
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=QuantConfig("int4", group_size=32))
    calls = []
    kernel = cpu_int4.int4pack_linear
    monkeypatch.setattr(cpu_int4, "int4pack_linear", lambda x, *a: calls.append(x.shape) or kernel(x, *a))
    reference = _reference_program(fast.graph)
    for shape, on_kernel in [((1, 1), True), ((1, 4), True), ((1, 5), False), ((3, 9), False)]:
        calls.clear()
        x = torch.randint(0, vocab, shape)
        torch.testing.assert_close(fast(x).logits, reference(x)[0], rtol=1e-5, atol=1e-5)
        assert bool(calls) == on_kernel, (shape, calls)
    assert cpu_int4.DEQUANTIZE_ABOVE_ROWS[torch.float32] == 4
