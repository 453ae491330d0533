"""Lower the final IR to straight-line Python source that calls the backend's ops.

    def program(input_ids):
        B = input_ids.shape[0]
        T = input_ids.shape[1]
        v1 = op_embedding(p0, input_ids)
        ...
        del v1, v2
        return (v20,)

Values are freed (`del`) right after their last use, as torch.fx's codegen does, so
peak memory stays that of eager PyTorch.
"""
from __future__ import annotations

import keyword
import linecache
import math
import re

import sympy
import torch

from ..ir.custom_ops import check_registered
from ..ir.graph import Graph
from ..ir.ops import OPS, Arg, scalar_exponent
from ..ir.types import IntegerQuotients, SymType, TorchFunctions, symbol
from .frames import frame_of_its_own


def _py_dtype(dtype: torch.dtype) -> str:
    return str(dtype)  # "torch.float32"


class _Printer(TorchFunctions, IntegerQuotients, sympy.printing.str.StrPrinter):
    """sympy -> Python: floor division and modulo of integers stay integers; torch's float
    functions of sizes compute as eager does (types.TorchFunctions)."""

    def _print_Mod(self, e):
        return f"(({self._print(e.args[0])}) % ({self._print(e.args[1])}))"

    def _print_Max(self, e):
        return "max(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_Min(self, e):
        return "min(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_Rational(self, e):
        return f"({e.p} / {e.q})"

    def _print_Pow(self, e, rational=False):
        # StrPrinter writes T**(1/2) as sqrt(T), a name the program does not have
        if e.exp.is_Rational and not e.exp.is_Integer:
            return f"(({self._print(e.base)}) ** {self._print(e.exp)})"
        return super()._print_Pow(e, rational=rational)


    def _print_Equality(self, e):
        return f"(({self._print(e.lhs)}) == ({self._print(e.rhs)}))"

    def _print_Unequality(self, e):
        return f"(({self._print(e.lhs)}) != ({self._print(e.rhs)}))"


_PRINTER = _Printer()


def size_function(expr: sympy.Basic, symbols: list):
    """`expr` (a size, or a float or bool computed from sizes) as a Python function of the
    values of `symbols`, written as the program writes sizes (an output that is a size)."""
    source = f"lambda {', '.join(map(str, symbols))}: {_PRINTER.doprint(expr)}"
    return eval(compile(source, "<fxforge size>", "eval"), {"math": math})  # noqa: S307 (our own printer's text)


def py_literal(value, tensor_names: list[str] | None = None) -> str:
    """An attr value as Python source. Sizes use the symbols bound at the program's top."""
    if isinstance(value, Arg):
        return tensor_names[value.index]
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if value != value:
            return "float('nan')"
        if value in (float("inf"), float("-inf")):
            return f"float('{value}')"
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, torch.dtype):
        return _py_dtype(value)
    if isinstance(value, (torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, tuple):
        inner = ", ".join(py_literal(v, tensor_names) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(py_literal(v, tensor_names) for v in value) + "]"
    if isinstance(value, sympy.Basic):
        if value.is_Integer:
            return str(int(value))
        return _PRINTER.doprint(value)
    raise TypeError(f"cannot write {value!r} as Python")


def _ident(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    if not name or name[0].isdigit() or keyword.iskeyword(name):
        name = "_" + name
    return name


class Program:
    def __init__(self, source: str, fn, param_names: list[str]):
        self.source = source
        self.fn = fn
        self.param_names = param_names

    def __call__(self, *inputs):
        return self.fn(*inputs)


def build_program(graph: Graph, ops: dict, device: torch.device | str = "cpu",
                  filename: str = "<fxforge program>", inline_fused: bool | None = None) -> Program:
    """`ops` maps an IR op name to its callable for the chosen backend. Constants with a
    known value are made once, on `device`, and bound as globals of the program.
    inline_fused: write fused_pointwise groups as one line per step (a backend without
    fused kernels, `Backend.inlines_fused_pointwise`); None: when `ops` runs the reference."""
    # the program calls torch.ops.<target> by name: an op not registered here (a custom op
    # whose module a loading process never imported) fails now, every one named, not at
    # its first call with an AttributeError from torch.ops
    check_registered(n.attrs["target"] for n in graph.nodes if n.op == "torch_call")
    names: dict = {}
    taken: set[str] = set()

    def name(v, base):
        n = _ident(base)
        while n in taken or n in ops or n in ("torch", "P", "math"):
            n += "_"
        taken.add(n)
        names[v] = n
        return n

    args = [name(v, v.hint or f"in{i}") for i, v in enumerate(graph.inputs)]
    args += [name(v, "state_" + v.state) for v in graph.state_values]
    lines = [f"def program({', '.join(args)}):"]
    # Bind every symbolic size: an int input binds the symbol it is named after, the
    # others come from the first input (or state buffer) dim that carries them.
    bound: set = set()
    for v, a in zip(graph.inputs, args):
        if isinstance(v.type, SymType):
            bound.add(symbol(v.hint))
            if a != v.hint:
                lines.append(f"    {v.hint} = {a}")
    for v, a in zip(graph.inputs + graph.state_values, args):
        if isinstance(v.type, SymType):
            continue
        for d, size in enumerate(v.shape):
            if isinstance(size, sympy.Symbol) and size not in bound:
                bound.add(size)
                lines.append(f"    {size} = {a}.shape[{d}]")
    for v in graph.param_values:
        name(v, "p_" + v.param.replace(".", "_"))

    last_use: dict = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last_use[v] = i
    keep = set(graph.outputs) | set(graph.param_values)
    # Without a fused kernel (the torch backend) a fused group's steps are written out as
    # lines of their own, so they cost what the unfused ops cost, constants hoisted.
    if inline_fused is None:
        inline_fused = ops.get("fused_pointwise") is OPS["fused_pointwise"].reference
    counter = 0
    hoisted: dict[str, torch.Tensor] = {}
    attr_sources: dict[str, str] = {}  # the source of an attr value made once -> its name (_call)
    exponents: dict[str, str | None] = {}  # a constant's name -> its number, for a pow's exponent (_pow_operands)
    for i, n in enumerate(graph.nodes):
        if n.op == "const" and not isinstance(n.attrs["value"], sympy.Basic):
            counter += 1
            c = name(n.outputs[0], f"c{counter}")
            hoisted[c] = torch.tensor(n.attrs["value"], dtype=n.attrs["dtype"], device=device)
            keep.add(n.outputs[0])
            exponents[c] = _scalar_exponent(n.attrs["value"], n.attrs["dtype"])
            continue
        outs = []
        for v in n.outputs:
            counter += 1
            outs.append(name(v, f"v{counter}"))
        ins = _pow_operands(n.op, [names[v] for v in n.inputs], exponents)
        if n.op == "fused_pointwise" and inline_fused:
            counter = _inline_fused(n, ins, outs, lines, hoisted, taken, counter, device)
        else:
            call = _call(n, ins, attr_sources, taken)
            lhs = outs[0] if len(outs) == 1 else ", ".join(outs)
            lines.append(f"    {lhs} = {call}")
        dead = [names[v] for v in dict.fromkeys(n.inputs) if last_use.get(v) == i and v not in keep]
        dead += [names[v] for v in n.outputs if v not in last_use and v not in keep]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    rets = ", ".join(names[v] for v in graph.outputs)
    lines.append(f"    return ({rets},)" if len(graph.outputs) == 1 else f"    return ({rets})")
    source = "\n".join(lines) + "\n"

    namespace = {"torch": torch, "math": math, "DEVICE": torch.device(device), **{f"op_{k}": fn for k, fn in ops.items()}}
    namespace.update(hoisted)
    for attr_source, attr_name in attr_sources.items():
        namespace[attr_name] = eval(attr_source, namespace)  # noqa: S307 (py_literal's text)
    namespace.update({names[v]: graph.params[v.param] for v in graph.param_values})
    # Register the source so tracebacks through the program show its lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    # a program makes hundreds of Python calls: keep them off data-stack chunk boundaries
    fn = frame_of_its_own(namespace["program"])
    return Program(source, fn, [v.param for v in graph.param_values])


def _inline_fused(node, ins: list[str], outs: list[str], lines: list[str], hoisted: dict, taken: set,
                  counter: int, device) -> int:
    """Write a fused_pointwise body as one line per step; returns the updated counter."""
    steps: list[str] = []
    temps: list[str] = []
    exponents: dict[str, str | None] = {}  # a const step's name -> its number (_pow_operands)
    for op, args, attrs in node.attrs["body"]:
        counter += 1
        name = f"c{counter}" if op == "const" else f"t{counter}"
        while name in taken:
            name += "_"
        taken.add(name)
        if op == "const" and isinstance(dict(attrs)["value"], sympy.Basic):
            # a size expression (`x * x.shape[1]`): computed from the sizes bound at the
            # program's top on every call, as a top-level const is
            a = dict(attrs)
            temps.append(name)
            lines.append(f"    {name} = op_const(value={py_literal(a['value'])}, dtype={py_literal(a['dtype'])}, "
                         "device=DEVICE)")
        elif op == "const":
            a = dict(attrs)
            hoisted[name] = torch.tensor(a["value"], dtype=a["dtype"], device=device)
            exponents[name] = _scalar_exponent(a["value"], a["dtype"])
        else:
            temps.append(name)
            operands = _pow_operands(op, [ins[int(x[2:])] if x.startswith("in") else steps[int(x[1:])] for x in args],
                                     exponents)
            kw = ", ".join(f"{k}={py_literal(v)}" for k, v in attrs)
            lines.append(f"    {name} = op_{op}({', '.join(x for x in (', '.join(operands), kw) if x)})")
        steps.append(name)
    results = [steps[int(o[1:])] for o in node.attrs["outputs"]]
    # an output stored into a KV cache (`into`) is that cache's kv_append, as an op of its
    # own: the static decode step's override of kv_append then applies here too
    start = py_literal(node.attrs.get("start"))
    for k, i in node.attrs.get("into") or ():
        results[k] = f"op_kv_append({ins[i]}, {results[k]}, start={start})"
    lines.append(f"    {', '.join(outs)} = {', '.join(results)}")
    if temps:
        lines.append(f"    del {', '.join(temps)}")
    return counter


def _attr_source(value, attr_sources: dict[str, str], taken: set[str]) -> str:
    """An attr value as the program passes it. A tuple that holds no size (a fused body, a
    column list) is made once, a global of the program (`attr_sources`), and passed as that
    one object on every call: written inline, Python would build it anew per call (it names
    torch.float32 and the like), and the kernels that keep their launch plan per node, keyed
    by the attrs' identity (codegen/pointwise.py, kernels/decode_gemv.py), missed that plan on
    every call and kept one more each time. Equal sources are one object (the equal bodies of
    a model's 30 layers: one plan per shape)."""
    source = py_literal(value)
    if not isinstance(value, tuple) or not _fixed(value):
        return source
    if source not in attr_sources:
        name = f"attrs{len(attr_sources)}"
        while name in taken:
            name += "_"
        taken.add(name)
        attr_sources[source] = name
    return attr_sources[source]


def _fixed(value) -> bool:
    """No size symbol anywhere in `value` (its literal reads no symbol bound per call)."""
    if isinstance(value, (tuple, list)):
        return all(map(_fixed, value))
    return not (isinstance(value, sympy.Basic) and value.free_symbols)


def _pow_operands(op: str, operands: list[str], exponents: dict[str, str | None]) -> list[str]:
    """A step's operands, a pow's exponent written as its number where it is a constant
    with one (`exponents`: the constant's name -> _scalar_exponent, None where it has none)."""
    number = exponents.get(operands[1]) if op == "pow" and len(operands) == 2 else None
    return operands if number is None else [operands[0], number]


def _scalar_exponent(value, dtype: torch.dtype) -> str | None:
    """A constant as the Python source of the number a pow takes for its exponent
    (ir.ops.scalar_exponent: why), None where it has none."""
    number = scalar_exponent(value, dtype)
    return None if number is None else py_literal(number)


def _call(node, ins: list[str], attr_sources: dict[str, str], taken: set[str]) -> str:
    if node.op == "torch_call":
        a = node.attrs
        args = ", ".join(py_literal(x, ins) for x in a["args"])
        kwargs = ", ".join(f"{k}={py_literal(v, ins)}" for k, v in a["kwargs"])
        return f"torch.ops.{a['target']}({', '.join(x for x in (args, kwargs) if x)})"
    attrs = ", ".join(f"{k}={_attr_source(v, attr_sources, taken)}" for k, v in node.attrs.items())
    if node.op in OPS and OPS[node.op].has("needs_device"):  # it makes a tensor from nothing: where?
        attrs += ", device=DEVICE"
    return f"op_{node.op}({', '.join(x for x in (', '.join(ins), attrs) if x)})"

