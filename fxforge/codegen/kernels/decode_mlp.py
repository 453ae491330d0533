"""Decode MLP: a `linear_fused` node with a down projection (down=true, ir/linear_fused.py),
i.e. a layer's whole MLP (add + RMSNorm, gate/up, SwiGLU or GELU, down), as ONE generated
Triton kernel for few rows (M <= 16, a decode step).

The kernel is decode_gemv's (codegen/kernels/decode_gemv.py: prologue, gate/up product and
epilogue of BLOCK_N intermediate columns per program, the grid over the intermediate
columns) with this module's tail (`down_lines`) in place of its stores:
  - the program's activation block [BLOCK_M, BLOCK_N] (rounded to its dtype, as the unfused
    kernel stored it) times its slice of the down weight, W_down[:, block] ([H, BLOCK_N]:
    rows of BLOCK_N contiguous elements), in chunks of BLOCK_H: a partial [rows, H] sum,
    stored to scratch;
  - a combine in two fixed-order levels (so bitwise repeatable), with kernels/arrival.py's
    counters: programs form groups of GROUP neighbours; the last of a group to arrive sums
    its group's partials in program order into a group partial; the last group to finish
    sums the group partials in group order, adds the down bias and writes [rows, H]. Two
    levels because one program summing every partial (about a hundred at SmolLM2's widths)
    alone would take longer than the launch it saves; each level reads ~sqrt(programs).
The counters are reset by the programs that used them: nothing to zero before a launch,
nothing for a CUDA-graph replay to redo (two launches of it must not run concurrently on two
streams of one device: they would share the counters, as quant_gemv's do). The partials go
to a float32 buffer made per call (torch.empty: no launch), (programs + groups) x rows x H.
A shape it declines (`fits`: scratch offsets past 32 bits, too many groups) runs as the
up GEMV and a torch matmul (TritonBackend.linear_fused).

    blocks = launch_blocks(m, i, k, h, parts, itemsize)   # the grid and tile sizes
    decode_mlp_reference(*tensors, **attrs)               # the op's composition
"""
from __future__ import annotations

import math

import torch

from ...ir.linear_fused import linear_fused_reference
from . import arrival

decode_mlp_reference = linear_fused_reference

# programs a decode MLP aims for at one row: the grid is over intermediate columns only, and
# each program's down slice is BLOCK_N contiguous elements per row of W_down: at least one
# 32-byte sector (BLOCK_N >= 32 / itemsize)
TARGET_PROGRAMS = 128
MIN_ROW_BYTES = 32
MAX_BLOCK_N = 64
# the partials' round trip (float32 [rows, H] per program, in L2) may cost at most this
# fraction of W_down's bytes: more rows, wider column blocks (fewer programs)
PARTIAL_BYTES_FRACTION = 1.0
PRODUCT_TILE = 2048  # as decode_gemv: elements of one [BLOCK_M, BLOCK_N, BLOCK_K] product tile
DOWN_TILE = 1024  # elements of one [BLOCK_M, BLOCK_H, BLOCK_N] down tile (2048 spilled at 16 fp32 rows)
COMBINE_TILE = 1024  # elements of a [BLOCK_M, BLOCK_C] tile of the combine
MAX_GROUPS = 1023  # counters per device: one for the launch, one per group
COUNTERS = "decode_mlp"


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def launch_blocks(m: int, n_mid: int, k: int, h: int, parts: int, itemsize: int, interpret: bool = False) -> dict:
    """BLOCK_M/N/K/H/C of a launch over `n_mid` intermediate columns (K: the input's width,
    H: the down projection's outputs). Interpreted (tests), wide tiles: fewer programs."""
    block_m = _pow2_at_least(m)
    if interpret:
        return {"BLOCK_M": block_m, "BLOCK_N": min(64, _pow2_at_least(n_mid)), "BLOCK_K": min(128, _pow2_at_least(k)),
                "BLOCK_H": min(128, _pow2_at_least(h)), "BLOCK_C": min(256, _pow2_at_least(h))}
    # partial bytes m * H * 4 * (I / BLOCK_N) <= fraction * I * H * itemsize
    narrowest = max(MIN_ROW_BYTES // itemsize, _pow2_at_least(math.ceil(4 * m / (PARTIAL_BYTES_FRACTION * itemsize))))
    # (and at many rows no wider than that needs: [16, 64, K] tiles took 255 registers on sm_80)
    widest = max(narrowest, min(MAX_BLOCK_N, 4 * MAX_BLOCK_N // block_m))
    block_n = max(narrowest, min(widest, _pow2_at_most(max(1, n_mid // TARGET_PROGRAMS))))
    block_k = max(16, min(256, _pow2_at_least(k), PRODUCT_TILE // (block_m * block_n * parts)))
    block_h = max(8, min(_pow2_at_least(h), DOWN_TILE // (block_m * block_n)))
    block_c = max(32, min(_pow2_at_least(h), COMBINE_TILE // block_m))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_H": block_h, "BLOCK_C": block_c}


def grouping(programs: int) -> tuple[int, int]:
    """(GROUP, groups): about sqrt(programs) neighbours per group, so each combine level
    sums about as many partials as the other."""
    group = max(1, math.isqrt(programs - 1) + 1) if programs > 1 else 1
    return group, -(-programs // group)


def scratch(device: torch.device, programs: int, groups: int, m: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials buffer, counters) of one launch."""
    part = torch.empty((programs + groups) * m * h, dtype=torch.float32, device=device)
    return part, arrival.counters(device, COUNTERS, MAX_GROUPS + 1)


def fits(m: int, h: int, programs: int, groups: int) -> bool:
    """Whether the launch's scratch offsets fit the kernel's 32-bit index arithmetic and its
    groups the counters."""
    return groups <= MAX_GROUPS and (programs + groups) * max(m, 1) * h < 2 ** 31


def down_lines(act: str, out_dtype: str, bias: bool) -> list[str]:
    """Source lines, after decode_gemv's epilogue, that take the activation `act` (an fp32
    expression over [BLOCK_M, BLOCK_N], already rounded to its dtype) through the down
    projection into out0 ([M, H] of tl dtype `out_dtype`). Names it relies on from
    decode_gemv's kernel: pid_n, rows, rmask, ncols, nmask, omask; arguments dw_ptr, db_ptr,
    out0_ptr, part_ptr, count_ptr, M, H, PROGRAMS, GROUP, sdh, sdi, BLOCK_H, BLOCK_C."""
    lines = [
        "    # the down projection of this program's columns: a partial [rows, H] sum",
        f"    dn_act = tl.where(omask, {act}, 0.0)",
        "    for dn_h0 in range(0, H, BLOCK_H):",
        "        dn_h = dn_h0 + tl.arange(0, BLOCK_H)",
        "        dn_hmask = dn_h < H",
        "        dn_w = tl.load(dw_ptr + dn_h[:, None] * sdh + ncols[None, :] * sdi, "
        "mask=dn_hmask[:, None] & nmask[None, :], other=0).to(tl.float32)",
        "        dn_part = tl.sum(dn_act[:, None, :] * dn_w[None, :, :], axis=2)",
        "        tl.store(part_ptr + (pid_n * M + rows) * H + dn_h[None, :], dn_part, mask=rmask & dn_hmask[None, :])",
        "    # combine in fixed order (kernels/arrival.py): the last of each group sums the group's",
        "    # partials, the last group to finish sums the groups'; each resets its counter",
        "    dn_groups = tl.cdiv(PROGRAMS, GROUP)",
        "    dn_group = pid_n // GROUP",
        "    dn_first = dn_group * GROUP",
        "    dn_members = tl.minimum(PROGRAMS - dn_first, GROUP)",
        "    tl.debug_barrier()  # every thread's partial is written before the release below",
        "    dn_arrived = tl.atomic_add(count_ptr + 1 + dn_group, 1, sem=\"acq_rel\")",
        "    if dn_arrived == dn_members - 1:",
        "        tl.atomic_xchg(count_ptr + 1 + dn_group, 0)",
        "        for dn_c0 in range(0, H, BLOCK_C):",
        "            dn_c = dn_c0 + tl.arange(0, BLOCK_C)[None, :]",
        "            dn_cmask = rmask & (dn_c < H)",
        "            dn_sum = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)",
        "            for dn_src in range(dn_first, dn_first + dn_members):",
        "                dn_sum += tl.load(part_ptr + (dn_src * M + rows) * H + dn_c, mask=dn_cmask, other=0.0, "
        "cache_modifier=\".cg\")",
        "            tl.store(part_ptr + ((PROGRAMS + dn_group) * M + rows) * H + dn_c, dn_sum, mask=dn_cmask)",
        "        tl.debug_barrier()",
        "        dn_done = tl.atomic_add(count_ptr, 1, sem=\"acq_rel\")",
        "        if dn_done == dn_groups - 1:",
        "            tl.atomic_xchg(count_ptr, 0)",
        "            for dn_c0 in range(0, H, BLOCK_C):",
        "                dn_c = dn_c0 + tl.arange(0, BLOCK_C)[None, :]",
        "                dn_cmask = rmask & (dn_c < H)",
        "                dn_sum = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)",
        "                for dn_src in range(0, dn_groups):",
        "                    dn_sum += tl.load(part_ptr + ((PROGRAMS + dn_src) * M + rows) * H + dn_c, mask=dn_cmask, "
        "other=0.0, cache_modifier=\".cg\")",
    ]
    if bias:
        lines.append("                dn_sum += tl.load(db_ptr + dn_c, mask=dn_c < H, other=0).to(tl.float32)")
    lines.append(f"                tl.store(out0_ptr + rows * H + dn_c, dn_sum.to({out_dtype}), mask=dn_cmask)")
    return lines
