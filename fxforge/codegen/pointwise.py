"""Triton source for a `fused_pointwise` node, composed from each op's expression template.

One program handles BLOCK elements of the flat output. Each input is read through its
strides after broadcasting to the output shape (stride 0 on broadcast dims), so inputs
need not be contiguous and are never expanded in memory. Sizes and strides are runtime
arguments: one compiled kernel serves every sequence length. Float values are computed in
float32 and rounded where the IR casts to a narrower float, as torch's eager ops would;
integers and bools keep their type, and each step's operands are converted to the dtype
torch's promotion computes it in (`step_types`: an int tensor times 2.0 is float32, an
int64 tensor compared with an int constant stays int64).

    kernels = PointwiseKernels(cache_dir)          # owned by a backend, not global
    outs = kernels.run(inputs, body=..., outputs=...)
    kernels.sources                                # name -> generated source, for dumps
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field

import torch

from ..ir.ops import OPS

_TL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
              torch.float64: "tl.float64", torch.bool: "tl.int1", torch.int64: "tl.int64", torch.int32: "tl.int32",
              torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.uint16: "tl.uint16",
              torch.uint32: "tl.uint32", torch.uint64: "tl.uint64"}

# Ops whose template needs more than a format string.
_SPECIAL = {
    "gelu": lambda a, at: (f"0.5 * {a[0]} * (1.0 + tl.erf({a[0]} * 0.7071067811865476))"
                           if at.get("approximate", "none") == "none" else
                           f"0.5 * {a[0]} * (2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * ({a[0]} + 0.044715 * "
                           f"{a[0]} * {a[0]} * {a[0]})))"),
    "clamp": lambda a, at: _clamp(a[0], at.get("min"), at.get("max")),
    "cast": lambda a, at: f"{a[0]}.to({_TL_DTYPES[at['dtype']]})" + (
        ".to(tl.float32)" if at["dtype"].is_floating_point else ""),
}


def kernel_type(dtype: torch.dtype) -> str:
    """The Triton type a value of IR dtype `dtype` has inside a generated kernel: floats
    are computed in float32 (loaded and converted), integers and bool keep their type."""
    return "tl.float32" if dtype.is_floating_point else _TL_DTYPES[dtype]


def _exact(x):
    """`x` (a spec, nested tuples) with each float as its bits: -0.0 == 0.0 and 0.0 hash alike
    in Python, so a body with `* -0.0` took the cached kernel of one with `* 0.0` (and the
    other zero's signs)."""
    if isinstance(x, float):
        return ("float", struct.pack("<d", x))
    if isinstance(x, tuple):
        return tuple(_exact(e) for e in x)
    return x


def _literal(value) -> str:
    """A float (an op's attribute: a clamp bound, an eps) as float32 Triton source. The
    value is rounded to float32 first, as torch converts a scalar to a float32 tensor's
    dtype (1e39 is inf); a float32 subnormal goes through tl.full, since Triton types a
    Python float outside float32's normal range as float64 (and would compute in it)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    value = torch.tensor(float(value), dtype=torch.float32).item()
    if math.isinf(value):
        return 'float("-inf")' if value < 0 else 'float("inf")'
    if math.isnan(value):
        return 'float("nan")'
    if value != 0 and abs(value) < torch.finfo(torch.float32).tiny:
        return f"tl.full([], {value!r}, tl.float32)"
    return _shortest(value)


def _shortest(value: float) -> str:
    """The shortest decimal that Triton rounds back to float32 `value` (0.1, not the
    float32's exact 0.10000000149011612), and types float32: within float32's normal range
    (3.4028235e38, the shortest for the largest float32, is above it: a float64 literal)."""
    finfo = torch.finfo(torch.float32)
    for digits in range(1, 18):
        number = float(f"{value:.{digits}g}")
        if (struct.unpack("f", struct.pack("f", number))[0] == value
                and (number == 0 or finfo.tiny <= abs(number) <= finfo.max)):
            return repr(number)
    return repr(value)


def _const(value, dtype: torch.dtype) -> str:
    """A const step, typed as `kernel_type(dtype)`: an integer stays an integer (a float
    literal compared int64 values in float32, where 16777217 == 16777216), a float is
    float32 (`_literal`)."""
    if dtype.is_floating_point:
        return _literal(value)
    return f"tl.full([], {int(value)}, {_TL_DTYPES[dtype]})"


def _clamp(x, lo, hi) -> str:
    # torch.clamp: NaN in x or a NaN bound gives NaN (maximum/minimum's templates keep
    # it); min > max gives max
    if lo is not None:
        x = OPS["maximum"].triton.format(x, _literal(lo))
    if hi is not None:
        x = OPS["minimum"].triton.format(x, _literal(hi))
    return x


# pow(x, c) for these constant exponents becomes multiplications / sqrt (exact enough, and
# libdevice.pow does not run in Triton's interpreter).
POW_EXPONENTS = (-2.0, -1.0, 0.5, 1.0, 2.0, 3.0, 4.0)


def _pow(x: str, c: float) -> str:
    if c == 0.5:
        return f"tl.sqrt({x})"
    n = int(abs(c))
    prod = " * ".join([x] * n)
    return f"(1.0 / ({prod}))" if c < 0 else f"({prod})"


# Ops whose operands are not converted to one dtype: each reads its operands as they are.
_OWN_OPERAND_TYPES = frozenset({"const", "cast", "logical_and", "logical_or", "logical_not", "cat", "sum", "mean",
                                "amax", "amin", "softmax", "layer_norm", "rms_norm"})
_COMPARES = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
# Arithmetic torch computes in bool (two bool operands: True + True is True) reads as
# logic: in tl.int1, 1 + 1 wraps to 0, and a signed maximum takes 1 for -1.
_BOOL_ARITHMETIC = {"add": "logical_or", "mul": "logical_and", "maximum": "logical_or", "minimum": "logical_and"}


def step_types(body, input_dtypes) -> list[tuple]:
    """Per step of `body`: (its operands' dtypes, the dtype torch computes it in or None,
    its result dtype), by the IR's type rules (torch's promotion: an int tensor and a float
    scalar compute in float32, an int32 tensor and an int scalar in int32; a comparison in
    its operands' common dtype, not its bool result). Dtypes depend on no size, only on
    which operands are 0-dim (consts), so each input stands as a [1]*8 tensor: any dim a
    step names (a reduction's, a cat's) exists."""
    from ..ir.ops import _run_body
    from ..ir.types import TensorType, promote

    out = []

    def step(op, ts, attrs):
        t = OPS[op].infer(ts, attrs)[0]
        if op in _OWN_OPERAND_TYPES:
            compute = None
        elif op in _COMPARES:
            compute = promote(*ts)
        else:
            compute = t.dtype
        out.append((tuple(x.dtype for x in ts), compute, t.dtype))
        return t

    _run_body([TensorType((1,) * 8, d) for d in input_dtypes], body, (), step)
    return out


def _convert(op: str, args: list[str], types) -> list[str]:
    """The operands converted to the kernel type of the dtype the step computes in, where
    theirs differs (an int input of a float op, a bool in arithmetic, an int64 const in an
    int32 comparison). A where's condition stays as it is."""
    dtypes, compute, _ = types
    if compute is None:
        return args
    want = kernel_type(compute)
    return [a if (op == "where" and i == 0) or kernel_type(d) == want else f"{a}.to({want})"
            for i, (a, d) in enumerate(zip(args, dtypes))]


def expression(op: str, args: list[str], attrs: dict, consts: dict | None = None, types=None) -> str:
    """Triton source for one step on operands named `args`. `types`: the step's entry of
    `step_types`, which converts operands as torch's type promotion would; without it (a
    hand-written caller) the operands are float32."""
    if op == "const":
        return _const(attrs["value"], attrs.get("dtype", torch.float32))
    exponent = args[1] if op == "pow" else None
    if types is not None and op in _COMPARES and types[1] in (torch.float16, torch.bfloat16) and consts:
        # a half comparison compares half values: eager rounds a float scalar to the half
        # dtype first, where the kernel held it in float32 (`y == 0.2`, `y > 4.4` flipped at
        # a y equal to the constant's half value). Rounded here, in Python, as torch rounds
        # (the interpreter's float32 -> bfloat16 cast truncates)
        rounded = [a in consts and not isinstance(consts[a], bool) for a in args]
        args = [_literal(torch.tensor(float(consts[a]), dtype=types[1]).item()) if r else a
                for a, r in zip(args, rounded)]
        # a literal is a number of the compute dtype now, whatever the constant's dtype was
        # (an int constant, `h > 0`, would get a `.to()` that a Python number has not)
        types = (tuple(types[1] if r else d for d, r in zip(types[0], rounded)), *types[1:])
    if types is not None:
        args = _convert(op, args, types)
        if types[1] == torch.bool:
            op = _BOOL_ARITHMETIC.get(op, op)
    if op == "pow":
        return _pow(args[0], float(consts[exponent]))
    if op == "cast" and types is not None and types[0][0] == torch.bool and attrs["dtype"].is_floating_point:
        # 0 and 1 are exact in every float dtype, and floats compute in float32 here; a bool
        # cast to bfloat16 directly fails in Triton's interpreter (numpy has no bfloat16)
        return f"{args[0]}.to(tl.float32)"
    if op in _SPECIAL:
        return _SPECIAL[op](args, attrs)
    template = OPS[op].triton
    return template.format(*args, **{k: v for k, v in attrs.items()})


# Offsets are int32 (Triton's default for program ids and aranges) unless an operand spans
# this many elements or more; then the kernel is made with int64 offsets (`wide`), a
# specialization of its own, so the usual sizes keep the cheaper 32-bit arithmetic.
INDEX_32_LIMIT = 2 ** 31


def program_id(wide: bool) -> str:
    """The program id, as int64 in a wide kernel: every offset derived from it (the
    unravelled indices, times the strides) is then computed in 64 bits."""
    return "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"


def needs_wide_index(tensors, numel: int) -> bool:
    """Whether some offset of a launch over `numel` elements reading `tensors` can pass 2**31."""
    if numel >= INDEX_32_LIMIT:
        return True
    for x in tensors:
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()) if n > 0)
        if span >= INDEX_32_LIMIT:
            return True
    return False


def _prelude(doc: str, name: str, n_in: int, n_out: int, count: str, rank: int, stride_rank: int,
             block: str, start: list[str], index: str, stores=None, part: bool = False) -> list[str]:
    """Module header, signature (pointers, sizes, strides, constexpr) and the unravelling
    of `index` over size0..size{rank-1} into idx0.., innermost dim first. `stores`: the
    outputs written into a destination buffer (`Stores`), which add their strides and the
    start offset to the signature. `part`: a function one kernel of several parts calls
    (`generate_parts_source`), its program's index in its part the first argument `pid`."""
    args = ", ".join((["pid"] if part else []) + _arguments(n_in, n_out, count, rank, stride_rank, stores)
                     + [f"{block}: tl.constexpr"])
    # a host-int start differs every token: not a value to specialise the kernel on
    specialise = stores and not stores.from_pointer and not part
    jit = "@triton.jit(do_not_specialize=[\"start\"])" if specialise else "@triton.jit"
    if stores and stores.from_pointer:
        start = start + ["    start = tl.load(start_ptr)"]
    lines = [f'"""{doc}"""', "import triton", "import triton.language as tl", "", "", jit,
             f"def {name}({args}):"] + start + [f"    rest = {index}"]
    for d in reversed(range(rank)):
        lines.append(f"    idx{d} = rest % size{d}")
        if d:
            lines.append(f"    rest = rest // size{d}")
    return lines


@dataclass(frozen=True)
class Stores:
    """The outputs of a flat kernel stored into a destination buffer instead of a fresh
    one (a fused_pointwise node's `into`: a KV cache append). Output j's element at index
    (idx0, .., idx{r-1}) goes to `out{j}_ptr + sum(idx_d * out{j}_stride{d})` with `start`
    added to the index along SEQ_DIM; `start` is a scalar argument, or with `from_pointer`
    a 0-d device tensor the kernel loads (the static decode step: no host read, and a
    CUDA graph replays it at the current length)."""
    outputs: tuple  # output positions stored into a destination
    from_pointer: bool

    SEQ_DIM = 2  # kv_append's layout: [B, Hkv, S, D]

    def arguments(self, rank: int) -> list[str]:
        strides = [f"out{j}_stride{d}" for j in self.outputs for d in range(rank)]
        return strides + ["start_ptr" if self.from_pointer else "start"]

    def store(self, j: int, value: str, dtype, rank: int) -> str | None:
        """The store of output j, if it goes into a destination."""
        if j not in self.outputs:
            return None
        index = [f"(start + idx{d})" if d == self.SEQ_DIM else f"idx{d}" for d in range(rank)]
        addr = " + ".join([f"out{j}_ptr"] + [f"{i} * out{j}_stride{d}" for d, i in enumerate(index)])
        return f"    tl.store({addr}, {value}.to({_TL_DTYPES[dtype]}), mask=mask)"


def _store_line(j: int, value: str, dtype, rank: int, stores) -> str:
    line = stores.store(j, value, dtype, rank) if stores else None
    return line or f"    tl.store(out{j}_ptr + offs, {value}.to({_TL_DTYPES[dtype]}), mask=mask)"


def _flat_pid(wide: bool, part: bool) -> str:
    if not part:
        return program_id(wide)
    return "pid.to(tl.int64)" if wide else "pid"


def generate_source(name: str, body, outputs, input_dtypes, output_dtypes, rank: int, wide: bool = False,
                    stores: Stores | None = None, part: bool = False) -> str:
    """The kernel module's text: readable, one statement per IR step."""
    lines = _prelude("Generated by fxforge (codegen/pointwise.py) for a fused_pointwise node.", name,
                     len(input_dtypes), len(outputs), "numel", rank, rank, "BLOCK",
                     [f"    offs = {_flat_pid(wide, part)} * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < numel"],
                     "offs", stores, part)
    for i, dtype in enumerate(input_dtypes):
        addr = " + ".join([f"in{i}_ptr"] + [f"idx{d} * in{i}_stride{d}" for d in range(rank)])
        conv = ".to(tl.float32)" if dtype.is_floating_point else ""
        lines.append(f"    in{i} = tl.load({addr}, mask=mask, other=0){conv}")
    consts = {f"t{k}": dict(a)["value"] for k, (op, _, a) in enumerate(body) if op == "const"}
    types = step_types(body, input_dtypes)
    for k, (op, operands, attrs) in enumerate(body):
        lines.append(f"    t{k} = {expression(op, list(operands), dict(attrs), consts, types[k])}")
    for j, (step, dtype) in enumerate(zip(outputs, output_dtypes)):
        lines.append(_store_line(j, step, dtype, rank, stores))
    return "\n".join(lines) + "\n"


def generate_gather_source(name: str, body, outputs, input_dtypes, output_dtypes, rank: int, widths,
                           wide: bool = False, stores: Stores | None = None, part: bool = False) -> str:
    """The flat kernel for a body with cats along the last dim (`widths[k]`: the last-dim
    sizes of step k's operands if it is such a cat, else None). A value is computed at an
    index context: the output's index (`idx*`, `mask`), or inside an operand of a cat, the
    same leading indices and the last one shifted by the operand's offset, masked to its
    range. Each step is written once per context it is needed in, so a cat's operands are
    computed (and their inputs loaded) only under it; `tl.where` picks, per element, the
    operand that covers its last index. Same ops in the same order as eager: exact."""
    lines = _prelude("Generated by fxforge (codegen/pointwise.py) for a fused_pointwise node with cats.", name,
                     len(input_dtypes), len(outputs), "numel", rank, rank, "BLOCK",
                     [f"    offs = {_flat_pid(wide, part)} * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < numel"],
                     "offs", stores, part)
    emit = _IndexedSteps(body, input_dtypes, rank, widths, lines)
    for j, (step, dtype) in enumerate(zip(outputs, output_dtypes)):
        value = emit.value(step, emit.root)
        lines.append(_store_line(j, value, dtype, rank, stores))
    return "\n".join(lines) + "\n"


def generate_parts_source(name: str, parts) -> str:
    """One kernel for independent flat groups of different index spaces (shapes): each part
    is a function of its own (`generate_source` or `generate_gather_source` with `part`),
    and the kernel's programs are dealt out in order, the first cdiv(numel0, BLOCK) to part
    0, the next to part 1, and so on. `parts`: per part (widths or None, body, outputs,
    input dtypes, output dtypes, rank, wide, stores); each part's arguments are its
    function's, prefixed p<n>_."""
    lines = ['"""Generated by fxforge (codegen/pointwise.py): independent groups of different shapes, one launch."""',
             "import triton", "import triton.language as tl"]
    main_args, calls, unspecialised = [], [], []
    for n, (widths, body, outputs, in_dtypes, out_dtypes, rank, wide, stores) in enumerate(parts):
        fn = f"{name}_part{n}"
        if widths is None:
            src = generate_source(fn, body, outputs, in_dtypes, out_dtypes, rank, wide, stores, part=True)
        else:
            src = generate_gather_source(fn, body, outputs, in_dtypes, out_dtypes, rank, widths, wide, stores,
                                         part=True)
        src_lines = src.splitlines()
        lines += ["", ""] + src_lines[src_lines.index("@triton.jit"):]
        args = [f"p{n}_{a}" for a in part_arguments(len(in_dtypes), len(outputs), rank, stores)]
        main_args += args
        calls.append((fn, args))
        if stores and not stores.from_pointer:
            unspecialised.append(f"p{n}_start")
    jit = f"@triton.jit(do_not_specialize={unspecialised!r})" if unspecialised else "@triton.jit"
    lines += ["", "", jit, f"def {name}({', '.join(main_args + ['BLOCK: tl.constexpr'])}):",
              "    pid = tl.program_id(0)", "    end0 = tl.cdiv(p0_numel, BLOCK)"]
    lines += [f"    end{n} = end{n - 1} + tl.cdiv(p{n}_numel, BLOCK)" for n in range(1, len(calls) - 1)]
    for n, (fn, args) in enumerate(calls):
        call = f"{fn}({f'pid - end{n - 1}' if n else 'pid'}, {', '.join(args)}, BLOCK)"
        if n == 0:
            lines.append("    if pid < end0:")
        else:
            lines.append("    else:" if n == len(calls) - 1 else f"    elif pid < end{n}:")
        lines.append(f"        {call}")
    return "\n".join(lines) + "\n"


def _arguments(n_in: int, n_out: int, count: str, rank: int, stride_rank: int, stores) -> list[str]:
    """A generated kernel's arguments between `pid` (a part's) and the block constexpr:
    pointers, the element count, sizes, input strides, then the stores' strides and start."""
    return ([f"in{i}_ptr" for i in range(n_in)] + [f"out{i}_ptr" for i in range(n_out)] + [count]
            + [f"size{d}" for d in range(rank)] + [f"in{i}_stride{d}" for i in range(n_in) for d in range(stride_rank)]
            + (stores.arguments(rank) if stores else []))


def part_arguments(n_in: int, n_out: int, rank: int, stores) -> list[str]:
    """A flat kernel's arguments after `pid`, before BLOCK, as `_prelude` writes them."""
    return _arguments(n_in, n_out, "numel", rank, rank, stores)


def body_parts(body, outputs, shapes) -> list[tuple[list[int], list[int]]]:
    """The parts of a body whose outputs differ in shape (`shapes`, one per output): (its
    steps, the positions of its outputs) for each set of steps connected through their
    operands that makes an output, those of one output shape together, in body order."""
    parent = list(range(len(body)))

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k, (_, args, _) in enumerate(body):
        for a in args:
            if a.startswith("t"):
                parent[root(int(a[1:]))] = root(k)
    shape_of = {}
    for j, o in enumerate(outputs):
        if shape_of.setdefault(root(int(o[1:])), shapes[j]) != shapes[j]:
            raise ValueError(f"fused_pointwise: connected steps give outputs of shapes {shape_of[root(int(o[1:]))]} "
                             f"and {shapes[j]}; a flat kernel computes one shape")
    parts: dict = {}
    for j, o in enumerate(outputs):
        parts.setdefault(shape_of[root(int(o[1:]))], ([], []))[1].append(j)
    for k in range(len(body)):
        if root(k) in shape_of:
            parts[shape_of[root(k)]][0].append(k)
    return sorted(parts.values(), key=lambda p: p[0][0])


class _IndexedSteps:
    """Writes the statements for a step's value at an index context (last index, mask)."""

    def __init__(self, body, input_dtypes, rank, widths, lines):
        self.body, self.input_dtypes, self.rank, self.widths, self.lines = body, input_dtypes, rank, widths, lines
        self.types = step_types(body, input_dtypes)
        self.root = (f"idx{rank - 1}", "mask", "")
        self.names: dict[tuple, str] = {}
        self.contexts: dict[tuple, tuple] = {}
        self.consts: dict[str, object] = {}  # name -> value of each const written (pow reads them)

    def context(self, parent, offset: int, width: int) -> tuple:
        key = (parent, offset, width)
        ctx = self.contexts.get(key)
        if ctx is None:
            c = f"c{len(self.contexts)}"
            last, ok, _ = parent
            self.lines.append(f"    {c}_last = {last} - {offset}")
            self.lines.append(f"    {c}_ok = {ok} & ({last} >= {offset}) & ({last} < {offset + width})")
            ctx = self.contexts[key] = (f"{c}_last", f"{c}_ok", f"_{c}")
        return ctx

    def value(self, ref: str, ctx) -> str:
        key = (ref, ctx)
        if key in self.names:
            return self.names[key]
        last, ok, suffix = ctx
        name = ref + suffix
        if ref.startswith("in"):
            i = int(ref[2:])
            addr = " + ".join([f"in{i}_ptr"] + [f"idx{d} * in{i}_stride{d}" for d in range(self.rank - 1)]
                              + [f"{last} * in{i}_stride{self.rank - 1}"])
            conv = ".to(tl.float32)" if self.input_dtypes[i].is_floating_point else ""
            self.lines.append(f"    {name} = tl.load({addr}, mask={ok}, other=0){conv}")
        else:
            k = int(ref[1:])
            op, operands, attrs = self.body[k]
            if op == "cat":
                expr = self._cat(operands, self.widths[k], ctx)
            else:
                args = [self.value(a, ctx) for a in operands]
                if op == "const":
                    self.consts[name] = dict(attrs)["value"]
                expr = expression(op, args, dict(attrs), self.consts, self.types[k])
            self.lines.append(f"    {name} = {expr}")
        self.names[key] = name
        return name

    def _cat(self, operands, widths, ctx) -> str:
        values, ends, offset = [], [], 0
        for operand, width in zip(operands, widths):
            values.append(self.value(operand, self.context(ctx, offset, width)))
            offset += width
            ends.append(offset)
        expr = values[-1]
        for v, end in zip(reversed(values[:-1]), reversed(ends[:-1])):
            expr = f"tl.where({ctx[0]} < {end}, {v}, {expr})"
        return expr


def cat_widths(inputs, body) -> tuple | None:
    """Per step of `body` run on `inputs`: the last-dim sizes of a cat's operands, else
    None; None overall when the body has no cat."""
    if not any(op == "cat" for op, _, _ in body):
        return None
    from ..ir.ops import _run_body

    types = [_type_of(x) for x in inputs]
    steps = _run_body(types, body, [f"t{k}" for k in range(len(body))], lambda op, ts, a: OPS[op].infer(ts, a)[0])
    typeof = lambda a: types[int(a[2:])] if a.startswith("in") else steps[int(a[1:])]  # noqa: E731
    return tuple(tuple(int(typeof(a).shape[-1]) for a in args) if op == "cat" else None for op, args, _ in body)


def _row_step(k: int, op: str, args: list[str], attrs: dict, consts: dict, is_row: dict, types) -> list[str]:
    """Statements for one step of a row kernel. Reductions mask the padded tail of the
    row (cols >= N) so it never counts."""
    t = f"t{k}"
    x = args[0] if args else None
    if op in ("sum", "mean", "amax", "amin"):
        is_row[t] = False
        if op in ("amax", "amin"):
            fill = 'float("-inf")' if op == "amax" else 'float("inf")'
            fn = "tl.max" if op == "amax" else "tl.min"
            # NaN if the row holds one, as torch.amax (tl.max skips NaN)
            return [f"    {t} = {fn}(tl.where(cmask, {x}, {fill}), axis=0)",
                    f"    {t} = tl.where(tl.max((cmask & ({x} != {x})).to(tl.int32), axis=0) > 0, float(\"nan\"), {t})"]
        total = f"tl.sum(tl.where(cmask, {x}, 0.0), axis=0)"
        return [f"    {t} = {total}" + (" / N" if op == "mean" else "")]
    if op == "softmax":
        is_row[t] = True
        return [f"    {t}_max = tl.max(tl.where(cmask, {x}, float('-inf')), axis=0)",
                f"    {t}_exp = tl.where(cmask, tl.exp({x} - {t}_max), 0.0)",
                f"    {t} = {t}_exp / tl.sum({t}_exp, axis=0)"]
    if op in ("layer_norm", "rms_norm"):
        is_row[t] = True
        rest = args[1:]
        eps = attrs.get("eps")
        eps = _literal(eps if eps is not None else float(torch.finfo(torch.float32).eps))
        if op == "layer_norm":
            lines = [f"    {t}_mean = tl.sum(tl.where(cmask, {x}, 0.0), axis=0) / N",
                     f"    {t}_c = tl.where(cmask, {x} - {t}_mean, 0.0)",
                     f"    {t} = {t}_c * tl.rsqrt(tl.sum({t}_c * {t}_c, axis=0) / N + {eps})"]
        else:
            lines = [f"    {t}_sq = tl.where(cmask, {x} * {x}, 0.0)",
                     f"    {t} = {x} * tl.rsqrt(tl.sum({t}_sq, axis=0) / N + {eps})"]
        if attrs.get("weight"):
            lines.append(f"    {t} = {t} * {rest[0]}")
        if attrs.get("bias"):
            lines.append(f"    {t} = {t} + {rest[-1]}")
        return lines
    is_row[t] = any(is_row.get(a, False) for a in args)
    return [f"    {t} = {expression(op, args, attrs, consts, types)}"]


def row_input_loads(input_dtypes, input_is_row, lead_rank: int) -> list[tuple[bool, str]]:
    """Per input of a row kernel: (is it a whole row, its load line). A row input loads the
    columns `cols` of this program's row; any other input one value (broadcast)."""
    out = []
    for i, dtype in enumerate(input_dtypes):
        base = " + ".join([f"in{i}_ptr"] + [f"idx{d} * in{i}_stride{d}" for d in range(lead_rank)])
        conv = ".to(tl.float32)" if dtype.is_floating_point else ""
        if input_is_row[i]:
            out.append((True, f"    in{i} = tl.load({base} + cols * in{i}_stride{lead_rank}, mask=cmask, other=0){conv}"))
        else:
            out.append((False, f"    in{i} = tl.load({base}){conv}"))
    return out


def generate_row_source(name: str, body, outputs, input_dtypes, input_is_row, output_dtypes, lead_rank: int,
                        wide: bool = False) -> str:
    """A kernel that holds one row of length N per program: the prologue, the row
    reductions and the epilogue of a fused group run on that row in registers."""
    lines = _prelude("Generated by fxforge (codegen/pointwise.py): a fused group with row reductions.", name,
                     len(input_dtypes), len(outputs), "N", lead_rank, lead_rank + 1, "BLOCK_N",
                     [f"    row = {program_id(wide)}", "    cols = tl.arange(0, BLOCK_N)", "    cmask = cols < N"],
                     "row")
    is_row: dict[str, bool] = {}
    for i, (row, line) in enumerate(row_input_loads(input_dtypes, input_is_row, lead_rank)):
        lines.append(line)
        is_row[f"in{i}"] = row
    consts = {f"t{k}": dict(a)["value"] for k, (op, _, a) in enumerate(body) if op == "const"}
    types = step_types(body, input_dtypes)
    for k, (op, operands, attrs) in enumerate(body):
        lines += _row_step(k, op, list(operands), dict(attrs), consts, is_row, types[k])
    for j, (step, dtype) in enumerate(zip(outputs, output_dtypes)):
        if is_row.get(step):
            lines.append(f"    tl.store(out{j}_ptr + row * N + cols, {step}.to({_TL_DTYPES[dtype]}), mask=cmask)")
        else:
            lines.append(f"    tl.store(out{j}_ptr + row, {step}.to({_TL_DTYPES[dtype]}))")
    return "\n".join(lines) + "\n"


# A row of up to ROW_BLOCK_MAX elements is held whole in one block; a longer one would spill
# (kilobytes per thread at 8k+, docs/gpu-compile.md), so it is looped in chunks of ROW_CHUNK.
ROW_BLOCK_MAX = 4096
ROW_CHUNK = 1024


def row_is_looped(n: int) -> bool:
    return n > ROW_BLOCK_MAX


def row_block(n: int) -> int:
    """BLOCK_N of the row kernel for rows of n elements: the row, or the chunk of a loop."""
    return ROW_CHUNK if row_is_looped(n) else 1 << max(0, (n - 1).bit_length())


def _triton_type(x) -> str:
    """A launch argument's type in triton.compile's signature notation."""
    if isinstance(x, torch.Tensor):
        floats = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.bool: "i1"}
        return "*" + (floats.get(x.dtype) or _TL_DTYPES[x.dtype].replace("tl.int", "i").replace("tl.uint", "u"))
    return "fp32" if isinstance(x, float) else "i32"


# Launch plans kept per kernel family: one per node and input signature, so a server that
# sees every prompt length would keep adding them; past this many the oldest quarter goes
# (made again if asked for: the plan is a pure function of its key)
MAX_PLANS = 4096


def remember(plans: dict, key, plan) -> None:
    """plans[key] = plan, dropping the oldest quarter of `plans` (insertion order) first
    when it holds MAX_PLANS."""
    if len(plans) >= MAX_PLANS:
        for old in list(plans)[:MAX_PLANS // 4]:
            del plans[old]
    plans[key] = plan


class PointwiseKernels:
    """Generated kernels, cached in memory and on disk by a hash of their source (Triton
    reads a kernel's source from its file, so each one is written to `cache_dir`)."""

    BLOCK = 1024

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "fxforge_kernels")
        self.sources: dict[str, str] = {}
        self._compiled: dict[tuple, object] = {}
        # name, BLOCK -> {"path", "name", "signature", "constexprs"} of each distinct launch, so
        # the generated kernels of a model can be compiled ahead of time (codegen/gpu_compile.py)
        self.launches: dict[tuple, dict] = {}
        self._plans: dict[tuple, _LaunchPlan] = {}  # launch signature -> what the launch needs

    def kernel(self, generate, *spec):
        """The compiled kernel for `generate(name, *spec)`, made once per distinct source."""
        key = (generate.__name__,) + tuple(_exact(tuple(x) if isinstance(x, list) else x) for x in spec)
        fn = self._compiled.get(key)
        if fn is None:
            probe = generate("kernel", *spec)
            name = "fused_" + hashlib.sha1(probe.encode()).hexdigest()[:12]
            source = generate(name, *spec)
            fn = self._load(name, source)
            self.sources[name] = source
            self._compiled[key] = fn
        return fn

    def _load(self, name: str, source: str):
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"{name}.py")
        if not os.path.exists(path):
            # a temp file of its own per writer (threads of one process share a pid), then
            # an atomic rename: a reader sees no file or the whole one
            fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=self.cache_dir)
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache's kernels from other users
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"fxforge_kernels.{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)

    def run(self, *inputs, body, outputs, row=None, into=(), start=None):
        """Run a fused_pointwise node's kernel. What a launch needs besides the tensors (the
        kernel, output shapes and dtypes, strides, grid) depends only on the inputs' shapes,
        strides and dtypes, so it is worked out once per such signature and kept: a decode
        step calls each fused node with the same signature every time, and redoing the IR
        type inference and the broadcast per call was most of the wrapper's host time.

        `into` ((output k, input i) pairs, the destinations the last inputs): output k is
        stored by the kernel into cache i at `start` along dim 2, and what comes back for
        it is kv_append's result: the filled prefix, or with `start` a 0-d device tensor
        (the static decode step) the rows' whole buffer."""
        if into:
            inputs, dests = inputs[:-len(into)], inputs[-len(into):]
            from_pointer = isinstance(start, torch.Tensor)
            signature = (id(body), id(outputs), row, into, from_pointer,
                         tuple((x.shape, x.stride(), x.dtype) for x in inputs),
                         tuple((d.shape, d.stride(), d.dtype) for d in dests))
        else:
            dests, from_pointer = (), False
            signature = (id(body), id(outputs), row, tuple((x.shape, x.stride(), x.dtype) for x in inputs))
        plan = self._plans.get(signature)
        if plan is None or plan.body is not body or plan.outputs is not outputs:
            plan = (_Float64Plan(body, outputs) if _computes_in_float64(inputs, dests, body) else
                    self._plan(inputs, body, outputs, row, into, dests, from_pointer))
            remember(self._plans, signature, plan)
        if isinstance(plan, _Float64Plan):  # eager's float64 arithmetic, step by step
            return OPS["fused_pointwise"].reference(*inputs, *dests, body=body, outputs=outputs, row=row, into=into,
                                                    start=start)
        device = inputs[0].device
        outs = [torch.empty(spec[0], dtype=spec[1], device=device) if spec else None for spec in plan.out_specs]
        extra = ()
        if into:
            for (k, _), dest in zip(into, dests):  # the kernel writes where it is told: check the bounds here
                b, t = plan.store_shapes[k][0], plan.store_shapes[k][2]
                if b > dest.shape[0] or (not from_pointer and start + t > dest.shape[2]):
                    raise ValueError(f"fused_pointwise: the KV cache holds {dest.shape[0]} rows of {dest.shape[2]} "
                                     f"positions, but rows 0..{b - 1} at {start} + {t} are needed")
                outs[k] = dest
            extra = (start,)
        if plan.grid is not None:
            args = (*inputs, *outs, *plan.scalars, *extra) if plan.parts is None else plan.arguments(inputs, outs, start)
            plan.fn[plan.grid](*args, **plan.constexprs)
        if into:  # what kv_append returns
            for k, _ in into:
                b, t = plan.store_shapes[k][0], plan.store_shapes[k][2]
                outs[k] = outs[k][:b] if from_pointer else outs[k][:b, :, :start + t]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _plan(self, inputs, body, outputs, row, into=(), dests=(), from_pointer=False) -> "_LaunchPlan":
        import triton

        types = OPS["fused_pointwise"].infer([_type_of(x) for x in inputs], {"body": body, "outputs": outputs})
        if row is None and len({tuple(t.shape) for t in types}) > 1:
            # (before any broadcast of all the inputs: the parts' inputs need not broadcast
            # together, e.g. rotary q and K of a GQA layer, 4 and 2 heads)
            return self._plan_parts(inputs, body, outputs, types, into, dests, from_pointer)
        widths = cat_widths(inputs, body)
        if widths is None:
            shape = tuple(torch.broadcast_shapes(*(x.shape for x in inputs)))
        else:  # the operands of a cat are narrower than the output: no common broadcast
            shape = tuple(int(d) for d in types[0].shape)
        out_dtypes = [t.dtype for t in types]
        if row is not None:
            if into:
                raise ValueError("fused_pointwise: a row kernel cannot store into a destination")
            return self._plan_rows(inputs, body, outputs, shape, types, out_dtypes)
        kshape = shape or (1,)  # a 0-dim result runs as one element
        numel = math.prod(kshape)
        wide = needs_wide_index([*inputs, *dests], numel)
        stores = None
        if into:
            if len(kshape) != 4:
                raise ValueError(f"fused_pointwise: into stores [B, Hkv, T, D] values, not {tuple(kshape)}")
            stores = Stores(tuple(k for k, _ in into), from_pointer)
            for (k, _), dest in zip(into, dests):
                out_dtypes[k] = dest.dtype  # the cache's dtype, as kv_append's copy converts
        if widths is None:
            fn = self.kernel(generate_source, body, outputs, [x.dtype for x in inputs], out_dtypes, len(kshape), wide,
                             stores)
            strides = [s for x in inputs for s in (x.expand(shape).stride() if shape else (0,))]
        else:
            fn = self.kernel(generate_gather_source, body, outputs, [x.dtype for x in inputs], out_dtypes,
                             len(kshape), widths, wide, stores)
            strides = [s for x in inputs for s in _strides_under(x, shape)]
        strides += [s for dest in dests for s in dest.stride()]
        scalars = [numel, *kshape, *strides]
        constexprs = {"BLOCK": self.BLOCK}
        stored = {k for k, _ in into}
        out_specs = [(shape, d) if j not in stored else None for j, d in enumerate(out_dtypes)]
        grid = (triton.cdiv(numel, self.BLOCK),) if numel else None
        if grid is not None:
            start_arg = [torch.empty(0, dtype=torch.int64)] if from_pointer else ([0] if into else [])
            self._record(fn, [*inputs, *(torch.empty(0, dtype=d) for d in out_dtypes), *scalars, *start_arg],
                         constexprs)
        return _LaunchPlan(body, outputs, fn, out_specs, scalars, constexprs, grid,
                           {k: tuple(kshape) for k, _ in into})

    def _plan_parts(self, inputs, body, outputs, types, into, dests, from_pointer) -> "_LaunchPlan":
        """A flat body whose outputs differ in shape: independent parts (`body_parts`), each
        a flat kernel of its own shape, in one launch (`generate_parts_source`)."""
        import triton

        stored = {k: n for n, (k, _) in enumerate(into)}  # output -> its destination's place in dests
        specs, layout, out_specs, store_shapes, programs = [], [], [None] * len(outputs), {}, 0
        for steps, outs in body_parts(body, outputs, [tuple(t.shape) for t in types]):
            local = list(dict.fromkeys(int(a[2:]) for k in steps for a in body[k][1] if a.startswith("in")))
            ref = lambda a: f"in{local.index(int(a[2:]))}" if a.startswith("in") else f"t{steps.index(int(a[1:]))}"  # noqa: E731
            part_body = tuple((op, tuple(ref(a) for a in args), attrs) for op, args, attrs in (body[k] for k in steps))
            part_outputs = tuple(ref(outputs[j]) for j in outs)
            part_inputs = [inputs[i] for i in local]
            part_dests = [dests[stored[j]] for j in outs if j in stored]
            shape = tuple(int(d) for d in types[outs[0]].shape)
            kshape = shape or (1,)
            if part_dests and len(kshape) != 4:
                raise ValueError(f"fused_pointwise: into stores [B, Hkv, T, D] values, not {kshape}")
            widths = cat_widths(part_inputs, part_body)
            if widths is None:
                strides = [s for x in part_inputs for s in (x.expand(shape).stride() if shape else (0,))]
            else:
                strides = [s for x in part_inputs for s in _strides_under(x, shape)]
            strides += [s for dest in part_dests for s in dest.stride()]
            numel = math.prod(kshape)
            stores = Stores(tuple(n for n, j in enumerate(outs) if j in stored), from_pointer) if part_dests else None
            out_dtypes = tuple(dests[stored[j]].dtype if j in stored else types[j].dtype for j in outs)
            specs.append((widths, part_body, part_outputs, tuple(x.dtype for x in part_inputs), out_dtypes,
                          len(kshape), needs_wide_index(part_inputs + part_dests, numel), stores))
            layout.append((tuple(local), tuple(outs), [numel, *kshape, *strides], stores is not None))
            for j in outs:
                if j in stored:
                    store_shapes[j] = kshape
                else:
                    out_specs[j] = (shape, types[j].dtype)
            programs += triton.cdiv(numel, self.BLOCK)
        fn = self.kernel(generate_parts_source, tuple(specs))
        constexprs = {"BLOCK": self.BLOCK}
        grid = (programs,) if programs else None
        plan = _LaunchPlan(body, outputs, fn, out_specs, [], constexprs, grid, store_shapes, layout)
        if grid is not None:
            dtypes = [dests[stored[j]].dtype if j in stored else types[j].dtype for j in range(len(outputs))]
            start = torch.empty(0, dtype=torch.int64) if from_pointer else 0
            self._record(fn, plan.arguments(inputs, [torch.empty(0, dtype=d) for d in dtypes], start), constexprs)
        return plan

    def _record(self, fn, args, constexprs):
        name = fn.__name__
        signature = {a: _triton_type(x) for a, x in zip(fn.arg_names, args)}
        signature.update({k: "constexpr" for k in constexprs})
        self.launches[(name,) + tuple(constexprs.values())] = {
            "path": os.path.join(self.cache_dir, f"{name}.py"), "name": name,
            "signature": signature, "constexprs": dict(constexprs)}

    def _plan_rows(self, inputs, body, outputs, shape, types, out_dtypes):
        from .row_loop import generate_looped_row_source

        n = shape[-1]
        lead = shape[:-1]
        out_specs = [(tuple(int(d) for d in t.shape), t.dtype) for t in types]
        full = [x.dim() > 0 and x.shape[-1] == n and n > 1 for x in inputs]
        generate = generate_looped_row_source if row_is_looped(n) else generate_row_source
        wide = needs_wide_index(inputs, math.prod(shape))
        fn = self.kernel(generate, body, outputs, [x.dtype for x in inputs], full, out_dtypes, len(lead), wide)
        strides = []
        for x, is_row in zip(inputs, full):
            strides += list(x.expand(lead + ((n,) if is_row else (1,))).stride())
        rows = math.prod(lead)
        scalars = [n, *lead, *strides]
        constexprs = {"BLOCK_N": row_block(n)}
        grid = (rows,) if rows else None
        if grid is not None:
            self._record(fn, [*inputs, *(torch.empty(0, dtype=d) for _, d in out_specs), *scalars], constexprs)
        return _LaunchPlan(body, outputs, fn, out_specs, scalars, constexprs, grid)


def _computes_in_float64(inputs, dests, body) -> bool:
    """Whether torch computes some step of the group in float64: a float64 operand, cache,
    constant or cast. The generated kernels compute in float32 (their literals are float32
    too), so such a group runs its PyTorch steps instead (`_Float64Plan`)."""
    if any(x.dtype == torch.float64 for x in (*inputs, *dests)):
        return True
    return any(value is torch.float64 for _, _, attrs in body for key, value in attrs if key == "dtype")


@dataclass
class _Float64Plan:
    """The plan of a group `_computes_in_float64`: no kernel, the reference steps."""
    body: tuple
    outputs: tuple


@dataclass
class _LaunchPlan:
    """One fused node's launch at one input signature: all but the tensors."""
    body: tuple
    outputs: tuple
    fn: object
    out_specs: list  # (shape, dtype) of each output
    scalars: list  # sizes and strides, after the tensors
    constexprs: dict
    grid: tuple | None  # None: nothing to compute (an empty tensor)
    store_shapes: dict = field(default_factory=dict)  # output stored into a cache -> its value's shape
    # a kernel of several parts: per part (its inputs, its outputs, its scalars, takes start)
    parts: list | None = None

    def arguments(self, inputs, outs, start) -> list:
        """The launch arguments of a kernel of several parts, part after part."""
        args = []
        for ins, out_ids, scalars, takes_start in self.parts:
            args += [inputs[i] for i in ins] + [outs[j] for j in out_ids] + scalars
            if takes_start:
                args.append(start)
        return args


def _strides_under(x: torch.Tensor, shape: tuple) -> list[int]:
    """x's strides as an operand at an index of `shape`'s leading dims and its own last
    index (x may be narrower than `shape` there: a cat's operand). Size-1 dims get stride 0,
    so a broadcast operand reads its one element at any index."""
    target = tuple(shape[:-1]) + ((x.shape[-1] if x.dim() else 1),)
    e = x.expand(target)
    return [0 if n == 1 else st for n, st in zip(target, e.stride())]


def _type_of(x: torch.Tensor):
    from ..ir.types import TensorType

    return TensorType(tuple(x.shape), x.dtype)
