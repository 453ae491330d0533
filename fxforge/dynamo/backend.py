"""FxforgeBackend: a torch.compile backend that runs each subgraph dynamo hands it through
fxforge (capture, the pass pipeline, the program), and keeps what it built.

    fx = FxforgeBackend(quantize="int8")          # any optimize() option
    fast = torch.compile(model, backend=fx)
    fast(ids); fx.compiled[0].model.ir             # the OptimizedModel of the first subgraph

A subgraph fxforge cannot take (an op it cannot capture, autograd, a size it cannot place)
runs as dynamo gave it, and the backend records why in `fx.fallbacks` (and warns once per
subgraph): torch.compile never fails because of fxforge.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..api import optimize_captured
from ..log import Reporter
from ..runtime.module import OptimizedModel
from .capture import capture_subgraph
from .subgraph import InputLayout, SubgraphModule, UnsupportedSubgraph, input_layout


@dataclass
class CompiledSubgraph:
    """One subgraph fxforge compiled: its OptimizedModel and how dynamo's inputs map to it."""

    model: OptimizedModel
    layout: InputLayout

    def __call__(self, *args):
        out = self.model(*(args[pos] for pos in self.layout.user))
        # dynamo expects a sequence of outputs, as its GraphModule returns
        return out if isinstance(out, (tuple, list)) else (out,)


@dataclass
class Fallback:
    """A subgraph run as dynamo gave it, and why."""

    graph_module: torch.fx.GraphModule
    reason: str


class FxforgeBackend:
    """`torch.compile(model, backend=FxforgeBackend(**optimize_options))`. Records every
    subgraph it compiled (`compiled`) and every one it left to plain PyTorch (`fallbacks`).

    A subgraph is compiled on its first call, not when dynamo hands it over: torch.export
    run inside dynamo's own compilation corrupts dynamo's guards for the frame (torch 2.13:
    "Guard failed on the same frame it was created"), and at the first call the inputs are
    real tensors and real sizes whatever dynamo's example inputs were."""

    def __init__(self, **optimize_options):
        self.options = optimize_options
        self.compiled: list[CompiledSubgraph] = []
        self.fallbacks: list[Fallback] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        try:
            layout = input_layout(gm, list(example_inputs))
        except UnsupportedSubgraph as e:
            return self._fall_back(gm, e)
        return _CompileOnFirstCall(self, gm, layout)

    def compile(self, gm: torch.fx.GraphModule, layout: InputLayout, inputs: list) -> CompiledSubgraph:
        """The OptimizedModel of one subgraph, captured on `inputs` (dynamo's graph inputs
        of a real call); raises what the fallback reports."""
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            raise UnsupportedSubgraph("fxforge compiles inference graphs: the subgraph needs autograd "
                                      "(run the compiled model under torch.no_grad() or torch.inference_mode())")
        module = SubgraphModule(gm, layout, inputs)
        Reporter(self.options.get("verbose")).log(
            "dynamo", f"subgraph with {len(layout.user)} input tensor(s), {len(layout.weights)} weight(s), "
                      f"{len(layout.sizes)} size(s)")
        # the model's weights stay shared (copy_weights=False): torch.compile keeps using the
        # model, and a second copy of each weight would double the memory
        fast = optimize_captured(lambda: capture_subgraph(module, inputs), module, copy_weights=False,
                                 **self.options)
        compiled = CompiledSubgraph(fast, layout)
        self.compiled.append(compiled)
        return compiled

    def _fall_back(self, gm: torch.fx.GraphModule, error: Exception):
        reason = f"{type(error).__name__}: {error}"
        self.fallbacks.append(Fallback(gm, reason))
        warnings.warn(f"fxforge could not compile a torch.compile subgraph; it runs as PyTorch ops "
                      f"({reason.splitlines()[0]})", stacklevel=3)
        return gm.forward

    @property
    def models(self) -> list[OptimizedModel]:
        """The OptimizedModel of each compiled subgraph, in the order they were first called."""
        return [c.model for c in self.compiled]

    def __repr__(self) -> str:
        return (f"FxforgeBackend({', '.join(f'{k}={v!r}' for k, v in self.options.items())}) "
                f"compiled={len(self.compiled)} fallbacks={len(self.fallbacks)}")


class _CompileOnFirstCall:
    """What dynamo gets for a subgraph: compiles at the first call, then runs the result
    (fxforge's program, or the GraphModule itself if fxforge could not take it)."""

    def __init__(self, owner: FxforgeBackend, gm: torch.fx.GraphModule, layout: InputLayout):
        self.owner, self.gm, self.layout = owner, gm, layout
        self.run = None

    def __call__(self, *args):
        if self.run is None:
            try:
                self.run = self.owner.compile(self.gm, self.layout, list(args))
            except Exception as e:  # any failure: the subgraph runs as dynamo gave it
                self.run = self.owner._fall_back(self.gm, e)
        return self.run(*args)


def backend(gm: torch.fx.GraphModule, example_inputs):
    """`torch.compile(model, backend=fxforge.dynamo.backend)` (and backend="fxforge"): the
    default pipeline, nothing recorded. Use FxforgeBackend() to choose options or to inspect
    what was built."""
    return FxforgeBackend()(gm, example_inputs)
