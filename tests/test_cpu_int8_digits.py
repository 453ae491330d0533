"""int8 weight-only products through three exact int8 digits of x (runtime/cpu_int8_digits.py)
and the CPU path choice that sends float32 int8 products there (runtime/cpu_quant.py):
the split's error bound, the products' accuracy against float64 beside the float32 GEMM's
own, the int32 limit, and a quantized model whose logits stay those of the dequantize path."""
import pytest
import torch

import fxforge
from fxforge.ir.ops import OPS
from fxforge.ir.quant_formats import dequantize_weight, quantize_weight
from fxforge.passes.quantize import QuantConfig
from fxforge.runtime import cpu_int8_digits as digits
from fxforge.runtime import cpu_quant
from fxforge.runtime.cpu_quant import DIGITS_ABOVE_ROWS, DIGITS_MIN_OUT_FEATURES, NEVER, digits_above_rows
from fxforge.runtime.program import build_program

import zoo

needs_digits = pytest.mark.skipif(not digits.digits_available(),
                                  reason="oneDNN's quantized linear is missing or not exact on this CPU")


def _mixed_rows(k: int, gen) -> torch.Tensor:
    """Rows of very different magnitudes: plain, large, small, zero, one outlier, constant."""
    x = torch.randn(6, k, generator=gen)
    x[1] *= 1e4
    x[2] *= 1e-20
    x[3] = 0
    x[4, k // 3] = 300.0
    x[5] = -0.75
    return x


def test_the_split_reconstructs_x_within_its_bound():
    x = _mixed_rows(96, torch.Generator().manual_seed(0))
    c = digits.row_factor(x)
    d = digits.split_digits(x, c)
    assert d.dtype == torch.uint8 and d.shape == (3, 6, 96)
    v = digits.digit_value(d)
    assert (v.abs() < 2**22).all()
    err = (x.double() - v / c.double()).abs()
    # |e| <= 3/4 / c_m: 1.8e-7 of the row's largest element
    assert (err <= 0.75 / c.double()).all()
    amax = x.double().abs().amax(1, keepdim=True)
    assert (err <= 1.9e-7 * amax).all()
    assert (d[:, 3] == torch.tensor([0, 0, digits.TOP_ZERO_POINT], dtype=torch.uint8)[:, None]).all()  # zero row: V = 0
    assert torch.equal(v[5], torch.full((96,), -float(digits.SPAN), dtype=torch.float64))  # constant row: exact


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e-38])
def test_rows_the_split_does_not_take(bad):
    x = torch.randn(3, 32)
    x[1] = bad if bad == 1e-38 else x[1]
    x[1, 5] = bad
    assert digits.row_factor(x) is None


def _errors(x, q, s, y):
    """Per row: max |y - ref| / max |ref|, ref in float64."""
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    scale = ref.abs().amax(1).clamp_min(1e-300)
    return (y.double() - ref).abs().amax(1) / scale


@needs_digits
# 5 + m rows: up to FEW_ROWS one torch._int_mm, above oneDNN's three products
@pytest.mark.parametrize("m, k, n", [(1, 64, 48), (6, 320, 40), (33, 576, 24), (2, 99, 520), (20, 99, 24)])
def test_products_are_as_accurate_as_the_float32_gemm(m, k, n):
    gen = torch.Generator().manual_seed(m * k)
    packed = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "int8")
    x = torch.cat([_mixed_rows(k, gen), torch.randn(m, k, generator=gen)])
    x = x[torch.arange(len(x)) != 3]  # zero rows: checked alone below (ref 0)
    w = dequantize_weight(packed)
    y = digits.digit_linear(x, digits.prepack(packed.qweight, packed.scale))
    ours = _errors(x, packed.qweight, packed.scale, y)
    float32 = _errors(x, packed.qweight, packed.scale, x @ w.t())
    # each row within a small factor of what float32 itself gets (its rounding of x alone:
    # 6e-8), whatever the row's magnitude
    assert (ours <= 4 * float32 + 3e-7).all(), (ours.max().item(), float32.max().item())
    zero = digits.digit_linear(torch.zeros(2, k), digits.prepack(packed.qweight, packed.scale))
    assert torch.equal(zero, torch.zeros(2, n))


@needs_digits
def test_bias_shape_and_dtype():
    packed = quantize_weight(torch.randn(16, 64), "int8")
    weight = digits.prepack(packed.qweight, packed.scale)
    bias = torch.randn(16)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    y = digits.digit_linear(x, weight, bias)
    assert y.dtype == torch.float16 and y.shape == (2, 3, 16)
    ref = (x.float() @ dequantize_weight(packed).t() + bias).half()
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)
    assert digits.digit_linear(torch.full((1, 64), float("nan")), weight) is None


@needs_digits
def test_int32_sums_are_exact_at_the_limit():
    # the largest sums the split can make: every byte 255 against q = 127 over MAX_K terms
    k = digits.MAX_K
    assert k * 255 * 127 < 2**31 <= (k + 1) * 255 * 127
    weight = digits.prepack(torch.full((16, k), 127, dtype=torch.int8), torch.ones(16))
    y = torch.ops.onednn.qlinear_pointwise(torch.full((1, k), 255, dtype=torch.uint8), 1.0, 0, weight.packed,
                                           weight.scale, weight.zero_points, None, 1.0, 0, torch.float32,
                                           "none", [], "")
    # the int32 sum is exact (no wrap to a negative), then rounded once to the float32 output
    assert torch.equal(y, torch.full((1, 16), float(k * 255 * 127), dtype=torch.float32)), y[0, 0].item()
    # the few-row kernel: bytes read as b - 128, 128 Q_n added back (64 Q_n for the top byte)
    top, low = (255 - 128 + 64) * 127 * k, 255 * 127 * k
    y = digits._few_rows(torch.full((3, 1, k), 255, dtype=torch.uint8), weight)
    torch.testing.assert_close(y.double(), torch.full((1, 16), top + low / 2**8 + low / 2**16, dtype=torch.float64),
                               rtol=1e-7, atol=0)
    # longer rows are not split
    x = torch.randn(1, k + 1)
    longer = digits.prepack(torch.ones(2, k + 1, dtype=torch.int8), torch.ones(2))
    assert digits.digit_linear(x, longer) is None
    assert digits_above_rows("int8", torch.float32, amx=True, shape=(576, k + 1)) == NEVER


def test_the_digit_rule():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    shape = (576, 576)
    assert digits_above_rows("int8", f32, amx=True, shape=shape) == DIGITS_ABOVE_ROWS[f32] == 0
    assert digits_above_rows("int8", f16, amx=True, shape=shape) == 0
    assert digits_above_rows("int8", bf16, amx=True, shape=shape) == NEVER  # bfloat16: its own fast paths
    assert digits_above_rows("int8", f32, amx=False, shape=shape) == NEVER  # no exact, fast int8 units
    assert digits_above_rows("int8", f32, amx=True, shape=(192, 576)) == NEVER  # too few outputs to pay the split
    assert DIGITS_MIN_OUT_FEATURES == 512
    for scheme in ("int4", "nf4", "w8a8"):
        assert digits_above_rows(scheme, f32, amx=True, shape=shape) == NEVER


@needs_digits
def test_an_int8_model_takes_the_digits_and_keeps_the_dequantize_paths_logits(monkeypatch):
    monkeypatch.setattr(cpu_quant, "amx_available", lambda: True)
    monkeypatch.setattr(cpu_quant, "DIGITS_MIN_OUT_FEATURES", 1)  # the tiny model's weights have 64-384 outputs
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 7)),), quantize=QuantConfig("int8"))
    report = fast.report()
    assert "8 int8 products (float32 activations): int8 digits" in report and "at every call" in report
    assert "MiB of int8 weights prepacked for oneDNN" in report
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_quant")
    assert {w["long"] for w in stats.details["cpu_quant"]["weights"].values()} == {"int8digits"}
    calls, dequantized = [], []
    real, real_deq = digits.digit_linear, cpu_quant.dequantize_for_matmul
    monkeypatch.setattr(digits, "digit_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_quant, "dequantize_for_matmul", lambda p, d: dequantized.append(d) or real_deq(p, d))
    # the IR's reference: dequantize each weight, float32 matmul
    reference = build_program(fast.graph, {name: op.reference for name, op in OPS.items()},
                              device=torch.device("cpu"))
    for shape in [(1, 1), (1, 3), (2, 9)]:
        calls.clear()
        x = torch.randint(0, vocab, shape)
        torch.testing.assert_close(fast(x).logits, reference(x)[0], rtol=1e-5, atol=1e-5)
        assert len(calls) == 8
    assert not dequantized


@needs_digits
def test_a_row_with_inf_takes_the_float_path():
    packed = quantize_weight(torch.randn(16, 64), "int8")
    plan = cpu_quant.CpuQuantPlan()
    weight = cpu_quant._Weight(packed.qweight, packed, {d: 2 for d in cpu_quant.DTYPES}, {torch.float32: 0},
                               digits.prepack(packed.qweight, packed.scale))
    plan.weights[id(packed.qweight)] = weight
    assert plan.path(packed.qweight, torch.float32, 1) == "int8digits"
    assert plan.path(packed.qweight, torch.float16, 1) == "fallback"  # float16 not given the digits here
    run = plan.wrap(lambda *a, **k: pytest.fail("no fallback expected"))
    x = torch.randn(3, 64)
    x[1, 7] = float("inf")
    y = run(x, packed.qweight, packed.scale, parts=("qweight", "scale"), qattrs=(), bias=False)
    ref = x @ dequantize_weight(packed).t()
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert y[1].isnan().any() or y[1].isinf().any()
