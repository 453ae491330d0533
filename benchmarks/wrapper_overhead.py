"""Host time of fxforge's launch wrapper for a generated pointwise kernel, with the kernel
launch itself stubbed out: what fxforge adds per call before Triton's own launch path
(on a GPU decode step, ~200 such calls per token). Runs anywhere, no GPU needed.

    python benchmarks/wrapper_overhead.py [--calls 5000]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # nothing is launched; keeps triton importable without a GPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fxforge.codegen.pointwise import PointwiseKernels  # noqa: E402
from fxforge.ir import parse  # noqa: E402
from fxforge.passes.fuse_elementwise import fuse_elementwise  # noqa: E402
from fxforge.passes.manager import PassContext  # noqa: E402
from report import finish  # noqa: E402

GRAPH = """graph(%x: f32[B, T, 576], %y: f32[B, T, 576], %w: f32[576]) {
  %1: f32[B, T, 576] = add(%x, %y)
  %2: f32[B, T, 576] = silu(%1)
  %3: f32[B, T, 576] = mul(%2, %w)
  return (%3)
}"""


class _NoLaunch:
    """Stands in for a compiled kernel: `fn[grid](...)` does nothing."""
    __name__ = "stub"
    arg_names = [f"a{i}" for i in range(64)]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    node = next(n for n in fuse_elementwise(parse(GRAPH), PassContext()).nodes if n.op == "fused_pointwise")
    kernels = PointwiseKernels()
    kernels.kernel = lambda *a, **k: _NoLaunch()
    xs = [torch.randn(1, 1, 576), torch.randn(1, 1, 576), torch.randn(576)]
    body, outputs = node.attrs["body"], node.attrs["outputs"]
    for _ in range(100):
        kernels.run(*xs, body=body, outputs=outputs)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        kernels.run(*xs, body=body, outputs=outputs)
    us = (time.perf_counter() - t0) / args.calls * 1e6
    print(f"fused pointwise wrapper, decode-step shapes [1, 1, 576]: {us:.1f} us per call (launch stubbed)")
    finish([{"wrapper_us_per_call": us}], None)


if __name__ == "__main__":
    main()
