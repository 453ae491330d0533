"""Row kernels for long rows: the same fused groups as `pointwise.generate_row_source`, but
the row is visited in chunks of BLOCK_N instead of being held whole in registers.

A row of 8k-64k elements in one block spills (ptxas reports kilobytes of local memory per
thread, docs/gpu-compile.md), so past `pointwise.ROW_BLOCK_MAX` a row kernel loops. Each
statistic a step needs (a max, a sum) is one pass over the row that recomputes the row
values it depends on from the inputs, accumulating a [BLOCK_N] vector that is reduced once
at the end; the last pass computes and stores the row outputs. Inputs are read once per
pass (softmax: three passes, layer_norm: three, rms_norm: two), which is cheap next to
spilling. The formulas are the single-block ones (two-pass mean and centred variance).
"""
from __future__ import annotations

import torch

_FILL = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}
# max and min keep a NaN, as torch.amax does: the accumulator's lanes propagate it, and since
# tl.max / tl.min skip NaN, the finish returns NaN if any lane holds one
_ACCUMULATE = {"sum": "{acc} + tl.where(cmask, {x}, 0.0)",
               "max": 'tl.maximum({acc}, tl.where(cmask, {x}, float("-inf")), propagate_nan=tl.PropagateNan.ALL)',
               "min": 'tl.minimum({acc}, tl.where(cmask, {x}, float("inf")), propagate_nan=tl.PropagateNan.ALL)'}
_NAN_IF_ANY = 'tl.where(tl.max(({acc} != {acc}).to(tl.int32), axis={axis}) > 0, float("nan"), tl.{fn}({acc}, axis={axis}))'
_FINISH = {"sum": "tl.sum({acc}, axis={axis})", "max": _NAN_IF_ANY, "min": _NAN_IF_ANY}


class _LoopedRow:
    """Kernel statements in two scopes: `top` (per row: scalars and the chunk loops) and
    `chunk` (row values of one chunk, replayed inside every later loop)."""

    def __init__(self, row_loads: list[str]):
        self.top: list[str] = []
        self.chunk: list[str] = list(row_loads)
        self.is_row: dict[str, bool] = {}

    def chunk_loop(self, tail: list[str]) -> list[str]:
        head = ["    for start in range(0, N, BLOCK_N):", "        cols = start + tl.arange(0, BLOCK_N)",
                "        cmask = cols < N"]
        return head + ["    " + line for line in self.chunk + tail]

    def reduce(self, name: str, kind: str, x: str) -> None:
        """A pass over the row: `name` = the `kind` reduction of row value `x`."""
        acc = f"{name}_acc"
        self.top.append(f"    {acc} = tl.full([BLOCK_N], {_FILL[kind]}, tl.float32)")
        self.top += self.chunk_loop([f"    {acc} = {_ACCUMULATE[kind].format(acc=acc, x=x)}"])
        self.top.append(f"    {name} = {_FINISH[kind].format(acc=acc, axis=0, fn=kind)}")
        self.is_row[name] = False

    def scalar(self, name: str, expr: str) -> None:
        self.top.append(f"    {name} = {expr}")
        self.is_row[name] = False

    def row(self, name: str, expr: str) -> None:
        self.chunk.append(f"    {name} = {expr}")
        self.is_row[name] = True

    def value(self, name: str, expr: str, operands) -> None:
        """A pointwise step: a row value if any operand is one, else a per-row scalar."""
        if any(self.is_row.get(a, False) for a in operands):
            self.row(name, expr)
        else:
            self.scalar(name, expr)


def _eps(attrs: dict) -> str:
    from .pointwise import _literal

    eps = attrs.get("eps")
    return _literal(eps if eps is not None else float(torch.finfo(torch.float32).eps))


def _affine(k: _LoopedRow, t: str, normed: str, rest: list[str], attrs: dict) -> None:
    expr = normed
    if attrs.get("weight"):
        expr = f"{expr} * {rest[0]}"
    if attrs.get("bias"):
        expr = f"({expr}) + {rest[-1]}"
    k.row(t, expr)


def _looped_step(k: _LoopedRow, t: str, op: str, args: list[str], attrs: dict, consts: dict, types=None) -> None:
    from .pointwise import expression

    x = args[0] if args else None
    if op in ("sum", "mean"):
        k.reduce(f"{t}_total" if op == "mean" else t, "sum", x)
        if op == "mean":
            k.scalar(t, f"{t}_total / N")
    elif op in ("amax", "amin"):
        k.reduce(t, "max" if op == "amax" else "min", x)
    elif op == "softmax":
        k.reduce(f"{t}_max", "max", x)
        k.row(f"{t}_exp", f"tl.exp({x} - {t}_max)")
        k.reduce(f"{t}_sum", "sum", f"{t}_exp")
        k.row(t, f"{t}_exp / {t}_sum")
    elif op == "layer_norm":
        k.reduce(f"{t}_total", "sum", x)
        k.scalar(f"{t}_mean", f"{t}_total / N")
        k.row(f"{t}_c", f"{x} - {t}_mean")
        k.row(f"{t}_c2", f"{t}_c * {t}_c")
        k.reduce(f"{t}_ss", "sum", f"{t}_c2")
        k.scalar(f"{t}_rstd", f"tl.rsqrt({t}_ss / N + {_eps(attrs)})")
        _affine(k, t, f"{t}_c * {t}_rstd", args[1:], attrs)
    elif op == "rms_norm":
        k.row(f"{t}_sq", f"{x} * {x}")
        k.reduce(f"{t}_ss", "sum", f"{t}_sq")
        k.scalar(f"{t}_rstd", f"tl.rsqrt({t}_ss / N + {_eps(attrs)})")
        _affine(k, t, f"{x} * {t}_rstd", args[1:], attrs)
    else:
        k.value(t, expression(op, args, attrs, consts, types), args)


def generate_looped_row_source(name: str, body, outputs, input_dtypes, input_is_row, output_dtypes,
                               lead_rank: int, wide: bool = False) -> str:
    """Like `generate_row_source` (same signature and arguments), for rows longer than a
    block: BLOCK_N is the chunk, not the row."""
    from .pointwise import _TL_DTYPES, _prelude, program_id, row_input_loads, step_types

    lines = _prelude("Generated by fxforge (codegen/row_loop.py): a fused group with row reductions, "
                     "looped over chunks of a long row.", name, len(input_dtypes), len(outputs), "N", lead_rank,
                     lead_rank + 1, "BLOCK_N", [f"    row = {program_id(wide)}"], "row")
    loads = row_input_loads(input_dtypes, input_is_row, lead_rank)
    row_loads = [line for row, line in loads if row]
    scalar_loads = [line for row, line in loads if not row]
    k = _LoopedRow(row_loads)
    k.top += scalar_loads
    k.is_row.update({f"in{i}": bool(r) for i, r in enumerate(input_is_row)})
    consts = {f"t{j}": dict(a)["value"] for j, (op, _, a) in enumerate(body) if op == "const"}
    types = step_types(body, input_dtypes)
    for j, (op, operands, attrs) in enumerate(body):
        _looped_step(k, f"t{j}", op, list(operands), dict(attrs), consts, types[j])
    stores = [(j, step, dtype) for j, (step, dtype) in enumerate(zip(outputs, output_dtypes))]
    row_stores = [f"    tl.store(out{j}_ptr + row * N + cols, {step}.to({_TL_DTYPES[dtype]}), mask=cmask)"
                  for j, step, dtype in stores if k.is_row.get(step)]
    if row_stores:
        k.top += k.chunk_loop(row_stores)
    k.top += [f"    tl.store(out{j}_ptr + row, {step}.to({_TL_DTYPES[dtype]}))"
              for j, step, dtype in stores if not k.is_row.get(step)]
    return "\n".join(lines + k.top) + "\n"
