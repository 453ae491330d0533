"""paged_kv_write in one launch: new K or V rows into the slots of a paged cache.

The op (ir/ops.py) writes new [B, Hkv, T, D] into cache [blocks, block_size, Hkv, D]:
token t of row b goes to slot slots[b, t] = block * block_size + offset, and a slot of -1
(a left-padding token) is not written. Its torch reference needs about a dozen small
launches to do that without a host sync (no boolean indexing); two writes per layer in
every decode step made them most of a paged step's launches.

Here one program copies one token's rows for a group of heads:

    cache[slot // block_size, slot % block_size, h, :] = new[b, h, t, :].to(cache.dtype)

and, for the op's paired form paged_kv_write(k_cache, v_cache, k, v, slots) (a layer's K
and V, which share the slots; passes/kv_paged.pair_writes), the same for V in the same
program (PAIR): one launch per layer.

`new` is read through its strides (it is a permuted view of a projection) and may be wider
than the cache (float32 or float16 into bfloat16: rounded to nearest even, bit for bit the
reference's .to). Shapes depend only on B, T, Hkv and D, never on the slots' values: no
host read, so the launch can be captured in a CUDA graph. Slot and row offsets are int64
(a pool can hold more than 2^31 elements).

Out-of-range slots: on CPU tensors (the interpreter) the wrapper raises the reference's
ValueError, reading the slots through numpy (no torch op: the interpreter counts the
launches a GPU makes). On a GPU a host check would be a sync, so the kernel checks on the
device: tl.device_assert, evaluated when Triton runs with debug on (TRITON_DEBUG=1); and
in any case a slot >= the cache's slot count is not written, like -1, so a bad slot never
writes outside the pool.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # elements (heads x head dim) one program copies: registers stay small


@triton.jit
def _paged_kv_write_kernel(
    cache_ptr, new_ptr, v_cache_ptr, v_new_ptr, slots_ptr,
    T, H, D, num_slots, block_size,
    stride_nb, stride_nh, stride_nt, stride_nd,
    stride_vnb, stride_vnh, stride_vnt, stride_vnd,
    stride_sb, stride_st,
    stride_cblock, stride_coff, stride_ch, stride_cd,
    stride_vcblock, stride_vcoff, stride_vch, stride_vcd,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr, PAIR: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # b * T + t
    b = token // T
    t = token % T
    slot = tl.load(slots_ptr + b * stride_sb + t * stride_st).to(tl.int64)
    tl.device_assert(slot < num_slots, "paged_kv_write: slot outside the cache")
    write = (slot >= 0) & (slot < num_slots)  # -1: a padding token; past the pool: never written
    block = slot // block_size
    offset = slot % block_size
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    heads = tl.where(write, H, 0)  # a skipped token: no head is in range
    mask = (h[:, None] < heads) & (d[None, :] < D)
    _copy_rows(cache_ptr, new_ptr, b, t, block, offset, h, d, mask,
               stride_nb, stride_nh, stride_nt, stride_nd, stride_cblock, stride_coff, stride_ch, stride_cd,
               ROUND_BF16)
    if PAIR:  # a layer's V: the same slots, the same tile
        _copy_rows(v_cache_ptr, v_new_ptr, b, t, block, offset, h, d, mask,
                   stride_vnb, stride_vnh, stride_vnt, stride_vnd, stride_vcblock, stride_vcoff, stride_vch,
                   stride_vcd, ROUND_BF16)


@triton.jit
def _copy_rows(cache_ptr, new_ptr, b, t, block, offset, h, d, mask,
               stride_nb, stride_nh, stride_nt, stride_nd, stride_cblock, stride_coff, stride_ch, stride_cd,
               ROUND_BF16: tl.constexpr):
    src = new_ptr + b * stride_nb + t * stride_nt + h[:, None] * stride_nh + d[None, :] * stride_nd
    rows = tl.load(src, mask=mask)
    dst = cache_ptr + block * stride_cblock + offset * stride_coff + h[:, None] * stride_ch + d[None, :] * stride_cd
    if ROUND_BF16:
        rows = _float32_to_bfloat16(rows.to(tl.float32))  # float16 to float32 is exact
    tl.store(dst, rows.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _float32_to_bfloat16(x):
    """Round to nearest even on the bits, as torch's .to(bfloat16) does. The GPU's own
    cast does too, but Triton's interpreter truncates: done by hand, the kernel the tests
    run is the one a GPU runs, and the two agree to the bit."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN: keep it a NaN


def tile(heads: int, dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): the whole head dim, as many heads as fit in MAX_TILE."""
    block_d = triton.next_power_of_2(max(dim, 1))
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), MAX_TILE // block_d))
    return block_h, block_d


def warps(block_h: int, block_d: int) -> int:
    """8 warps for rows of 256 and more, else 4, as measured (gpu_specs.paged_kv_write_specs):
    compiled at 4 warps, K and V of head dim 256 in float16 or bfloat16 (16 x 256 tiles)
    spilled 44 bytes a thread on sm_90; at 8 warps they do not, while 32 x 128 tiles did
    not spill at 4 warps and did (float32 into bfloat16, sm_80: 8 bytes) at 8. Float32 K and
    V into bfloat16 at head dim 256 keeps 4 bytes on sm_80 at 4 or 8 warps and at half the
    tile: at 40 registers, ptxas's choice, not register pressure."""
    return 8 if block_d >= 256 else 4


def paged_kv_write_triton(*tensors: torch.Tensor):
    """paged_kv_write(cache, new, slots) or (k_cache, v_cache, k, v, slots): write new
    [B, Hkv, T, D] into slots [B, T] of cache [blocks, block_size, Hkv, D] in one launch
    (a layer's K and V together); returns the cache(s), mutated, like the reference."""
    if len(tensors) == 3:
        cache, new, slots = tensors
        _launch(slots, cache, new)
        return cache
    k_cache, v_cache, k, v, slots = tensors
    if pairable(k_cache, v_cache, k, v):
        _launch(slots, k_cache, k, v_cache, v)
    else:  # K and V of different shapes or dtypes: one launch each
        _launch(slots, k_cache, k)
        _launch(slots, v_cache, v)
    return k_cache, v_cache


def pairable(k_cache, v_cache, k, v) -> bool:
    """One program can copy both when they have the same tile and the same cast."""
    return k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype and k.shape == v.shape \
        and k.dtype == v.dtype


def _launch(slots, cache, new, v_cache=None, v_new=None):
    blocks, block_size, heads, dim = cache.shape
    batch, new_heads, seq, new_dim = new.shape
    if (new_heads, new_dim) != (heads, dim) or tuple(slots.shape) != (batch, seq):
        raise ValueError(f"paged_kv_write: cache {tuple(cache.shape)}, new {tuple(new.shape)} and slots "
                         f"{tuple(slots.shape)} do not match ([blocks, block size, Hkv, D], [B, Hkv, T, D], [B, T])")
    num_slots = blocks * block_size
    if slots.device.type == "cpu":  # the interpreter: read on the host through numpy, no torch op or sync
        wanted = slots.detach().numpy()
        if wanted.size and wanted.max() >= num_slots:
            raise ValueError(f"paged_kv_write: slot {int(wanted.max())} is outside the cache's {num_slots} slots "
                             f"({blocks} blocks of {block_size})")
    if batch * seq == 0 or heads * dim == 0:
        return
    pair = v_cache is not None
    if not pair:
        v_cache, v_new = cache, new
    block_h, block_d = tile(heads, dim)
    _paged_kv_write_kernel[(batch * seq, triton.cdiv(heads, block_h))](
        cache, new, v_cache, v_new, slots,
        seq, heads, dim, num_slots, block_size,
        *new.stride(), *v_new.stride(), *slots.stride(), *cache.stride(), *v_cache.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d, ROUND_BF16=cache.dtype == torch.bfloat16 and new.dtype != torch.bfloat16,
        PAIR=pair, num_warps=warps(block_h, block_d))


def paged_kv_write_reference(*tensors: torch.Tensor):
    """What the kernel must equal: the op's own torch reference."""
    from ...ir.ops import paged_kv_write_reference as reference

    return reference(*tensors)
