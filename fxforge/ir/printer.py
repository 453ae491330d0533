"""The IR's text form: one line per node, names given at print time.

    graph(%input_ids: i64[B, T], %p0: param "model.embed_tokens.weight" f32[49152, 576]) {
      %1: f32[B, T, 576] = embedding(%p0, %input_ids)
      %2: f32[] = const() {value=0.125, dtype=f32}
      return (%1)
    }

`parser.parse` reads it back to a structurally equal graph.
"""
from __future__ import annotations

import json
import math
import re

import sympy
import torch

from .guards import format_guard
from .ops import Arg
from .types import DTYPE_NAMES, size_text

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Namer:
    """Stable names for a graph's values: inputs by their hint, params p0.., states s0..,
    nodes 1... Every name is unique: a generated name an input already took (a forward
    argument called `p0`) gets `_` appended, so the text always parses back."""

    def __init__(self, graph):
        self.names: dict = {}
        taken: set[str] = set()

        def claim(v, name: str):
            while name in taken:
                name = name + "_"
            taken.add(name)
            self.names[v] = name

        for i, v in enumerate(graph.inputs):
            claim(v, v.hint if v.hint and _IDENT.match(v.hint) else f"in{i}")
        for i, v in enumerate(graph.param_values):
            claim(v, f"p{i}")
        for i, v in enumerate(graph.state_values):
            claim(v, f"s{i}")
        counter = 0
        for n in graph.nodes:  # numbers: no input hint (an identifier) can take one
            for v in n.outputs:
                counter += 1
                self.names[v] = str(counter)

    def __getitem__(self, v) -> str:
        try:
            return self.names[v]
        except KeyError:
            return f"<undefined {v!r}>"


def quote(text: str) -> str:
    """A name or string attribute as the IR writes it: JSON's string syntax (\\" \\\\ \\n \\t
    escaped) that parser.read_quoted reads back, and ASCII only (\\u00e9): the text stays one
    line whatever the name holds (\\u2028 too), and prints on any terminal."""
    return json.dumps(text, ensure_ascii=True)


def format_attr(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, complex):  # a Python complex constant (z * 2j); each part as a float
        return f"complex({format_attr(value.real)}, {format_attr(value.imag)})"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES[value]
    if isinstance(value, (torch.layout, torch.memory_format)):
        return str(value)  # "torch.strided"
    if isinstance(value, torch.device):
        return f"device({quote(str(value))})"
    if isinstance(value, Arg):
        return f"${value.index}"
    if isinstance(value, tuple):
        inner = ", ".join(format_attr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, sympy.Basic):
        if value.is_Integer:
            return str(int(value))
        return size_text(value)  # floats with every digit (sympy's str keeps 15)
    raise TypeError(f"attr value {value!r} of type {type(value).__name__} has no text form")


def format_attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in attrs.items()) + "}"


def format_node(node, names: Namer, show_source: bool = False) -> str:
    lhs = ", ".join(f"%{names[v]}: {v.type}" for v in node.outputs)
    args = ", ".join(f"%{names[v]}" for v in node.inputs)
    line = f"{lhs} = {node.op}({args}){format_attrs(node.attrs)}"
    if show_source and node.meta.get("source"):
        line += f"  # {node.meta['source']}"
    return line


def print_graph(graph, show_source: bool = False) -> str:
    names = Namer(graph)
    sig = [f"%{names[v]}: {v.type}{format_attrs(v.attrs or {})}" for v in graph.inputs]
    sig += [f'%{names[v]}: param {quote(v.param)} {v.type}{format_attrs(v.attrs or {})}'
            for v in graph.param_values]
    sig += [f'%{names[v]}: state {quote(v.state)} {v.type}{format_attrs(v.attrs or {})}'
            for v in graph.state_values]
    lines = [f"graph({', '.join(sig)}) {{"]
    if graph.signature:
        lines.append(f"  signature{format_attrs(graph.signature)}")
    lines += [f"  guard {format_guard(g)}" for g in graph.guards]
    for n in graph.nodes:
        lines.append("  " + format_node(n, names, show_source))
    outs = ", ".join(f"%{names[v]}" for v in graph.outputs)
    lines.append(f"  return ({outs})")
    lines.append("}")
    return "\n".join(lines)
