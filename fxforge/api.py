"""optimize(): capture -> pass pipeline -> program -> OptimizedModel."""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch

from .codegen.pointwise import PointwiseKernels
from .ir.capture import capture_with_spec
from .ir.printer import print_graph
from .passes import PassInfo, PassRegistry, registry as _default_registry
from .passes.manager import run_pipeline
from .runtime.backends import op_table, resolve_backend
from .runtime.module import OptimizedModel
from .runtime.cpu_int4 import plan_cpu_int4
from .runtime.cpu_linear import cpu_linear_mode, plan_cpu_linears
from .runtime.frames import frame_of_its_own
from .runtime.program import build_program


@frame_of_its_own  # same speed at any caller depth: see runtime/frames.py
def optimize(model: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
             passes: Sequence[str] | None = None, disable: Sequence[str] = (), backend: str = "auto",
             dump_dir: str | None = None, dynamic: bool = True, registry: PassRegistry | None = None,
             cpu_linear: bool | str = True, **options) -> OptimizedModel:
    """Capture `model` on the example inputs, run the pass pipeline, and return a model that
    runs the optimized graph.

    passes:   None for the default pipeline, or the exact list of pass names to run.
    disable:  pass names to leave out of the default pipeline.
    backend:  "auto" (triton on CUDA, else torch), "torch", "triton" or "interpret".
    dump_dir: write the IR after every pass, the program and the report there
              (the environment variable FXFORGE_DUMP does the same).
    cpu_linear: on the CPU (torch backend), run each float32 linear with the library kernel
              and weight layout that is fastest at one token, timed per shape
              (runtime/cpu_linear.py; column-major copies cost memory while the model
              keeps its own weights). True or "cached": time each shape once per machine
              and reuse the choice from then on (a JSON file under $FXFORGE_CACHE, default
              ~/.cache/fxforge, in cpu_linear/), so every run builds the same program;
              "measure": time again and overwrite the cached choices; False: F.linear on
              the model's weights, nothing timed or cached.
    options:  per-pass options (e.g. quantize="int8", kv_cache=True); an option no pass
              knows is an error.
    """
    registry = _default_registry if registry is None else registry
    cpu_linear = cpu_linear_mode(cpu_linear)
    known_options = {info.option for info in registry.passes.values() if info.option}
    unknown = set(options) - known_options
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for fxforge.optimize; "
                        f"pass options known: {sorted(known_options) or 'none'}")
    pipeline = registry.pipeline(options, list(passes) if passes is not None else None, disable)
    device = _model_device(model)
    backend = resolve_backend(backend, device)

    start = time.perf_counter()
    graph, spec = capture_with_spec(model, example_inputs, example_kwargs, dynamic=dynamic)
    capture_seconds = time.perf_counter() - start

    dumps: list[tuple[str, str]] = []
    dump_dir = dump_dir or os.environ.get("FXFORGE_DUMP") or None
    graph, stats = run_pipeline(graph, pipeline, options,
                                dump=lambda i, name, g: dumps.append((f"{i:02d}_{name}.ir", print_graph(g))))
    kernels = PointwiseKernels()
    ops = op_table(backend, kernels=kernels)
    runtime_stats = []
    if backend == "torch" and device.type == "cpu":
        if cpu_linear:
            graph, plan, cpu_linear_stats = plan_cpu_linears(graph, cpu_linear)
            ops["linear"] = plan.linear
            runtime_stats.append(cpu_linear_stats)
        int4_plan, int4_stats = plan_cpu_int4(graph)
        if int4_stats is not None:
            ops["quant_linear"] = int4_plan.wrap(ops["quant_linear"])
            runtime_stats.append(int4_stats)
    program = build_program(graph, ops, device=device,
                            filename=f"<fxforge program for {type(model).__name__}>")
    fast = OptimizedModel(graph, spec, program, backend, stats, dumps, capture_seconds, type(model).__name__)
    fast.runtime_stats.extend(runtime_stats)
    fast.kernels = kernels.sources  # filled as kernels are generated (first call per shape class)
    fast.generation_defaults = _generation_defaults(model)
    if dump_dir:
        fast.dump(dump_dir)
    return fast


def register_pass(name: str, *, before: str | None = None, after: str | None = None,
                  option: str | None = None, registry: PassRegistry | None = None) -> Callable:
    """Decorator: add `fn(graph) -> graph` (or `fn(graph, ctx) -> graph`) to the pipeline.

        @fxforge.register_pass("fold_my_gelu", before="fuse_elementwise")
        def fold_my_gelu(graph, ctx):
            return apply_rules(graph, MY_RULES, ctx.rules)
    """
    registry = _default_registry if registry is None else registry

    def decorate(fn):
        registry.add(PassInfo(name, fn, option=option, doc=(fn.__doc__ or "").strip()), before=before, after=after)
        return fn

    return decorate


def unregister_pass(name: str, registry: PassRegistry | None = None):
    (_default_registry if registry is None else registry).remove(name)


def _generation_defaults(model) -> dict:
    """EOS and pad tokens from a transformers model's generation_config, so that generate()
    stops where transformers' generate stops."""
    config = getattr(model, "generation_config", None)
    out = {}
    for key in ("eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
