"""Row kernels for long rows (codegen/row_loop.py): past pointwise.ROW_BLOCK_MAX a fused row
group loops over chunks of the row instead of holding it in one block. Run through Triton's
interpreter against the torch backend, on rows longer than one block."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.pointwise import ROW_BLOCK_MAX, PointwiseKernels, row_block, row_is_looped  # noqa: E402
from fxforge.ir import parse, typecheck  # noqa: E402
from fxforge.passes.fuse_elementwise import fuse_elementwise  # noqa: E402
from fxforge.passes.manager import PassContext  # noqa: E402
from fxforge.runtime.backends import op_table  # noqa: E402
from fxforge.runtime.program import build_program  # noqa: E402
from helpers import KERNEL_BACKEND, KERNEL_DEVICE  # noqa: E402

LONG = [ROW_BLOCK_MAX + 904, 16384]  # a partial last chunk, and the 16k rows of a vocabulary-size softmax


def _fused_and_compared(g, *xs, tol=1e-5):
    fused = fuse_elementwise(g, PassContext())
    typecheck(fused)
    kernels = PointwiseKernels()
    got = build_program(fused, op_table(KERNEL_BACKEND, kernels=kernels, device=KERNEL_DEVICE))(*xs)
    ref = build_program(g, op_table("torch"))(*xs)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=tol, rtol=tol)
    return kernels


def test_long_rows_loop_in_chunks():
    assert not row_is_looped(ROW_BLOCK_MAX) and row_block(ROW_BLOCK_MAX) == ROW_BLOCK_MAX
    assert row_is_looped(ROW_BLOCK_MAX + 1) and row_block(65536) < ROW_BLOCK_MAX


@pytest.mark.parametrize("n", LONG)
def test_softmax_layer_norm_rms_norm_and_reductions_on_long_rows(n):
    g = parse(f"""graph(%x: f32[B, {n}], %w: f32[{n}], %b: f32[{n}]) {{
  %1: f32[] = const() {{value=0.5, dtype=f32}}
  %2: f32[B, {n}] = mul(%x, %1)
  %3: f32[B, {n}] = softmax(%2) {{dim=1, dtype=none}}
  %4: f32[B, {n}] = layer_norm(%x, %w, %b) {{shape=({n},), eps=1e-05, weight=true, bias=true}}
  %5: f32[B, {n}] = add(%3, %4)
  %6: f32[B, 1] = amax(%5) {{dims=(1,), keepdim=true}}
  %7: f32[B, {n}] = sub(%5, %6)
  %8: f32[B, {n}] = rms_norm(%7, %w) {{shape=({n},), eps=none, weight=true}}
  return (%8, %6)
}}""")
    kernels = _fused_and_compared(g, torch.randn(3, n), torch.randn(n), torch.randn(n))
    (source,) = kernels.sources.values()
    assert "for start in range(0, N, BLOCK_N)" in source


@pytest.mark.parametrize("op", ["sum", "mean", "amin"])
def test_scalar_reductions_and_the_residual_leave_a_looped_kernel(op):
    n = 16384
    g = parse(f"""graph(%x: f32[B, {n}], %y: f32[B, {n}]) {{
  %1: f32[B, {n}] = add(%x, %y)
  %2: f32[B, 1] = {op}(%1) {{dims=(1,), keepdim=true{", dtype=none" if op != "amin" else ""}}}
  %3: f32[B, {n}] = sub(%1, %2)
  return (%3, %1, %2)
}}""")
    _fused_and_compared(g, torch.randn(2, n), torch.randn(2, n), tol=1e-4)
