"""Decode GEMV for `linear_fused` (ir/linear_fused.py): a float linear over a few rows (M <= 16,
a decode step) with its pointwise prologue and epilogue in one generated Triton kernel.

Each program owns BLOCK_N output columns of BLOCK_M rows (the grid is over N first: at M = 1
a narrow BLOCK_N gives enough programs to fill a GPU, e.g. 240 for SmolLM2's merged q/k/v)
and walks K in chunks of BLOCK_K:
  - prologue: the row statistics (a mean of squares, a max ...) are recomputed by every
    program in passes over x before the product (row_loop's chunked steps, on
    [BLOCK_M, BLOCK_K] tiles; K <= 8192 makes that a few microseconds), then each chunk of
    x is the prologue's row body applied to the chunk, rounded to x's dtype as the unfused
    kernel stored it. The programs of the first column block also store the prologue's
    extra outputs (the residual sum), each element exactly once;
  - product: contiguous, vectorised loads of [BLOCK_N, BLOCK_K] weight tiles, fp32 products
    and fp32 accumulation (no tl.dot: M is too small for tensor cores to matter, and the
    interpreter's bf16 dot is wrong). An epilogue over P column ranges of the output (SwiGLU's
    gate and up halves) keeps P accumulators: output column j needs weight rows start_p + j;
  - epilogue: bias, rounding to the output dtype (what the unfused linear stored), then the
    epilogue body, composed from pointwise.expression as in any fused_pointwise kernel.
A quantized linear (linear_fused with parts/qattrs, QUANT_SCHEMES): the weight tiles are
int8 rows with a float32 scale per output channel applied after the sum. For w8a8 a pass
over K before the product (the prologue's row replayed, as for the statistics) finds each
row's outliers (its entries with |x| > threshold, per token) and its amax of the inliers;
the product quantizes the inliers per token exactly as quant_formats.w8a8_split_activations
(div_rn, round half to even, clamp) and sums the int8 products in int32 (exact), the
outliers in float32 (only in chunks that have one).
No split over K: the partial sums would need a second launch or atomics before a nonlinear
epilogue, and a narrow BLOCK_N already gives hundreds of programs at SmolLM2's widths.

With a down projection (down=true) the same kernel goes on through the MLP's down linear:
codegen/kernels/decode_mlp.py.

    kernels = GemvKernels(pointwise_kernels)     # compiles through the backend's PointwiseKernels
    outs = kernels.run(*tensors, **linear_fused_attrs)     # None: not a GEMV shape (use compose)
    decode_gemv_reference(*tensors, **attrs)     # the torch reference (the op's composition)
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from ...ir.linear_fused import linear_fused_reference, quantized, split_down, split_inputs
from ..pointwise import _TL_DTYPES, expression, needs_wide_index, remember, step_types
from ..row_loop import _LoopedRow, _looped_step

MAX_ROWS = 16  # rows (M) the GEMV takes; more is a GEMM: the composition runs (cuBLAS)
# target programs at M = 1: about four per SM of an H100 (132); narrower tiles also spilled
# less (BLOCK_N=32 spilled 8 B on sm_90 for bf16 K=4096 with SwiGLU)
TARGET_PROGRAMS = 512
# elements of one [BLOCK_M, BLOCK_N, BLOCK_K] product tile: 16 fp32 registers per thread at 4 warps
# (4096 took 128-168 registers and spilled on sm_80 at 16 rows; the AOT sweep in gpu_specs)
PRODUCT_TILE = 2048
MAX_BLOCK_K = 256

decode_gemv_reference = linear_fused_reference


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def launch_blocks(m: int, n_out: int, k: int, parts: int = 1, interpret: bool = False) -> dict:
    """BLOCK_M, BLOCK_N, BLOCK_K of a launch: all rows in one block, columns narrow enough
    that about TARGET_PROGRAMS programs run, and a K chunk that keeps the product tile of
    every column range (`parts`) within PRODUCT_TILE elements. Interpreted (CPU tests), where
    each program costs milliseconds of Python and registers do not exist: wide tiles."""
    block_m = _pow2_at_least(m)
    if interpret:
        return {"BLOCK_M": block_m, "BLOCK_N": min(128, _pow2_at_least(n_out)), "BLOCK_K": min(128, _pow2_at_least(k))}
    block_n = max(4, min(32, _pow2_at_most(max(1, n_out // TARGET_PROGRAMS))))
    block_k = max(16, min(MAX_BLOCK_K, _pow2_at_least(k), PRODUCT_TILE // (block_m * block_n * parts)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}


class _TileRow(_LoopedRow):
    """row_loop's chunked row program on [BLOCK_M, BLOCK_K] tiles: `rows` is [BLOCK_M, 1],
    `cols` [1, BLOCK_K]; a statistic is reduced along axis 1 into [BLOCK_M, 1]."""

    def chunk_loop(self, tail: list[str]) -> list[str]:
        head = ["    for start in range(0, N, BLOCK_K):", "        cols = start + tl.arange(0, BLOCK_K)[None, :]",
                "        cmask = rmask & (cols < N)"]
        return head + ["    " + line for line in self.chunk + tail]

    def reduce(self, name: str, kind: str, x: str) -> None:
        from ..row_loop import _ACCUMULATE, _FILL, _FINISH

        acc = f"{name}_acc"
        self.top.append(f"    {acc} = tl.full([BLOCK_M, BLOCK_K], {_FILL[kind]}, tl.float32)")
        self.top += self.chunk_loop([f"    {acc} = {_ACCUMULATE[kind].format(acc=acc, x=x)}"])
        self.top.append(f"    {name} = {_FINISH[kind].format(acc=acc, axis=1, fn=kind)}[:, None]")
        self.is_row[name] = False


@dataclass(frozen=True)
class GemvSpec:
    """What the generated source depends on (the kernel cache key)."""
    prologue: tuple  # body, () for none
    prologue_outputs: tuple
    x_is_row: tuple  # per x input: a whole row ([..., K]) or one value per row ([..., 1])
    x_dtypes: tuple
    x_dtype: torch.dtype  # the linear's input dtype (x is rounded to it)
    w_dtype: torch.dtype
    bias: bool
    columns: int  # P: the column ranges the epilogue reads
    epilogue: tuple
    epilogue_outputs: tuple
    e_dtypes: tuple
    out_dtypes: tuple  # the epilogue's results (or y's)
    side_dtypes: tuple  # the prologue's extra results
    side_is_row: tuple
    # the down projection (down=true: codegen/kernels/decode_mlp.py); out_dtypes is then its
    # result's, mid_dtype the epilogue result's (what it reads)
    down: bool = False
    down_bias: bool = False
    mid_dtype: torch.dtype | None = None
    # a quantized linear (QUANT_SCHEMES): int8 weight rows and a float32 scale per output
    # channel; w8a8 also quantizes x per token (outliers: columns above a threshold in float)
    quant: str | None = None
    outliers: bool = False


# formats the kernel implements (passes/fuse_linear_pointwise.QUANT_SCHEMES fuses these only)
QUANT_SCHEMES = ("w8a8", "int8")
TINY = 1.1754943508222875e-38  # quant_formats' floor of a per-token scale (an all-zero row)


def generate_gemv_source(name: str, spec: GemvSpec) -> str:
    """The kernel module's text. Arguments: the prologue's inputs (x itself without one), the
    weight, the bias, the epilogue's inputs, [the down weight and bias,] the results, the
    prologue's extra results, [the partials and counters;] M, K, N_OUT (the epilogue's
    columns), the first weight row of each column range; the strides of each input as a
    [rows, columns] matrix; [H, PROGRAMS, GROUP and the down weight's strides;] the block
    constexprs. With a down projection the results are its [M, H] (decode_mlp.py)."""
    n_x, n_e, n_out, n_side = len(spec.x_dtypes), len(spec.e_dtypes), len(spec.out_dtypes), len(spec.side_dtypes)
    pointers = ([f"in{i}_ptr" for i in range(n_x)] + ["w_ptr"] + (["ws_ptr"] if spec.quant else [])
                + (["b_ptr"] if spec.bias else [])
                + [f"e{i}_ptr" for i in range(n_e)] + (["dw_ptr"] if spec.down else [])
                + (["db_ptr"] if spec.down_bias else []) + [f"out{i}_ptr" for i in range(n_out)]
                + [f"side{i}_ptr" for i in range(n_side)] + (["part_ptr", "count_ptr"] if spec.down else []))
    strides = ([f"in{i}_sm, in{i}_sk" for i in range(n_x)] + ["swn, swk"]
               + [f"e{i}_sm, e{i}_sn" for i in range(n_e)])
    down = ["H", "PROGRAMS", "GROUP", "sdh", "sdi"] if spec.down else []
    blocks = ["BLOCK_M", "BLOCK_N", "BLOCK_K"] + (["BLOCK_H", "BLOCK_C"] if spec.down else [])
    args = ", ".join(pointers + ["M", "K", "N_OUT"] + [f"col{p}" for p in range(spec.columns)]
                     + (["thr"] if spec.outliers else []) + strides + down
                     + [f"{b}: tl.constexpr" for b in blocks])
    lines = ['"""Generated by fxforge (codegen/kernels/decode_gemv.py): a linear with its prologue and '
             'epilogue, for few rows."""', "import triton", "import triton.language as tl", "", "", "@triton.jit",
             f"def {name}({args}):",
             "    pid_n = tl.program_id(0)",
             "    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]",
             "    rmask = rows < M",
             "    N = K  # the row the prologue's statistics run over (row_loop's name)"]
    # the prologue's row program: statistics in `top`, the row values of a chunk in `chunk`
    row_loads = []
    for i, (dtype, is_row) in enumerate(zip(spec.x_dtypes, spec.x_is_row)):
        conv = ".to(tl.float32)" if dtype.is_floating_point else ""
        if is_row:
            row_loads.append(f"    in{i} = tl.load(in{i}_ptr + rows * in{i}_sm + cols * in{i}_sk, mask=cmask, "
                             f"other=0){conv}")
    k = _TileRow(row_loads)
    for i, (dtype, is_row) in enumerate(zip(spec.x_dtypes, spec.x_is_row)):
        k.is_row[f"in{i}"] = bool(is_row)
        if not is_row:
            conv = ".to(tl.float32)" if dtype.is_floating_point else ""
            k.top.append(f"    in{i} = tl.load(in{i}_ptr + rows * in{i}_sm, mask=rmask, other=0){conv}")
    body = spec.prologue
    consts = {f"t{j}": dict(a)["value"] for j, (op, _, a) in enumerate(body) if op == "const"}
    types = step_types(body, spec.x_dtypes)
    for j, (op, operands, attrs) in enumerate(body):
        _looped_step(k, f"t{j}", op, list(operands), dict(attrs), consts, types[j])
    x = spec.prologue_outputs[0] if body else "in0"
    lines += k.top
    x_chunk = f"    xk = tl.where(cmask, {_rounded(x, spec.x_dtype)}, 0.0)"
    w8a8 = spec.quant == "w8a8"
    if w8a8:  # every row's per-token scale, over all of K, before the product needs it
        lines += ["    amax = tl.zeros([BLOCK_M, 1], tl.float32)"]
        lines += k.chunk_loop([x_chunk] + _w8a8_split(spec.outliers)
                              + ["    amax = tl.maximum(amax, tl.max(tl.abs(xin), axis=1)[:, None])"])
        lines += [f"    a_s = tl.maximum(tl.math.div_rn(amax, 127.0), {TINY!r})"]
    # the product, with the prologue's row values replayed per chunk
    lines += ["    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)", "    nmask = ncols < N_OUT"]
    lines += [f"    acc{p} = tl.zeros([BLOCK_M, BLOCK_N], {'tl.int32' if w8a8 else 'tl.float32'})"
              for p in range(spec.columns)]
    if w8a8 and spec.outliers:
        lines += [f"    out{p}_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)" for p in range(spec.columns)]
    tail = [x_chunk, "    kk = start + tl.arange(0, BLOCK_K)", "    wmask = nmask[:, None] & (kk < K)[None, :]"]
    if w8a8:
        tail += _w8a8_split(spec.outliers) + _w8a8_quantize()
    for p in range(spec.columns):
        tail.append(f"    w{p} = tl.load(w_ptr + (col{p} + ncols)[:, None] * swn + kk[None, :] * swk, mask=wmask, "
                    f"other=0)")
        if not w8a8:
            tail += [f"    acc{p} += tl.sum(xk[:, None, :] * w{p}.to(tl.float32)[None, :, :], axis=2)"]
            continue
        # exact in int32, as the reference's integer product
        tail.append(f"    acc{p} += tl.sum(xq[:, None, :] * w{p}.to(tl.int32)[None, :, :], axis=2)")
        if spec.outliers:
            tail += ["    if has_out:",
                     f"        out{p}_acc += tl.sum(xout[:, None, :] * w{p}.to(tl.float32)[None, :, :], axis=2)"]
    side = list(zip(spec.prologue_outputs[1:], spec.side_dtypes, spec.side_is_row))
    stores = [f"        tl.store(side{j}_ptr + rows * N + cols, {step}.to({_TL_DTYPES[dtype]}), mask=cmask)"
              for j, (step, dtype, is_row) in enumerate(side) if is_row]
    if stores:  # the first column block writes the prologue's row results
        tail += ["    if pid_n == 0:"] + stores
    lines += k.chunk_loop(tail)
    per_row = [f"        tl.store(side{j}_ptr + rows, {step}.to({_TL_DTYPES[dtype]}), mask=rmask)"
               for j, (step, dtype, is_row) in enumerate(side) if not is_row]
    if per_row:
        lines += ["    if pid_n == 0:"] + per_row
    # the epilogue on [BLOCK_M, BLOCK_N]
    lines += ["    ocols = ncols[None, :]", "    omask = rmask & (ocols < N_OUT)"]
    for p in range(spec.columns):
        y = f"acc{p}"
        if spec.quant:  # the int8 rows' scale per output channel (w8a8: times x's per token first)
            lines.append(f"    ws{p} = tl.load(ws_ptr + col{p} + ncols, mask=nmask, other=0).to(tl.float32)")
            y = f"(acc{p}.to(tl.float32) * a_s * ws{p}[None, :])" if w8a8 else f"(acc{p} * ws{p}[None, :])"
            if w8a8 and spec.outliers:
                y = f"({y} + out{p}_acc * ws{p}[None, :])"
            lines.append(f"    q{p} = {y}")
            y = f"q{p}"
        if spec.bias:
            lines.append(f"    bias{p} = tl.load(b_ptr + col{p} + ncols, mask=nmask, other=0).to(tl.float32)")
            y = f"({y} + bias{p}[None, :])"
        # rounded as the unfused linear stored its output
        lines.append(f"    y{p} = {_rounded(y, spec.x_dtype)}")
    if not spec.epilogue:
        results = ["y0"]
    else:
        names = {f"in{p}": f"y{p}" for p in range(spec.columns)}
        for i, dtype in enumerate(spec.e_dtypes):
            conv = ".to(tl.float32)" if dtype.is_floating_point else ""
            lines.append(f"    e{i} = tl.load(e{i}_ptr + rows * e{i}_sm + ocols * e{i}_sn, mask=omask, other=0){conv}")
            names[f"in{spec.columns + i}"] = f"e{i}"
        econsts = {}
        # the epilogue's inputs: the linear's result (rounded to x's dtype above), then e*
        types = step_types(spec.epilogue, (spec.x_dtype,) * spec.columns + tuple(spec.e_dtypes))
        for j, (op, operands, attrs) in enumerate(spec.epilogue):
            names[f"t{j}"] = f"ep{j}"
            if op == "const":
                econsts[f"ep{j}"] = dict(attrs)["value"]
            lines.append(f"    ep{j} = {expression(op, [names[a] for a in operands], dict(attrs), econsts, types[j])}")
        results = [names[o] for o in spec.epilogue_outputs]
    if spec.down:
        from .decode_mlp import down_lines

        return "\n".join(lines + down_lines(_rounded(results[0], spec.mid_dtype), _TL_DTYPES[spec.out_dtypes[0]],
                                             spec.down_bias)) + "\n"
    for j, (value, dtype) in enumerate(zip(results, spec.out_dtypes)):
        lines.append(f"    tl.store(out{j}_ptr + rows * N_OUT + ocols, {value}.to({_TL_DTYPES[dtype]}), mask=omask)")
    return "\n".join(lines) + "\n"


def _w8a8_split(outliers: bool) -> list[str]:
    """Lines splitting the chunk xk [BLOCK_M, BLOCK_K] as LLM.int8() does, per token
    (quant_formats.w8a8_split_activations): an entry is an outlier of its row if
    |x| > thr; xin keeps the inliers, xout the outliers, has_out says whether the chunk has
    any."""
    if not outliers:
        return ["    xin = xk"]
    return ["    hit = rmask & (tl.abs(xk) > thr)",
            "    has_out = tl.max(tl.where(hit, 1, 0)) > 0",
            "    xin = tl.where(hit, 0.0, xk)",
            "    xout = tl.where(hit, xk, 0.0)"]


def _w8a8_quantize() -> list[str]:
    """xq: the inliers quantized with the row's scale a_s, as quantize_activations_per_token:
    round(x / scale) half to even (floor(v + 0.5) is exact for |v| <= 127.5, a tie then goes
    to the even neighbour), clamped to [-127, 127], as int32 for the exact product."""
    return ["    v = tl.math.div_rn(xin, a_s)",
            "    xr = tl.floor(v + 0.5)",
            "    xr = tl.where((xr - v == 0.5) & (xr % 2 != 0), xr - 1.0, xr)",
            "    xq = tl.minimum(tl.maximum(xr, -127.0), 127.0).to(tl.int32)"]


def _rounded(value: str, dtype: torch.dtype) -> str:
    """An fp32 value rounded to `dtype` and back: what storing it as `dtype` kept."""
    return value if dtype == torch.float32 else f"{value}.to({_TL_DTYPES[dtype]}).to(tl.float32)"


@dataclass
class _Plan:
    fn: object
    out_specs: list  # (shape, dtype): the results, then the prologue's extras
    scalars: list
    constexprs: dict
    grid: tuple
    views: list  # per tensor input: the [M, L] shape it is viewed as (None: the weight or bias as given)
    scratch: object = None  # with a down projection: device -> (partials, counters), after the results


class GemvKernels:
    """Launches of linear_fused nodes, compiled through a PointwiseKernels (its on-disk cache,
    `sources` for dumps and `launches` for the ahead-of-time compile)."""

    def __init__(self, pointwise):
        self.pointwise = pointwise
        self._plans: dict[tuple, tuple] = {}  # key -> (the attrs' values, _Plan or None: not a GEMV)

    def run(self, *tensors, **attrs):
        """The node's results through the kernel, or None when this call is not a GEMV
        (too many rows, an input that is not a strided [rows, length] matrix)."""
        # Worked out once per node and input signature. The attrs are the program's constants
        # (equal ones may be one object across nodes), so they are keyed by identity, all of
        # them, and kept alive with the plan so that an id is never reused.
        values = tuple(attrs.values())
        key = (tuple(map(id, values)), tuple((t.shape, t.stride(), t.dtype) for t in tensors))
        found = self._plans.get(key)
        if found is None:
            found = (values, self._plan(tensors, attrs))
            remember(self._plans, key, found)
        plan = found[1]
        if plan is None:
            return None
        device = tensors[0].device
        args = [t if view is None else t.expand(view[0]).view(view[1]) for t, view in zip(tensors, plan.views)]
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in plan.out_specs]
        if plan.grid is not None:
            scratch = plan.scratch(device) if plan.scratch is not None else ()
            plan.fn[plan.grid](*args, *outs, *scratch, *plan.scalars, **plan.constexprs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _plan(self, tensors, attrs) -> _Plan | None:
        import triton

        from ...ir.ops import OPS

        rest, dw, db = split_down(tensors, attrs)
        xs, w, b, extra = split_inputs(tensors, attrs)
        quant = _quant_format(w, attrs)
        if quantized(attrs):
            if quant is None:
                return None  # a format this kernel does not implement: the composition runs
            w, w_scale = w
        n, k = w.shape
        types = OPS["linear_fused"].infer([_type_of(t) for t in tensors], attrs)
        # the epilogue's results (what the down projection reads, with one)
        mid_types = types if dw is None else \
            OPS["linear_fused"].infer([_type_of(t) for t in rest], {**attrs, "down": False, "down_bias": False})
        lead = tuple(int(d) for d in mid_types[0].shape[:-1])
        m = math.prod(lead)
        h = 0 if dw is None else int(dw.shape[0])
        if m > MAX_ROWS or (w.dtype not in _TL_DTYPES and quant is None) or (b is not None and b.stride(-1) != 1) \
                or (db is not None and db.stride(-1) != 1) or needs_wide_index(tensors, m * max(n, k, h)):
            return None  # (offsets past 2**31: the kernel computes them in 32 bits)
        n_results = 1 if dw is not None or not attrs["epilogue"] else len(attrs["epilogue_outputs"])
        n_out = int(mid_types[0].shape[-1])
        views, x_is_row, strides = [], [], []
        for x in xs:  # each prologue input as [M, K] or [M, 1]
            is_row = x.dim() > 0 and x.shape[-1] == k and k > 1
            shape = lead + ((k,) if is_row else (1,))
            st = _matrix_strides(x, shape, m)
            if st is None:
                return None
            views.append((shape, (m, shape[-1])))
            x_is_row.append(is_row)
            strides += st if is_row else [st[0], 0]
        views += [None] * (1 + (quant is not None) + (b is not None))
        strides += list(w.stride())
        for e in extra:  # each epilogue input as [M, N_OUT]
            shape = lead + (n_out,)
            st = _matrix_strides(e, shape, m)
            if st is None:
                return None
            views.append((shape, (m, n_out)))
            strides += st
        if dw is not None:
            views += [None] * (1 + (db is not None))
        out_types, side_types = types[:n_results], types[n_results:]
        side_is_row = tuple(t.shape[-1] != 1 or k == 1 for t in side_types)
        x_dtype = w.dtype if quant is None else _x_dtype(xs, attrs)
        spec = GemvSpec(tuple(attrs["prologue"]), tuple(attrs["prologue_outputs"]), tuple(x_is_row),
                        tuple(x.dtype for x in xs), x_dtype, w.dtype, b is not None, len(attrs["columns"]),
                        tuple(attrs["epilogue"]), tuple(attrs["epilogue_outputs"]), tuple(e.dtype for e in extra),
                        tuple(t.dtype for t in out_types), tuple(t.dtype for t in side_types), side_is_row,
                        dw is not None, db is not None, mid_types[0].dtype,
                        quant and quant[0], bool(quant and quant[1] is not None))
        parts = len(attrs["columns"])
        threshold = [float(quant[1])] if spec.outliers else []
        scalars = [m, k, n_out] + [int(s) for s, _ in attrs["columns"]] + threshold + strides
        out_specs = [(tuple(int(d) for d in t.shape), t.dtype) for t in types]
        placeholders = [torch.empty(0, dtype=t.dtype) for t in tensors] + \
                       [torch.empty(0, dtype=d) for _, d in out_specs]
        scratch = None
        if dw is None:
            blocks = launch_blocks(m, n_out, k, parts, interpreted())
            gpu_blocks = launch_blocks(m, n_out, k, parts)
        else:
            from . import decode_mlp

            blocks = decode_mlp.launch_blocks(m, n_out, k, h, parts, w.element_size(), interpreted())
            gpu_blocks = decode_mlp.launch_blocks(m, n_out, k, h, parts, w.element_size())
            programs = triton.cdiv(n_out, blocks["BLOCK_N"])
            group, groups = decode_mlp.grouping(programs)
            if not decode_mlp.fits(m, h, programs, groups) or not (m and h and n_out):
                return None
            scalars += [h, programs, group] + list(dw.stride())
            scratch = functools.partial(decode_mlp.scratch, programs=programs, groups=groups, m=m, h=h)
            placeholders += [torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int32)]
        fn = self.pointwise.kernel(generate_gemv_source, spec)
        grid = (triton.cdiv(n_out, blocks["BLOCK_N"]), triton.cdiv(m, blocks["BLOCK_M"])) if m and n_out else None
        if grid is not None:
            # what a GPU would launch (the AOT compile checks those blocks, not the interpreter's)
            self.pointwise._record(fn, placeholders + scalars, gpu_blocks)
        return _Plan(fn, out_specs, scalars, blocks, grid, views, scratch)


def _quant_format(w, attrs) -> tuple | None:
    """(scheme, w8a8 threshold or None) of a quantized node this kernel implements: a
    QUANT_SCHEMES format whose parts are an int8 [N, K] qweight and a float32 [N] scale
    (contiguous). None otherwise (also for a float node)."""
    if not quantized(attrs):
        return None
    q = dict(attrs["qattrs"])
    if q.get("scheme") not in QUANT_SCHEMES or tuple(attrs["parts"]) != ("qweight", "scale"):
        return None
    qweight, scale = w
    n, k = q["shape"]
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, k) or scale.dtype != torch.float32 \
            or tuple(scale.shape) != (n,) or scale.stride(0) != 1:
        return None
    threshold = q.get("threshold") if q["scheme"] == "w8a8" else None
    return q["scheme"], threshold


def _x_dtype(xs, attrs) -> torch.dtype:
    """The dtype of the linear's input: the prologue's first result's (or x's)."""
    if not attrs["prologue"]:
        return xs[0].dtype
    from ...ir.ops import OPS

    types = OPS["fused_pointwise"].infer([_type_of(x) for x in xs],
                                         {"body": attrs["prologue"], "outputs": attrs["prologue_outputs"]})
    return types[0].dtype


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (tests replace this to run the GPU's blocks)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _matrix_strides(x: torch.Tensor, shape: tuple, m: int) -> list[int] | None:
    """(row stride, column stride) of x broadcast to `shape` and seen as [m, shape[-1]], or
    None when its leading dims do not merge into one stride."""
    try:
        e = x.expand(shape).view(m, shape[-1])
    except RuntimeError:
        return None
    return [e.stride(0) if m > 1 else 0, e.stride(1) if shape[-1] > 1 else 0]


def _type_of(x: torch.Tensor):
    from ...ir.types import TensorType

    return TensorType(tuple(x.shape), x.dtype)
