"""KV cache buffers: the state values of a cached graph, allocated by the runtime.

A graph after the kv_cache pass has state values typed [B, Hkv, S, D]; the runtime picks
B (the batch) and S (the capacity: prompt + new tokens) per generate() call and reuses the
buffers while they are big enough, so memory follows what is asked, not max_seq_len.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch

from ..ir.graph import Graph
from ..ir import roles
from ..passes.kv_cache import KVCacheLayout


def buffer_shapes(graph: Graph, batch: int, capacity: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each state buffer for `batch` rows of `capacity` positions:
    a dense buffer is [batch, kv heads, capacity, head dim] (its `layout` attribute)."""
    out = []
    for v in graph.state_values:
        if (v.attrs or {}).get("layout") != "dense":
            raise ValueError(f"state {v.state!r} has no dense layout attribute; the runtime cannot size it "
                             f"(see fxforge/ir/roles.py)")
        shape = [batch, int(v.shape[1]), capacity, int(v.shape[3])]
        out.append((tuple(shape), v.type.dtype))
    return out


def cache_nbytes(graph: Graph, batch: int, capacity: int) -> int:
    if roles.is_paged(graph):  # every row's blocks (generate() gives each row its own)
        from .block_allocator import blocks_for
        from .paged_cache import block_size_of, paged_buffer_shapes

        shapes = paged_buffer_shapes(graph, batch * blocks_for(capacity, block_size_of(graph)))
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in buffer_shapes(graph, batch, capacity))


class KVCache:
    def __init__(self, graph: Graph, batch: int, capacity: int, new_buffer):
        """new_buffer(shape, dtype): a zeroed tensor, from the backend that runs the graph."""
        self.batch, self.capacity = batch, capacity
        self.buffers = [new_buffer(shape, dtype) for shape, dtype in buffer_shapes(graph, batch, capacity)]
        self._tables = None  # (pad, positions [B, capacity], bias [B, 1, 1, capacity]) for one generate()
        # batch size -> StaticDecodeStep over these buffers (runtime/static_decode.py); its
        # static buffers and captured CUDA graph live as long as the buffers do
        self.static_steps: dict = {}

    def prepare(self, pad: torch.Tensor, dtype: torch.dtype):
        """Build the positions and key bias of every slot once for a generate() call, so
        that each step only slices them."""
        positions, bias = step_inputs(pad, 0, self.capacity, dtype, pad.device)
        self._tables = (pad, positions, bias)

    def inputs_at(self, pad: torch.Tensor, start: int, new: int, dtype: torch.dtype, make=None):
        """kv_positions and kv_bias for tokens start..start+new-1 (see step_inputs);
        `make(pad, start, new, dtype)` builds them outside a prepared call (the backend's:
        one kernel on the Triton backends; default step_inputs)."""
        if self._tables is not None and self._tables[0] is pad and self._tables[2].dtype == dtype \
                and start + new <= self.capacity:
            _, positions, bias = self._tables
            return positions[:, start:start + new], bias[..., :start + new]
        return (make or step_inputs)(pad, start, new, dtype)

    def release_tables(self):
        self._tables = None

    def fits(self, batch: int, capacity: int) -> bool:
        return self.batch >= batch and self.capacity >= capacity

    def claim(self, batch: int, capacity: int):
        pass  # rows 0..batch-1 of the buffers are the call's (a paged cache hands out blocks here)

    def reorder_rows(self, rows: torch.Tensor, length: int):
        """Row i takes the keys and values of row rows[i] (positions < length; beam search)."""
        n = rows.shape[0]
        for buf in self.buffers:
            part = buf[:n, :, :length]
            part.copy_(part.index_select(0, rows))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class CachePool:
    """The KV caches of one model that no call is using, for reuse.

    A generate() call or a plain model call takes a cache for its whole duration and gives
    it back at the end, so two calls never write into the same buffers: calls from several
    threads, and a call made from inside a streamer callback, get the tokens they would
    get alone. Sequential calls reuse one set of buffers (grown when a request is bigger).
    `keep` bounds how many idle caches stay allocated after a burst of concurrent calls."""

    def __init__(self, allocate, keep: int = 2):
        self._allocate = allocate  # (batch, capacity) -> KVCache
        self._idle: list[KVCache] = []
        self._lock = threading.Lock()
        self.keep = keep

    def take(self, batch: int, capacity: int) -> KVCache:
        """An idle cache that fits (the smallest), or a new one. The caller owns it."""
        with self._lock:
            fitting = [c for c in self._idle if c.fits(batch, capacity)]
            if fitting:
                cache = min(fitting, key=lambda c: c.nbytes())
                self._idle.remove(cache)
                cache.claim(batch, capacity)
                return cache
            if self._idle and len(self._idle) >= self.keep:
                # too small for this request: free the smallest before allocating
                self._idle.remove(min(self._idle, key=lambda c: c.nbytes()))
        cache = self._allocate(batch, capacity)
        cache.claim(batch, capacity)
        return cache

    def give_back(self, cache: KVCache):
        with self._lock:
            self._idle.append(cache)
            self._idle.sort(key=lambda c: c.nbytes(), reverse=True)
            del self._idle[self.keep:]  # keep the biggest

    @contextlib.contextmanager
    def lease(self, batch: int, capacity: int):
        cache = self.take(batch, capacity)
        try:
            yield cache
        finally:
            cache.release_tables()
            self.give_back(cache)

    @property
    def idle(self) -> list[KVCache]:
        with self._lock:
            return list(self._idle)


def cache_layout(graph: Graph) -> KVCacheLayout | None:
    """The limits and sizes generate() needs, read from the graph's signature and state
    specs (None: the graph has no KV cache)."""
    if not graph.state_values:
        return None
    token_dims = (0, 1) if roles.is_paged(graph) else (0, 2)  # [blocks, block size, ...] | [B, Hkv, S, D]
    per_token = sum(math.prod(int(d) for i, d in enumerate(v.shape) if i not in token_dims) * v.dtype.itemsize
                    for v in graph.state_values)
    return KVCacheLayout(max_seq_len=graph.signature.get("max_seq_len"), max_batch=graph.signature.get("max_batch"),
                         per_row_positions=roles.input_index(graph, roles.POSITIONS) is not None,
                         n_layers=len({v.attrs["layer"] for v in graph.state_values}), bytes_per_token=per_token)


def padding_from_pad_tokens(input_ids: torch.Tensor, pad_token_id, eos_token_ids: list, device,
                            name: str = "input_ids", fix: str | None = None) -> torch.Tensor | None:
    """Per-row left padding when no attention_mask is given, as transformers' generate()
    takes it (`_prepare_attention_mask_for_generation`): the mask `input_ids !=
    pad_token_id` when the pad token occurs in the prompts and is not an eos token; None
    (every token attends) otherwise. A mask that is not left padding is a ValueError,
    ending with generate()'s fix, or `fix` (a caller that takes no attention_mask: the
    Engine)."""
    if pad_token_id is None or pad_token_id in eos_token_ids:
        return None
    mask = input_ids != pad_token_id
    if bool(mask.all()):
        return None
    generate_fix = "Pass an attention_mask, or leave the pad token out of the prompt"
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():  # no token left to attend (left_padding's error would blame the mask)
        where = "" if mask.shape[0] == 1 else f" (row {int(empty[0])})"
        raise ValueError(f"{name} is made of pad tokens ({pad_token_id}) only{where}: a prompt's pad tokens are "
                         f"taken for its padding (input_ids != pad_token_id, as transformers takes them without an "
                         f"attention_mask), and every prompt needs at least one token that is not padding. "
                         f"{fix if fix is not None else generate_fix}")
    try:
        return left_padding(mask.long(), *input_ids.shape, device)
    except ValueError as error:
        if fix is not None:
            raise ValueError(f"{name} holds the pad token ({pad_token_id}) after its first other token, at "
                             f"{_misplaced_pad(mask)}: a prompt's pad tokens are taken for its padding "
                             f"(input_ids != pad_token_id, as transformers takes them without an attention_mask), "
                             f"and padding must come first. {fix}") from None
        raise ValueError(f"{name} holds the pad token ({pad_token_id}) and no attention_mask was given, so it is "
                         f"taken as transformers takes it, input_ids != pad_token_id ({pad_token_id}), and that "
                         f"mask does not fit: {error}. {generate_fix}") from None


def _misplaced_pad(mask: torch.Tensor) -> str:
    """Where the first pad token after a real one sits in a [B, T] mask (1: token), for an error."""
    after_token = mask.long().cummax(dim=1).values.bool() & ~mask
    row, col = (int(i) for i in after_token.nonzero()[0])
    return f"position {col}" if mask.shape[0] == 1 else f"row {row}, position {col}"


def left_padding(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Per-row count of left-padding tokens, from a [B, T] 0/1 mask; checks it is left
    padding (zeros then ones), the only layout generation can extend."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must have the shape of input_ids {(batch, length)}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=device, dtype=torch.long)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    pad = (mask == 0).long().cumprod(dim=1).sum(dim=1)  # leading zeros per row
    if not (mask.sum(dim=1) + pad == length).all():
        raise ValueError("attention_mask must be left padding (zeros, then ones, per row): generation appends "
                         "tokens on the right, so pad prompts on the left (tokenizer.padding_side = 'left')")
    if (pad == length).any():
        raise ValueError("a row of attention_mask is all padding: every prompt needs at least one token")
    return pad


def step_inputs(pad: torch.Tensor, start: int, new: int, dtype: torch.dtype, device=None):
    """The kv_cache inputs for `new` tokens at positions start..start+new-1: positions per
    row (minus the left padding, as transformers counts them; 0 on padding) and the key
    bias (a very negative number on padding keys, so they get no attention). The Triton
    backends write both in one launch (codegen/kernels/step_inputs.py, Backend.step_inputs)."""
    device = pad.device if device is None else device
    steps = torch.arange(start, start + new, device=device)
    positions = (steps[None, :] - pad[:, None]).clamp(min=0)
    keys = torch.arange(start + new, device=device)
    bias = torch.zeros(pad.shape[0], 1, 1, start + new, dtype=dtype, device=device)
    bias.masked_fill_((keys[None, :] < pad[:, None])[:, None, None, :], torch.finfo(dtype).min)
    return positions, bias
