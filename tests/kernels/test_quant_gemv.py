"""The split-K decode GEMV (quant_gemv) behind the quantized linears for M <= 16 rows,
against quant_formats' references: every format at 1, 3 and 16 rows, float32 and bfloat16
activations, N tails, K tails (int8, w8a8), K split over several programs, the arrival
counters left at zero, and bitwise-repeatable results.

Runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set before the kernel
modules are imported), or on the GPU with TRITON_INTERPRET=0.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels import quant_gemv as qg  # noqa: E402
from fxforge.codegen.kernels import quant_matmul as qm  # noqa: E402
from kernel_device import kernel_device  # noqa: E402
from fxforge.ir import quant_formats as qf  # noqa: E402

DEVICE = kernel_device(qm.INTERPRET, "quant_gemv")

@pytest.fixture(autouse=True)
def _every_format_on_the_gemv(monkeypatch):
    """On a GPU the wrappers send a format to the GEMV only up to the rows where it measured
    faster (quant_matmul.GEMV_ROWS_ON_GPU); these tests run the kernel for every format."""
    monkeypatch.setattr(qm, "GEMV_ROWS_ON_GPU", None)


REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
FORMAT = {"int8": qg.FMT_INT8, "int4": qg.FMT_INT4, "nf4": qg.FMT_NF4, "w8a8": qg.FMT_W8A8}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _plan(scheme, packed, m, x):
    n, k = packed.shape
    return qm._gemv_plan(FORMAT[scheme], m, n, k, getattr(packed, "group_size", 1), x.reshape(-1, k))


# (scheme, options, N, K): N not a multiple of any BLOCK_N; K a multiple of the group for
# 4-bit, with a tail for int8 / w8a8; K long enough to be split even at 16 rows
CASES = [
    ("int8", {}, 72, 1000),
    ("int4", {"group_size": 32}, 40, 1024),
    ("int4", {"group_size": 128, "zero_point": "float"}, 72, 1024),
    ("nf4", {"group_size": 64}, 40, 1024),
    ("nf4", {"group_size": 32, "double_quant": True}, 72, 1024),
    ("w8a8", {}, 40, 1000),
]


# Rows: 1 (BLOCK_M 1: the tl.sum path), 3 (BLOCK_M 16 with 13 rows masked, no bias) and 16
# (BLOCK_M 16, no row masked, a bias). 16 rows run the same specialization as 3 (the same
# BLOCK_M and DOT_F32, the same masks): what they add (no row masked, the bias over 16 rows)
# depends neither on x's dtype nor on how a format's scales and zeros are stored (a float
# zero point, double quantization), so every case runs float32 and bfloat16 at 1 and 3
# rows, and the first case of each format float32 at 16 too.
def _params():
    firsts = {case[0]: case for case in reversed(CASES)}.values()
    for case in CASES:
        case_id = f"{case[0]}-{'-'.join(map(str, case[1].values()))}"
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 3, 16):
                if m < 16 or (dtype == torch.float32 and case in firsts):
                    yield pytest.param(*case, m, dtype, id=f"{case_id}-{m}-{dtype}")


@pytest.mark.parametrize("scheme,opts,n,k,m,dtype", list(_params()))
def test_decode_gemv_matches_reference(scheme, opts, n, k, m, dtype):
    packed = qf.quantize_weight(_rand(n, k, seed=n + k), scheme, **opts)
    x = _rand(m, k, seed=m)
    if scheme == "w8a8":
        x[0, 3], x[-1, k - 1] = 40.0, -9.0  # outlier columns, one in the K tail
    x = x.to(dtype)
    bias = _rand(n, seed=5).to(dtype) if m != 3 else None
    plan = _plan(scheme, packed, m, x)
    assert plan is not None and plan.split_k > 1, plan  # the GEMV runs, with K split
    assert plan.block_m == (1 if m == 1 else 16)
    y = qm.quant_linear_triton(x, packed, bias)
    ref = qf.quant_linear_reference(x, packed, bias)
    assert y.dtype == dtype and y.shape == ref.shape and torch.isfinite(y).all()
    assert _rel_err(y, ref) <= REL_TOL[dtype]
    # the last slice of every N tile put its counter back to zero: the next call (or a CUDA
    # graph replay) starts clean; and the fixed-order combine repeats bit for bit
    assert int(qg._SCRATCH[y.device]["count"].abs().sum()) == 0  # (keyed by cuda:0, not cuda)
    assert torch.equal(qm.quant_linear_triton(x, packed, bias), y)


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
def test_every_split_of_k_gives_the_reference(split_k, monkeypatch):
    """However K is cut (one slice, uneven slices, slices of one tile each), the partials
    add up to the reference."""
    n, k = 40, 448  # 14 tiles of 32 along K
    packed = qf.quantize_weight(_rand(n, k, seed=3), "int4", group_size=64)
    x = _rand(2, k, seed=4)
    real = qg.gemv_plan

    def forced(*args):
        plan = real(*args)
        iters = -(-(k // plan.block_k) // split_k)
        return qg.GemvPlan(plan.block_m, plan.block_n, plan.block_k, plan.num_warps,
                           -(-(k // plan.block_k) // iters), iters * plan.block_k)

    monkeypatch.setattr(qg, "gemv_plan", forced)
    y = qm.quant_linear_triton(x, packed)
    assert _rel_err(y, qf.quant_linear_reference(x, packed)) <= REL_TOL[torch.float32]


def test_shapes_the_gemv_declines_run_on_the_gemm():
    # more than 16 rows, or a 4-bit group too small for a K tile
    assert qg.gemv_plan(qg.FMT_INT8, 17, 64, 256, 1, False, 132) is None
    assert qg.gemv_plan(qg.FMT_INT4, 1, 64, 256, 8, False, 132) is None
    assert qg.gemv_plan(qg.FMT_INT4, 3, 64, 256, 16, False, 132) is None
    plan = qg.gemv_plan(qg.FMT_INT4, 1, 64, 256, 16, False, 132)
    assert plan is not None and plan.block_k == 16


def test_split_fills_the_gpu_and_bounds_the_partials():
    """On a 132-SM GPU a decode-sized weight is cut into a few programs per SM; at 16 rows
    the partials' round trip stays well below the weight's bytes."""
    if qg.INTERPRET:
        pytest.skip("the GPU block tables apply only to compiled kernels")
    for fmt, k in ((qg.FMT_INT8, 2048), (qg.FMT_NF4, 2048), (qg.FMT_W8A8, 5632)):
        plan = qg.gemv_plan(fmt, 1, 2048, k, 64, False, 132)
        programs = -(-2048 // plan.block_n) * plan.split_k
        assert programs >= 2 * 132
        plan16 = qg.gemv_plan(fmt, 16, 2048, k, 64, False, 132)
        assert plan16.split_k * 16 * 8 <= k


def test_on_a_gpu_each_format_takes_the_gemv_only_where_it_measured_faster(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(qm, "GEMV_ROWS_ON_GPU", {qg.FMT_INT8: 0, qg.FMT_INT4: 16, qg.FMT_NF4: 16, qg.FMT_W8A8: 1})
    gpu_x = SimpleNamespace(is_cuda=True, dtype=torch.float16, device=torch.device("cpu"))
    taken = {(f, m): qm._gemv_plan(f, m, 5632, 2048, 64, gpu_x) is not None
             for f in (qg.FMT_INT8, qg.FMT_INT4, qg.FMT_NF4, qg.FMT_W8A8) for m in (1, 16)}
    assert taken == {(qg.FMT_INT8, 1): False, (qg.FMT_INT8, 16): False, (qg.FMT_INT4, 1): True,
                     (qg.FMT_INT4, 16): True, (qg.FMT_NF4, 1): True, (qg.FMT_NF4, 16): True,
                     (qg.FMT_W8A8, 1): True, (qg.FMT_W8A8, 16): False}
    cpu_x = SimpleNamespace(is_cuda=False, dtype=torch.float16, device=torch.device("cpu"))
    assert qm._gemv_plan(qg.FMT_INT8, 16, 5632, 2048, 1, cpu_x) is not None  # the interpreter: every format
