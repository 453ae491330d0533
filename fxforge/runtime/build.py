"""From an optimized graph to a runnable OptimizedModel: the backend's checks and planning,
then the program. optimize(), load_ir(), fxforge.load() and OptimizedModel.to() all end
here, so a loaded or moved model is built exactly as a freshly optimized one."""
from __future__ import annotations

import time
from collections import Counter

import torch

from ..ir.capture import CallSpec, positional_call_spec
from ..ir.graph import Graph
from ..ir.printer import print_graph
from ..passes.manager import PassStats
from .backends import Backend, resolve_backend
from .module import OptimizedModel


def assemble(graph: Graph, spec: CallSpec, backend: Backend, device, name: str, stats=(), dumps=(),
             capture_seconds: float | None = None) -> OptimizedModel:
    """The backend's checks and planning on `graph` (as the passes left it), then the
    program and the model around it. capture_seconds None: no capture (a loaded IR)."""
    check_outputs(graph, spec, name)
    missing = [v.param for v in graph.param_values if v.param not in graph.params]
    if missing:  # else a bare KeyError from the program's namespace
        raise KeyError(f"{name}: no tensor for {len(missing)} parameter(s) of the graph, e.g. {missing[:3]}")
    graph = params_on(graph, device)
    backend.check(graph)
    start = time.perf_counter()
    program, planned, ops, runtime_stats = backend.build(graph, device, f"<fxforge program for {name}>")
    prepare = None if planned is graph else \
        _prepare_stats(backend, graph, planned, runtime_stats, time.perf_counter() - start)
    if dumps and planned is not graph:
        text = print_graph(planned)
        if text != dumps[-1][1]:  # the backend rewrote the graph (linear_fused written as its steps)
            dumps = [*dumps, (f"{len(dumps):02d}_prepare_{backend.name}.ir", text)]
    fast = OptimizedModel(planned, spec, program, backend, list(stats), list(dumps), capture_seconds, name)
    fast.runtime_stats.extend(runtime_stats)
    fast.prepare_stats = prepare
    fast.op_implementations = ops  # the static decode program (runtime/static_decode.py) is built from them
    # kept for save() and to(): the planning is redone per backend and device
    fast.pipeline_graph = graph
    return fast


def check_outputs(graph: Graph, spec: CallSpec, name: str):
    """The graph returns exactly the values the call spec rebuilds the model's output
    from; otherwise the first call would fail on a bare IndexError (or return the wrong
    tensors), far from the cause."""
    wanted = [i for kind, i in spec.output_leaves if kind == "value"]
    if len(graph.outputs) == len(wanted) and all(0 <= i < len(graph.outputs) for i in wanted):
        return
    if not graph.outputs:
        raise ValueError(f"{name}: the graph returns nothing (`return ()`), but the model's call returns "
                         f"{len(wanted)} tensor(s): the IR looks truncated or its return line was lost; "
                         "re-save or re-dump the model")
    raise ValueError(f"{name}: the graph returns {len(graph.outputs)} value(s), but the model's call returns "
                     f"{len(wanted)} tensor(s) built from them: the IR's `return (...)` line does not match "
                     "how the model is called (an edit or a pass added or dropped an output)")


def _prepare_stats(backend, graph: Graph, planned: Graph, steps: list, seconds: float) -> PassStats:
    """The report's row for the backend's planning (dumped as NN_prepare_<backend>.ir):
    linear_fused written as its steps, before the steps it reports itself (cpu_linear ...),
    which start from its node count. Its time is the build's less theirs (the program's
    generation included)."""
    after = steps[0].nodes_before if steps else len(planned.nodes)
    before_ops, after_ops = graph.op_counts(), planned.op_counts()
    # the passes' notes credit fusions (linear_fused, rope_attention) that this backend runs
    # as their steps: say so where the report lists them
    undone = [f"{op} {n} -> 0" for op, n in sorted(before_ops.items()) if op not in after_ops]
    notes = [f"the {backend.name} backend runs these fused ops as their steps (PyTorch ops, no fused kernel): "
             f"{', '.join(undone)}"] if undone else []
    return PassStats(f"prepare_{backend.name}", max(seconds - sum(s.seconds for s in steps), 0.0),
                     len(graph.nodes), after, Counter(), notes, {})


def model_from_ir(text: str, weights: dict[str, torch.Tensor], *, spec: CallSpec | None = None,
                  name: str = "loaded IR", backend: str | Backend = "auto", device=None,
                  cpu_linear: bool | str = True) -> OptimizedModel:
    """Parse `text`, bind `weights` by parameter name (moved to `device` if given),
    typecheck, and assemble. `spec`: how the model is called (default: the graph's user
    inputs positionally, outputs as a tensor or a tuple)."""
    from ..ir.parser import parse
    from ..ir.typecheck import typecheck

    graph = parse(text)
    missing = [v.param for v in graph.param_values if v.param not in weights]
    if missing:
        raise KeyError(f"no tensor for {len(missing)} parameter(s) of the graph, e.g. {missing[:3]}; "
                       "pass every `param` named in the text (fast.graph.params holds them)")
    graph.params = {v.param: _on(weights[v.param], device) for v in graph.param_values}
    typecheck(graph)  # shapes and dtypes of the weights against the text, roles, guards
    if device is None:
        device = next(iter(graph.params.values())).device if graph.params else torch.device("cpu")
    backend = resolve_backend(backend, device, cpu_linear=cpu_linear)
    return assemble(graph, spec or positional_call_spec(graph), backend, device, name)


def own_weights(graph: Graph, model: torch.nn.Module) -> Graph:
    """`graph` with a copy of every parameter that still shares memory with `model`, so
    that editing the model's weights afterwards (fine-tuning, load_state_dict) does not
    change the optimized model behind its back. Weights the passes already rewrote
    (fused, quantized) are new tensors and are not copied again. Tied weights stay tied."""
    model_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
                      if t.device.type != "meta"}
    copies: dict[tuple, torch.Tensor] = {}
    params = {}
    for name, t in graph.params.items():
        if t.untyped_storage().data_ptr() not in model_storages:
            params[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in copies:
            copies[key] = t.detach().clone()
        params[name] = copies[key]
    out = graph.with_nodes(graph.nodes)
    out.params = params
    return out


def params_on(graph: Graph, device) -> Graph:
    """`graph` with every parameter on `device`'s kind of device. Passes make some
    parameters themselves (ALiBi slopes, position tables) on the CPU; left there, a kernel
    on the GPU would get a host pointer, and a CUDA graph a host copy in every replay."""
    if device is None:
        return graph
    device = torch.device(device)
    stray = {n for n, t in graph.params.items() if t.device.type != device.type}
    if not stray:
        return graph
    out = graph.with_nodes(graph.nodes)
    out.params = {n: t.to(device) if n in stray else t for n, t in graph.params.items()}
    return out


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device)
