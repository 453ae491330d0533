"""The CPU torch backend's choice of path for each quantized product, per call shape
(runtime/cpu_quant.py), its cheaper dequantization (runtime/cpu_dequant.py) and the opt-in
cache of dequantized weights: values stay those of the IR's dequantize-then-matmul."""
import pytest
import torch

import fxforge
from fxforge.ir.ops import OPS
from fxforge.ir.quant_formats import dequantize_weight, quantize_weight
from fxforge.passes.quantize import QuantConfig
from fxforge.runtime import cpu_dequant, cpu_int4, cpu_quant
from fxforge.runtime.backends.torch_backend import TorchBackend
from fxforge.runtime.cpu_dequant import DequantizedWeights, dequantized_cache_bytes
from fxforge.runtime.cpu_quant import AMX_BF16_ABOVE_ROWS, NEVER, dequantize_above_rows
from fxforge.runtime.program import build_program

import zoo
from helpers import benchmark_table


def _reference_program(graph):
    return build_program(graph, {name: op.reference for name, op in OPS.items()}, device=torch.device("cpu"))


def _stats(fast):
    return next(s for s in fast.runtime_stats if s.name == "cpu_quant")


def test_the_row_rule_per_scheme_dtype_and_cpu():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert dequantize_above_rows("int4", f32, amx=True) == cpu_int4.DEQUANTIZE_ABOVE_ROWS[f32] == 4
    assert dequantize_above_rows("int4", bf16, amx=True) == AMX_BF16_ABOVE_ROWS
    assert dequantize_above_rows("int4", bf16, amx=False) == cpu_int4.DEQUANTIZE_ABOVE_ROWS[bf16]
    assert dequantize_above_rows("int4", f32, amx=True, on_int4_kernel=False) == 0  # no kernel: always
    assert dequantize_above_rows("int8", f32, amx=False) == dequantize_above_rows("int8", f16, amx=True) == 2
    assert dequantize_above_rows("int8", bf16, amx=True) == AMX_BF16_ABOVE_ROWS
    assert dequantize_above_rows("int8", bf16, amx=False) == NEVER  # _weight_int8pack_mm at any row count
    assert dequantize_above_rows("nf4", f32, amx=True) == 0


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_each_shape_takes_its_path_and_matches_the_reference(scheme, monkeypatch):
    # the paths without AMX (with it, int8 takes the digits: tests/test_cpu_int8_digits.py)
    monkeypatch.setattr(cpu_quant, "amx_available", lambda: False)
    model, vocab = zoo.llama("sdpa")
    config = QuantConfig(scheme, group_size=32) if scheme != "int8" else QuantConfig("int8")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=config)
    stats = _stats(fast)
    # 2 layers x (qkv, o, gate_up, down): fuse_linear merges the quantized siblings
    products = 8
    assert sum(stats.rules.values()) == products == fast.graph.count("quant_linear")
    assert f"{scheme} products (float32 activations)" in fast.report()
    dequantized = []
    real = cpu_quant.dequantize_for_matmul
    monkeypatch.setattr(cpu_quant, "dequantize_for_matmul", lambda p, d: dequantized.append(d) or real(p, d))
    reference = _reference_program(fast.graph)
    above = {"int8": 2, "int4": 4, "nf4": 0}[scheme]
    for shape in [(1, 1), (1, 2), (1, 4), (1, 5), (3, 9)]:
        dequantized.clear()
        x = torch.randint(0, vocab, shape)
        torch.testing.assert_close(fast(x).logits, reference(x)[0], rtol=1e-5, atol=1e-5)
        rows = shape[0] * shape[1]
        assert len(dequantized) == (products if rows > above else 0), (shape, len(dequantized))
        assert set(dequantized) <= {torch.float32}


def test_bfloat16_products_run_one_bfloat16_gemm_on_long_inputs(monkeypatch):
    monkeypatch.setattr(cpu_quant, "amx_available", lambda: True)
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 5)),),
                            quantize=QuantConfig("int4", group_size=32, compute_dtype=torch.bfloat16))
    assert f"PyTorch's packed int4 kernel up to {AMX_BF16_ABOVE_ROWS} rows, dequantize + one bfloat16 GEMM" \
        in fast.report()
    dequantized = []
    real = cpu_quant.dequantize_for_matmul
    monkeypatch.setattr(cpu_quant, "dequantize_for_matmul", lambda p, d: dequantized.append(d) or real(p, d))
    reference = _reference_program(fast.graph)
    x = torch.randint(0, vocab, (1, AMX_BF16_ABOVE_ROWS + 1))
    # bfloat16 products: the reference computes each in float32 from bfloat16 inputs; a
    # bfloat16 GEMM rounds its weights to bfloat16 too
    torch.testing.assert_close(fast(x).logits, reference(x)[0], rtol=0.05, atol=0.05)
    assert dequantized and set(dequantized) == {torch.bfloat16}


@pytest.mark.parametrize("value", [-1, "a lot", True, float("nan")])
def test_keep_dequantized_mb_is_checked(value):
    with pytest.raises(ValueError, match="keep_dequantized_mb"):
        TorchBackend("cpu", keep_dequantized_mb=value)


def test_keep_dequantized_mb_reads_as_bytes():
    assert dequantized_cache_bytes(None) == dequantized_cache_bytes(0) == 0
    assert dequantized_cache_bytes(1.5) == 3 * 2**19


def test_kept_weights_skip_dequantizing_and_keep_the_values(monkeypatch):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (1, 9))
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig("int4", group_size=32),
                            backend=TorchBackend("cpu", keep_dequantized_mb=64))
    assert "keep_dequantized_mb: up to 64 MiB" in fast.report()
    reference = _reference_program(fast.graph)
    torch.testing.assert_close(fast(ids).logits, reference(ids)[0], rtol=1e-5, atol=1e-5)
    made = []
    real = cpu_dequant.dequantize_for_matmul
    monkeypatch.setattr(cpu_dequant, "dequantize_for_matmul", lambda p, d: made.append(d) or real(p, d))
    for shape in [(1, 1), (2, 9)]:  # kept: a float32 GEMM at any row count, nothing dequantized again
        x = torch.randint(0, vocab, shape)
        torch.testing.assert_close(fast(x).logits, reference(x)[0], rtol=1e-5, atol=1e-5)
    assert not made


def test_the_cache_keeps_the_first_weights_that_fit():
    weights = [quantize_weight(torch.randn(16, 64), "int8") for _ in range(3)]
    cache = DequantizedWeights(budget_bytes=2 * 16 * 64 * 4)  # room for two float32 weights
    for _ in range(2):  # a forward visits them in the same order every time
        for p in weights:
            assert torch.equal(cache.weight(p, torch.float32), dequantize_weight(p))
    assert len(cache) == 2 and cache.misses == 1
    assert cache.get(weights[0].qweight, torch.float32) is not None
    assert cache.get(weights[2].qweight, torch.float32) is None


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_direct_int4_calls_are_the_paths_choice(compute_dtype):
    """int4_direct (the per-call choice made once, for decode) sends a call to the packed
    kernel exactly where path() would, and none with the opt-in kept cache."""
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (1, 5)),),
                            quantize=QuantConfig("int4", group_size=32, compute_dtype=compute_dtype))
    int4_plan, _ = cpu_int4.plan_cpu_int4(fast.graph)
    if not int4_plan.weights:
        pytest.skip("PyTorch's int4 CPU kernel is missing here")
    plan, _ = cpu_quant.plan_cpu_quant(fast.graph, int4_plan)
    assert plan.int4_direct.keys() == int4_plan.weights.keys()
    for qweight, dtype, above, _ in plan.int4_direct.values():
        assert dtype == (compute_dtype or torch.float32)
        assert all(plan.path(qweight, dtype, rows) == "int4pack" for rows in (1, above))
        assert plan.path(qweight, dtype, above + 1) != "int4pack"
    assert not cpu_quant.plan_cpu_quant(fast.graph, int4_plan, keep_bytes=2**20)[0].int4_direct


def test_the_dequantization_benchmark_runs():
    """benchmarks/dequantize.py (the per-weight table in docs/benchmarks.md), on a small
    weight: a row per scheme, the int4 table lookup it replaced timed (and checked equal)
    beside dequantize_weight."""
    rows = benchmark_table("dequantize.py", "--shapes", "32x128", "--schemes", "int4/g64,nf4/g64", "--table",
                           "--rows", "4", "--repeat", "2")
    assert [row[:2] for row in rows] == [["32x128", "int4/g64"], ["32x128", "nf4/g64"]], rows
    assert float(rows[0][3]) > 0 and rows[1][3] == "-"  # the table lookup is int4's alone
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows), rows
