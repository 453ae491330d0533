"""OptimizedModel: what `fxforge.optimize` returns. Call it like the model."""
from __future__ import annotations

import os

import sympy
import torch
import torch.utils._pytree as pytree

from ..ir.capture import CallSpec, flatten_call
from ..ir.graph import Graph
from ..ir.printer import print_graph
from ..ir.types import SymType, dtype_name
from ..passes.manager import PassStats, format_report
from .program import Program


class OptimizedModel:
    def __init__(self, graph: Graph, spec: CallSpec, program: Program, backend: str, stats: list[PassStats],
                 dumps: list[tuple[str, str]], capture_seconds: float, model_name: str = "model"):
        self.graph = graph
        self.spec = spec
        self.program = program
        self.backend = backend
        self.stats = stats
        self._dumps = dumps  # (file name, IR text) after each pass
        self.capture_seconds = capture_seconds
        self.model_name = model_name
        self.kernels: dict[str, str] = {}

    # -- calling ----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        leaves = flatten_call(self.spec, args, kwargs)
        inputs = []
        for leaf, (kind, payload) in zip(leaves, self.spec.input_leaves):
            if kind == "tensor":
                inputs.append(leaf)
            elif not _same_constant(leaf, payload):
                raise ValueError(f"an argument was captured as the constant {payload!r} but is now {leaf!r}; "
                                 "call fxforge.optimize again with the new value")
        self._check_inputs(inputs)
        with torch.no_grad():
            outs = self.program(*inputs)
        flat = [outs[i] if kind == "value" else i for kind, i in self.spec.output_leaves]
        return pytree.tree_unflatten(flat, self.spec.out_spec)

    forward = __call__

    def _check_inputs(self, inputs):
        sizes: dict = {}
        for i, (x, v) in enumerate(zip(inputs, self.graph.inputs)):
            label = f"input {i} ({self.graph.input_names[i] if i < len(self.graph.input_names) else v.hint})"
            if isinstance(v.type, SymType):
                continue
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{label} must be a tensor of type {v.type}, got {type(x).__name__}")
            if x.dim() != v.rank or x.dtype != v.dtype:
                raise ValueError(f"{label} must be {v.type} (rank {v.rank}, {dtype_name(v.dtype)}), got a "
                                 f"{x.dtype} tensor of shape {tuple(x.shape)}")
            for d, size in enumerate(v.shape):
                actual = x.shape[d]
                if isinstance(size, sympy.Symbol):
                    if sizes.setdefault(size, actual) != actual:
                        raise ValueError(f"{label} has {size}={actual} in dim {d}, but another input has "
                                         f"{size}={sizes[size]}; the graph needs them equal ({v.type})")
                elif size.is_number and int(size) != actual:
                    raise ValueError(f"{label} must have size {size} in dim {d} ({v.type}), got {actual}")

    # -- inspection ---------------------------------------------------------------------------
    @property
    def ir(self) -> str:
        return print_graph(self.graph)

    @property
    def code(self) -> str:
        return self.program.source

    def report(self) -> str:
        head = (f"fxforge report for {self.model_name}: backend={self.backend}, "
                f"{len(self.graph.nodes)} nodes, {len(self.graph.params)} parameters")
        ops = ", ".join(f"{k}={v}" for k, v in sorted(self.graph.op_counts().items(), key=lambda kv: -kv[1]))
        return f"{head}\n{format_report(self.stats, self.capture_seconds)}\nfinal ops: {ops}"

    def dump(self, directory: str) -> list[str]:
        """Write the IR after every pass (NN_<pass>.ir), the program, kernels and the report."""
        os.makedirs(directory, exist_ok=True)
        written = []
        for fname, text in self._dumps:
            written.append(_write(directory, fname, text))
        written.append(_write(directory, "program.py", self.code))
        for name, src in self.kernels.items():
            written.append(_write(directory, f"kernel_{name}.py", src))
        written.append(_write(directory, "report.txt", self.report() + "\n"))
        return written

    def __repr__(self) -> str:
        return f"OptimizedModel({self.model_name}, backend={self.backend}, nodes={len(self.graph.nodes)})"


def _write(directory, name, text) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def _same_constant(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b
