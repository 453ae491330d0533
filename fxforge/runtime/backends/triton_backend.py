"""The triton backend: our Triton kernels (FlashAttention, split-context decode attention,
quantized matmuls, generated pointwise and row kernels); the default on CUDA.

`interpret=True` runs the same kernels through Triton's interpreter on CPU tensors, for
tests. Triton decides at the import of a kernel module whether its kernels are
interpreted, so this is the one place that sets TRITON_INTERPRET, before the first import.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from ...ir.graph import Graph
from .base import Backend

# Modules whose @triton.jit decorators decide at import whether they are interpreted.
KERNEL_MODULES = ("fxforge.codegen.kernels.attention", "fxforge.codegen.kernels.decode_attention",
                  "fxforge.codegen.kernels.quant_matmul")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonBackend(Backend):
    name = "triton"
    inlines_fused_pointwise = False

    def __init__(self, device, interpret: bool = False, **options):
        options.pop("cpu_linear", None)  # a torch-backend setting; nothing to plan here
        super().__init__(device, **options)
        self.interpret = interpret
        if interpret:
            self.name = "interpret"
        if not triton_available():
            raise RuntimeError(f"backend {self.name!r} needs the triton package: pip install triton")
        if not interpret and self.device.type != "cuda":
            raise ValueError(f"backend 'triton' runs on CUDA tensors but the model is on {self.device}; use "
                             "backend='torch' on CPU, or backend='interpret' to test the kernels on CPU")
        if interpret:
            _ensure_interpreter()
        from ...codegen.pointwise import PointwiseKernels

        self.pointwise = PointwiseKernels()

    def kernel_ops(self) -> dict:
        from ..torch_kernels import quant_linear_with

        return {"attention": attention_dispatch, "quant_linear": quant_linear_with(_quant_linear_triton),
                "fused_pointwise": self.pointwise.run}

    def kernel_sources(self) -> dict[str, str]:
        return self.pointwise.sources

    def prepare(self, graph: Graph) -> tuple[Graph, dict, list]:
        return graph, {}, []


def _ensure_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    loaded = [m for m in KERNEL_MODULES if m in sys.modules]
    if loaded:
        raise RuntimeError(f"backend 'interpret' needs TRITON_INTERPRET=1 before fxforge's kernels are imported, "
                           f"but {loaded[0]} is already loaded in compiled mode (a backend='triton' model ran in "
                           "this process); set TRITON_INTERPRET=1 in the environment before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"


def attention_dispatch(q, k, v, bias=None, *, causal: bool, scale: float):
    """One query per sequence (decoding) goes to the split-context kernel, which keeps the
    GPU busy with a single query; everything else to the FlashAttention kernel."""
    from ...codegen.kernels import attention, decode_attention

    if q.shape[2] == 1:
        return decode_attention.decode_attention_triton(q, k, v, bias, causal=causal, scale=scale)
    return attention.attention_triton(q, k, v, bias, causal=causal, scale=scale)


def _quant_linear_triton(x, packed, bias):
    from ...codegen.kernels import quant_matmul

    return quant_matmul.quant_linear_triton(x, packed, bias)
