"""The IR's one evaluator: run nodes with each op's plain-torch reference, the registry's
definition of what the op means (the `eval_jaxpr` of this IR).

Constant folding (cleanup), shape evaluation (masks and positions at sample sizes,
passes/shape_eval.py) and calibration (gqa's activations on the user's text) all use it,
so passes never build a runtime program. It gives the meaning of a graph, not speed: the
runtime compiles the final graph for a backend instead (runtime/program.py).
"""
from __future__ import annotations

import sympy
import torch

from .attr_walk import attr_leaves
from .graph import Graph, Node, Value
from .ops import OPS, scalar_exponent
from .types import SymType, symbol


def attr_symbols(value) -> set:
    """The size symbols that attrs mention, at any depth: a fused node keeps its ops'
    attrs inside its `body` (a `const` of value T in a fused_pointwise). An attr that
    mentions one has a different value at each size, so it is not a constant."""
    return set().union(*(leaf.free_symbols for leaf, _ in attr_leaves(value) if isinstance(leaf, sympy.Basic)))


def concrete_attrs(value, sizes: dict):
    """Attrs with sympy sizes -> plain Python numbers at `sizes` ({symbol: int}); torch
    ops take no sympy numbers. KeyError if a size is left unknown."""
    if isinstance(value, sympy.Basic):
        out = value.subs(sizes) if sizes else value
        if out.free_symbols:
            raise KeyError(f"no size given for {out.free_symbols}")
        if isinstance(out, sympy.logic.boolalg.Boolean):  # a condition on sizes (`T > 7`): True / False
            return bool(out)
        if not out.is_number:
            raise KeyError(f"{value} is not a number at the sizes {sizes}")
        return int(out) if out.is_integer else float(out)
    if isinstance(value, tuple):
        return tuple(concrete_attrs(v, sizes) for v in value)
    if isinstance(value, list):
        return [concrete_attrs(v, sizes) for v in value]
    if isinstance(value, dict):
        return {k: concrete_attrs(v, sizes) for k, v in value.items()}
    return value


def scalar_exponents(nodes) -> dict:
    """Value -> the Python number a pow takes as its exponent, for the constants among
    `nodes`: the model ran pow(Tensor, Scalar), which is not the general pow of a 0-d
    tensor (x ** 0.5 is sqrt: NaN at -inf, -0.0 at -0.0, where the general pow gives inf
    and +0.0). The runtime's programs take them so (ops.scalar_exponent); so does every
    evaluation of the graph."""
    numbers = {}
    for n in nodes:
        if n.op == "const" and not isinstance(n.attrs["value"], sympy.Basic):
            number = scalar_exponent(n.attrs["value"], n.attrs["dtype"])
            if number is not None:
                numbers[n.outputs[0]] = number
    return numbers


def eval_node(node: Node, args: list, sizes: dict | None = None, device=None, registry=None,
              exponents: dict | None = None) -> tuple:
    """One node's results, from its inputs' tensors. `exponents` (scalar_exponents): a
    pow whose exponent is a constant takes it as a number, as the model did."""
    registry = OPS if registry is None else registry
    op = registry[node.op]
    if node.op == "pow" and exponents and len(node.inputs) == 2 and node.inputs[1] in exponents:
        args = [args[0], exponents[node.inputs[1]]]
    attrs = concrete_attrs(dict(node.attrs), sizes or {})
    if op.has("needs_device"):
        attrs["device"] = device
    out = op.reference(*args, **attrs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def input_sizes(graph: Graph, inputs) -> dict:
    """{symbol: int} bound by the inputs' shapes (and int inputs, by their names)."""
    sizes: dict = {}
    for v, x in zip(graph.inputs, inputs):
        if isinstance(v.type, SymType):
            sizes[symbol(v.hint)] = int(x)
            continue
        for d, n in zip(v.shape, x.shape):
            if isinstance(d, sympy.Symbol):
                sizes.setdefault(d, int(n))
    return sizes


def evaluate(graph: Graph, inputs, wanted: list[Value] | None = None, registry=None) -> list[torch.Tensor]:
    """The values `wanted` (default: the graph's outputs) when the graph runs on `inputs`
    (its inputs, then its state buffers if it has any), parameters from graph.params. A
    value is freed after its last use, as the runtime's programs do."""
    wanted = list(graph.outputs if wanted is None else wanted)
    env: dict[Value, object] = dict(zip(graph.inputs + graph.state_values, inputs))
    env.update((v, graph.params[v.param]) for v in graph.param_values)
    sizes = input_sizes(graph, inputs)
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    keep = set(wanted) | set(graph.param_values)
    last_use = {v: i for i, n in enumerate(graph.nodes) for v in n.inputs}
    exponents = scalar_exponents(graph.nodes)
    with torch.no_grad():
        for i, node in enumerate(graph.nodes):
            args = [env[v] for v in node.inputs]
            env.update(zip(node.outputs, eval_node(node, args, sizes, device, registry, exponents)))
            for v in node.inputs:
                if last_use.get(v) == i and v not in keep:
                    env.pop(v, None)
    return [env[v] for v in wanted]
