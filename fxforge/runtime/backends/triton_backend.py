"""The triton backend: our Triton kernels (FlashAttention, split-context decode attention,
quantized matmuls, generated pointwise and row kernels); the default on CUDA.

`interpret=True` runs the same kernels through Triton's interpreter on CPU tensors, for
tests. Triton decides at the import of a kernel module whether its kernels are
interpreted, so this is the one place that sets TRITON_INTERPRET, before the first import.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
import time

from ...ir.graph import Graph
from .base import Backend

# Modules whose @triton.jit decorators decide at import whether they are interpreted.
KERNEL_MODULES = ("fxforge.codegen.kernels.attention", "fxforge.codegen.kernels.decode_attention",
                  "fxforge.codegen.kernels.rope_decode_attention", "fxforge.codegen.kernels.quant_matmul",
                  "fxforge.codegen.kernels.step_inputs", "fxforge.codegen.kernels.paged_kv_write")


# Triton's interpreter keeps the launch it is running in process-wide state (the grid, the
# program ids, the tl functions it patches for the launch), so kernels interpreted by two
# threads at once corrupt each other's launches ('x >= grid_dim[0]', 'Did you forget to add
# @triton.jit'). Every interpreted launch of this module's kernel ops therefore holds one
# process-wide lock (a backend-level one would not do: two models share the interpreter).
# Re-entrant, as linear_fused and rope_attention launch pointwise kernels inside. Compiled
# CUDA launches are independent and never take it.
_INTERPRETER_LOCK = threading.RLock()


def _serialised(fn):
    """`fn` run holding the interpreter's lock."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)
    return op


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
        from ...codegen.kernels.paged_kv_write import paged_kv_write_triton
        from ..torch_kernels import quant_linear_with

        ops = {"attention": attention_dispatch, "paged_attention": paged_attention_dispatch,
               "quant_linear": quant_linear_with(_quant_linear_triton),
               "fused_pointwise": self.pointwise.run, "linear_fused": self.linear_fused,
               "rope_attention": self.rope_attention, "paged_kv_write": paged_kv_write_triton}
        return {name: _serialised(fn) for name, fn in ops.items()} if self.interpret else ops

    def _launching(self):
        """The context of a kernel launch outside kernel_ops: the interpreter's lock."""
        return _INTERPRETER_LOCK if self.interpret else contextlib.nullcontext()

    def rope_attention(self, *tensors, causal: bool, scale: float, start):
        """Few query positions: one kernel applies the rotary, stores the new K/V and attends
        (codegen/kernels/rope_decode_attention.py). Otherwise (a prompt) the op's steps as
        they ran before the fusion: the generated rotary-and-store kernel, then attention."""
        from ...codegen.kernels import rope_decode_attention
        from ...ir.rope_attention import compose, split

        if rope_decode_attention.supports(*split(tensors)):
            return rope_decode_attention.rope_decode_attention_triton(*tensors, causal=causal, scale=scale,
                                                                      start=start)
        return compose(tensors, {"causal": causal, "scale": scale, "start": start}, self.pointwise.run,
                       attention_dispatch, lambda x, s, e: x[..., s:e])

    def linear_fused(self, *tensors, **attrs):
        """A decode GEMV with the prologue and epilogue inside (few rows), else the same
        steps as separate launches: the generated pointwise kernels around a torch matmul
        (cuBLAS), exactly what ran before the fusion, so a prompt is not slower."""
        gemv = self.__dict__.get("_gemv")
        if gemv is None:
            from ...codegen.kernels.decode_gemv import GemvKernels

            gemv = self._gemv = GemvKernels(self.pointwise)
        out = gemv.run(*tensors, **attrs)
        if out is not None:
            return out
        import torch.nn.functional as F

        from ...ir.linear_fused import compose, split_down

        if attrs.get("down"):  # not one MLP kernel: the node without its down projection, then that
            rest, down_weight, down_bias = split_down(tensors, attrs)
            outs = self.linear_fused(*rest, **{**attrs, "down": False, "down_bias": False})
            outs = list(outs) if isinstance(outs, tuple) else [outs]
            return tuple([F.linear(outs[0], down_weight, down_bias)] + outs[1:]) if len(outs) > 1 else \
                F.linear(outs[0], down_weight, down_bias)

        from ..torch_kernels import quant_linear_with

        outs = compose(tensors, attrs, self.pointwise.run, F.linear, lambda y, s, e: y[..., s:e],
                       quant_linear_with(_quant_linear_triton))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def step_inputs(self, pad, start: int, new: int, dtype):
        """Positions and key bias in one launch (codegen/kernels/step_inputs.py)."""
        from ...codegen.kernels import step_inputs as kernel

        if not kernel.supports(pad, dtype):
            return super().step_inputs(pad, start, new, dtype)
        with self._launching():
            return kernel.step_inputs_triton(pad, start, new, start + new, dtype)

    def static_step_inputs(self, length, pad, positions, bias, paged=None):
        """The static step's positions and bias (and a paged step's row starts and slots) in
        one launch, `length` read on the device."""
        from ...codegen.kernels import step_inputs as kernel

        if not kernel.supports(pad, bias.dtype):
            return super().static_step_inputs(length, pad, positions, bias, paged)
        with self._launching():
            kernel.step_inputs_triton(pad, length, 1, bias.shape[-1], bias.dtype, positions=positions, bias=bias,
                                      paged=paged)

    def kernel_sources(self) -> dict[str, str]:
        return self.pointwise.sources

    def prepare(self, graph: Graph) -> tuple[Graph, dict, list]:
        graph, stats = self._float_linears_as_matmuls(graph)
        # a graph with float64 values gets kernel ops that send float64 operands to PyTorch
        # (float64_runs_reference); any other keeps the bare kernels: no check per call
        if not _holds_float64(graph):
            return graph, {}, stats
        return graph, {name: float64_runs_reference(name, fn) for name, fn in self.kernel_ops().items()}, stats

    def _float_linears_as_matmuls(self, graph: Graph) -> tuple[Graph, list]:
        """On a GPU, float linear_fused nodes run as their steps: cuBLAS's matmul and the
        generated pointwise kernels. Their fused GEMV and decode-MLP kernels save launches,
        but a decode step replays as a CUDA graph there, where launches are cheap and those
        kernels are not: on an H200 (2026-11-30, SmolLM2's shapes, bf16) the replayed step
        took 1.49 ms with them against 0.86 ms without, the decode MLP alone 32 us a layer
        (benchmarks/decode_profile.py, docs/benchmarks.md). The interpreter keeps them, so
        the kernels stay tested on the CPU; quantized nodes keep their kernels (their
        unfused form dequantizes per call)."""
        if self.interpret or self.device.type != "cuda":
            return graph, []
        from collections import Counter

        from ...passes.fuse_linear_pointwise import unfuse
        from ...passes.manager import PassStats

        def is_float(node):
            return node.op == "linear_fused" and not node.attrs.get("parts")

        count = sum(map(is_float, graph.nodes))
        if not count:
            return graph, []
        start = time.perf_counter()
        out = unfuse(graph, which=is_float)
        note = (f"{count} float linear_fused nodes run as cuBLAS matmuls and pointwise kernels on this GPU "
                "(faster than the fused GEMVs in a CUDA-graph decode step)")
        return out, [PassStats("prepare_triton", time.perf_counter() - start, len(graph.nodes), len(out.nodes),
                               rules=Counter(linear_fused_unfused=count), notes=[note], details={})]


def _ensure_interpreter():
    """Triton's own library functions (tl.zeros, tl.sum, ...) and our kernels are made
    interpreted or compiled when their modules are imported, so interpreting needs
    TRITON_INTERPRET=1 before triton is imported at all. fxforge imports no kernel module
    on the CPU path, but torch.export imports triton itself (torch._dynamo checks for it),
    so after any capture in a process started without the variable it is too late."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not _triton_compiled_mode():
        return
    loaded = [m for m in KERNEL_MODULES if m in sys.modules] or (["triton"] if _triton_compiled_mode() else [])
    if loaded:
        raise RuntimeError(f"backend 'interpret' needs TRITON_INTERPRET=1 before triton is imported, but {loaded[0]} "
                           "is already loaded in compiled mode (torch.export imports triton when it captures a "
                           "model); set TRITON_INTERPRET=1 in the environment before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"


def _triton_compiled_mode() -> bool:
    """Whether triton is imported with its library functions compiled (not interpreted)."""
    if "triton" not in sys.modules:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.language import standard
    except ImportError:  # pragma: no cover - another layout of triton: cannot tell, assume fine
        return False
    probe = getattr(standard, "sum", None)
    return probe is not None and not isinstance(probe, InterpretedFunction)


def _holds_float64(graph: Graph) -> bool:
    import torch

    from ...ir.types import TensorType

    values = [*graph.inputs, *graph.param_values, *graph.state_values, *(v for n in graph.nodes for v in n.outputs)]
    return any(isinstance(v.type, TensorType) and v.type.dtype == torch.float64 for v in values)


def float64_runs_reference(name: str, kernel):
    """`kernel` for op `name`, except that float64 operands run the op's PyTorch reference.

    Our Triton kernels compute in float32 (tensor-core dots, float32 accumulators and
    math): given a float64 model they would round every value to float32, an error of
    about 1e-7 where eager's is 1e-16, or refuse the dtype. A float64 model on the triton
    backend therefore gets eager's float64 arithmetic for these ops. The first operand
    decides (q, x, the fused group's first input or the cache: each op's operands share
    their float dtype); fused_pointwise also checks its body (`PointwiseKernels`)."""
    import torch

    from ...ir.ops import OPS

    reference = OPS[name].reference

    @functools.wraps(kernel)  # (inspect.unwrap(op) is the kernel)
    def op(*tensors, **attrs):
        if tensors and getattr(tensors[0], "dtype", None) is torch.float64:
            return reference(*tensors, **attrs)
        return kernel(*tensors, **attrs)

    return op


def attention_dispatch(q, k, v, bias=None, slopes=None, sink=None, *, causal: bool, scale: float, softcap=None,
                       window=None, alibi: bool = False, sinks: bool = False):
    """One query per sequence (decoding) goes to the split-context kernel, which keeps the
    GPU busy with a single query; everything else to the FlashAttention kernel. Values of
    another head dim than the queries' (DeepSeek's MLA: 192 for q and k, 128 for v), which
    our kernels do not take, go to PyTorch's SDPA (runtime/torch_kernels.py)."""
    from ...codegen.kernels import attention, decode_attention

    if v.dim() == 4 and q.dim() == 4 and v.shape[-1] != q.shape[-1]:
        from ..torch_kernels import attention_sdpa

        return attention_sdpa(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap, window=window,
                              alibi=alibi, sinks=sinks)
    kernel = decode_attention.decode_attention_triton if q.shape[2] == 1 else attention.attention_triton
    return kernel(q, k, v, bias, slopes, sink, causal=causal, scale=scale, softcap=softcap, window=window,
                  alibi=alibi, sinks=sinks)


def paged_attention_dispatch(q, k_cache, v_cache, block_table, row_start, bias, slopes=None, sink=None, *,
                             causal: bool, scale: float, softcap=None, window=None, alibi: bool = False,
                             sinks: bool = False):
    """paged_attention: the same split between decode and prefill kernels, each reading
    K/V through the block table; caches of two head dims (see attention_dispatch) run the
    op's PyTorch reference."""
    from ...codegen.kernels import attention, decode_attention

    if v_cache.dim() == 4 and q.dim() == 4 and v_cache.shape[-1] != q.shape[-1]:
        from ...ir.ops import paged_attention_reference

        return paged_attention_reference(q, k_cache, v_cache, block_table, row_start, bias, slopes, sink,
                                         causal=causal, scale=scale, softcap=softcap, window=window, alibi=alibi,
                                         sinks=sinks)
    kernel = decode_attention.paged_decode_attention_triton if q.shape[2] == 1 else attention.paged_attention_triton
    return kernel(q, k_cache, v_cache, block_table, row_start, bias, slopes, sink, causal=causal, scale=scale,
                  softcap=softcap, window=window, alibi=alibi, sinks=sinks)


def _quant_linear_triton(x, packed, bias):
    from ...codegen.kernels import quant_matmul

    return quant_matmul.quant_linear_triton(x, packed, bias)
