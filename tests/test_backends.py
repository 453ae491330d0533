"""The Backend interface (runtime/backends/): the CPU path never imports triton, the
interpret backend works after a CPU optimize in the same process, and a backend defined
outside the package runs a model."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxforge
from fxforge.runtime.backends import (Backend, TorchBackend, register_backend, resolve_backend,
                                      unregister_backend)

import zoo
from helpers import assert_close_to_eager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small model with attention, a norm and quantizable linears, written by hand: importing
# transformers' Llama imports triton itself, which is not ours to avoid.
TINY_MODEL = """
import torch, torch.nn.functional as F
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 64)
        self.qkv = torch.nn.Linear(64, 192)
        self.out = torch.nn.Linear(64, 64)
        self.norm = torch.nn.LayerNorm(64)
    def forward(self, ids):
        x = self.norm(self.emb(ids))
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 16).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 64))
"""


def _run_python(*parts: str) -> str:
    code = "\n".join(textwrap.dedent(p) for p in parts)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_cpu_optimize_works_without_triton():
    """As on macOS or Windows, where pyproject does not install triton: it cannot be imported."""
    out = _run_python("""
        import sys, importlib.abc
        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton is not installed here")
        sys.meta_path.insert(0, NoTriton())
        import torch, fxforge
    """, TINY_MODEL, """
        torch.manual_seed(0)
        model, ids = Tiny().eval(), torch.randint(0, 64, (2, 9))
        for options in ({}, {"quantize": "int8"}, {"quantize": "int4"}):
            fast = fxforge.optimize(model, (ids,), **options)
            err = (fast(ids) - model(ids)).abs().max().item()
            assert err < (1e-4 if not options else 0.5), (options, err)
        assert "triton" not in sys.modules
        print("ok", fast.backend.name)
    """)
    assert out.split() == ["ok", "torch"]


def test_interpret_backend_after_a_cpu_optimize_in_one_process():
    """With TRITON_INTERPRET=1 from the start, a CPU optimize loads none of our kernel
    modules and the interpret backend runs them afterwards."""
    out = _run_python("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import sys, torch, fxforge
    """, TINY_MODEL, """
        torch.manual_seed(0)
        model, ids = Tiny().eval(), torch.randint(0, 64, (2, 9))
        cpu = fxforge.optimize(model, (ids,), quantize="int8")
        # (torch.export imports triton itself when it is installed; our kernels stay unloaded)
        assert not [m for m in sys.modules if m.startswith("fxforge.codegen.kernels.")]
        interp = fxforge.optimize(model, (ids,), quantize="int8", backend="interpret")
        assert (cpu(ids) - interp(ids)).abs().max().item() < 1e-4
        print("ok", interp.backend.name, "fxforge.codegen.kernels.quant_matmul" in sys.modules)
    """)
    assert out.split() == ["ok", "interpret", "True"]


class CountingBackend(Backend):
    """A backend from outside the package: the torch backend's ops, counting linears."""

    name = "counting"

    def __init__(self, device, **options):
        super().__init__(device, **options)
        self.torch = TorchBackend(device, cpu_linear=False)
        self.linear_calls = 0
        self.buffers = 0

    def kernel_ops(self):
        ops = self.torch.kernel_ops()
        reference_linear = torch.nn.functional.linear

        def linear(x, w, b=None):
            self.linear_calls += 1
            return reference_linear(x, w, b)

        return {**ops, "linear": linear}

    def new_buffer(self, shape, dtype):
        self.buffers += 1
        return super().new_buffer(shape, dtype)


@pytest.fixture
def counting_backend():
    register_backend("counting", CountingBackend)
    yield
    unregister_backend("counting")


def test_a_backend_defined_outside_runs_a_model(counting_backend):
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), backend="counting", kv_cache=True)
    assert isinstance(fast.backend, CountingBackend)
    assert "backend=counting" in fast.report()
    with torch.no_grad():
        assert_close_to_eager(model(ids), fast(ids))
    assert fast.backend.linear_calls > 0
    out = fast.generate(ids[:1], 5, eos_token_id=None)
    assert out.shape == (1, 12)
    assert fast.backend.buffers == len(fast.graph.state_values)  # one cache, by the backend, reused by generate
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_backend("counting", CountingBackend)


def test_backend_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose one of: auto, torch, triton, interpret"):
        resolve_backend("nope", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(TypeError, match="takes no option"):
        Backend(torch.device("cpu"), colour="blue")
    with pytest.raises(ValueError, match="built in"):
        unregister_backend("torch")
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"


def test_interpret_too_late_is_a_clear_error():
    """Without the variable at start, torch.export imports triton in compiled mode, and
    triton cannot switch afterwards: a clear error, not a crash inside the interpreter."""
    out = _run_python("""
        import sys, torch, fxforge
    """, TINY_MODEL, """
        model, ids = Tiny().eval(), torch.randint(0, 64, (2, 9))
        fxforge.optimize(model, (ids,))
        try:
            fxforge.optimize(model, (ids,), backend="interpret")
        except RuntimeError as e:
            print("refused:", e)
    """)
    assert "refused: backend 'interpret' needs TRITON_INTERPRET=1 before triton is imported" in out


def test_the_torch_backends_rmsnorm_squares_as_eager_does():
    """A pow by a constant runs as the model ran it, pow(Tensor, Scalar) (x * x for a
    square), not pow by a 0-dim tensor: the general kernel rounds some squares differently
    (and is several times slower on the CPU), so the norm's output would not be eager's."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(576))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    torch.manual_seed(0)
    model, x = Norm().eval(), torch.randn(3, 7, 576)
    assert not torch.equal(torch.pow(x, torch.tensor(2)), x.pow(2))  # the two kernels differ on x
    fast = fxforge.optimize(model, (x,), backend="torch")
    import re

    assert re.search(r"op_pow\(\w+, 2\)", fast.program.source), fast.program.source
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
