"""Backends: which implementation runs each IR op.

  torch      plain-torch reference implementations (fast library calls where they exist,
             e.g. SDPA for attention); the default on CPU.
  triton     our Triton kernels on CUDA; the default when the model is on a GPU.
  interpret  the same Triton kernels through Triton's interpreter (TRITON_INTERPRET=1) on
             CPU tensors: slow, for tests.

Every op without a kernel of its own falls back to its torch reference, so any graph
runs on any backend.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ..ir.ops import OPS

BACKENDS = ("torch", "triton", "interpret")
# Modules whose @triton.jit decorators decide at import whether they are interpreted.
KERNEL_MODULES = ("fxforge.codegen.kernels.attention", "fxforge.codegen.kernels.decode_attention",
                  "fxforge.codegen.kernels.quant_matmul")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if name in ("triton", "interpret") and not triton_available():
        raise RuntimeError(f"backend {name!r} needs the triton package: pip install triton")
    if name == "triton" and device.type != "cuda":
        raise ValueError(f"backend 'triton' runs on CUDA tensors but the model is on {device}; "
                         "use backend='torch' on CPU, or backend='interpret' to test the kernels on CPU")
    if name == "interpret":
        ensure_interpreter()
    return name


def ensure_interpreter():
    """Triton picks interpreted or compiled mode when a kernel module is imported, so the
    variable must be set before the first import of any of ours."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    loaded = [m for m in KERNEL_MODULES if m in sys.modules]
    if loaded:
        raise RuntimeError(f"backend 'interpret' needs TRITON_INTERPRET=1 before fxforge's kernels are imported, "
                           f"but {loaded[0]} is already loaded in compiled mode; set TRITON_INTERPRET=1 in the "
                           "environment before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"


def op_table(backend: str, registry=None, kernels=None) -> dict:
    """IR op name -> callable(*tensors, **attrs) for `backend`. `kernels` (a
    codegen.pointwise.PointwiseKernels) holds the generated kernels of the Triton backends."""
    registry = OPS if registry is None else registry
    table = {name: op.reference for name, op in registry.items()}
    table.update(_kernel_overrides(backend))
    if backend != "torch" and kernels is not None:
        table["fused_pointwise"] = kernels.run
    return table


def _kernel_overrides(backend: str) -> dict:
    from .torch_kernels import attention_sdpa

    out = {"attention": attention_sdpa, "quant_linear": _quant_linear(backend)}
    if backend != "torch":
        out["attention"] = attention_dispatch
    return out


def attention_dispatch(q, k, v, bias=None, *, causal: bool, scale: float):
    """One query per sequence (decoding) goes to the split-context kernel, which keeps the
    GPU busy with a single query; everything else to the FlashAttention kernel."""
    from ..codegen.kernels import attention, decode_attention

    if q.shape[2] == 1:
        return decode_attention.decode_attention_triton(q, k, v, bias, causal=causal, scale=scale)
    return attention.attention_triton(q, k, v, bias, causal=causal, scale=scale)


def _quant_linear(backend: str):
    from ..codegen.kernels import quant_matmul
    from ..ir.ops import _packed

    impl = quant_matmul.quant_linear_torch if backend == "torch" else quant_matmul.quant_linear_triton

    def quant_linear(x, *tensors, parts, qattrs, bias):
        packed = _packed(parts, qattrs, tensors[:len(parts)])
        return impl(x, packed, tensors[len(parts)] if bias else None)

    return quant_linear
