"""The continuous-batching engine on a paged KV cache (a model optimized with
KVCacheConfig(layout="paged")). `fxforge.Engine(fast, ...)` returns one for such a model;
the API is the dense engine's (runtime/engine.py), plus `num_blocks`.

    engine = fxforge.Engine(fast, max_batch=8, num_blocks=512)

Memory: one pool of `num_blocks` blocks of `block_size` tokens (per layer, K and V). A
request gets blocks as its tokens arrive and gives them all back the step it finishes, so
the cache holds what the running requests hold, up to one partly filled block each.

Admission: a request is admitted only when the blocks of its longest possible sequence
(prompt + max_new_tokens - 1 positions: the last new token is never fed) can be promised
(BlockAllocator.reserve). The promise is not an allocation: the blocks stay in the free
list until the request writes into them, but no other request may count on them. So an
admitted request always finishes without preempting anyone, and a request waits (never
fails, never is lost) while the pool cannot promise its blocks. A request longer than the
whole pool is refused at submit().

No data moves when a request joins: its prompt is prefilled straight into its own blocks
(a batch of one row, in chunks of `prefill_chunk` tokens across steps), and the decode
step addresses each row through its block table from its own start. The batch's key
length is the longest row's (L); row b starts at L - (its tokens), the key bias masks
what comes before, and positions are each row's own, so each request's greedy tokens are
those of generate() on it alone (tested).
"""
from __future__ import annotations

import torch

from .block_allocator import blocks_for
from .engine import Engine, Request, _Prefill, _Row
from .generate import fed_positions


class _Blocks:
    """A request's blocks and the rest of its promise."""

    def __init__(self, promised: int):
        self.blocks: list[int] = []
        self.promised = promised

    def grow(self, allocator, tokens: int, block_size: int):
        """Blocks for `tokens` tokens, taken from the promise."""
        need = blocks_for(tokens, block_size) - len(self.blocks)
        if need > 0:
            self.blocks += allocator.allocate(need, reserved=True)
            self.promised -= need

    def release(self, allocator):
        allocator.release(self.blocks)
        allocator.unreserve(self.promised)
        self.blocks, self.promised = [], 0


class PagedEngine(Engine):
    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 num_blocks: int | None = None, block_size: int | None = None):
        """`num_blocks`: the pool (default: the graph's KVCacheConfig.num_blocks, else as
        many as max_batch rows of max_seq_len, or 1024, tokens). `block_size`, if given,
        must be the graph's (it is fixed when the model is optimized). `max_seq_len`: the
        longest request (default: the model's limit, else the pool's size)."""
        from .paged_cache import block_size_of

        self._setup(model, max_batch, max_seq_len, prefill_chunk, default_len=None)
        graph_block = block_size_of(model.graph)
        if block_size is not None and block_size != graph_block:
            raise ValueError(f"block_size={block_size}, but the model was optimized with blocks of {graph_block} "
                             f"tokens; optimize it with KVCacheConfig(layout='paged', block_size={block_size})")
        if num_blocks is None:
            num_blocks = model.graph.signature.get("num_blocks")
        if num_blocks is None:
            num_blocks = max_batch * blocks_for(self.capacity or 1024, graph_block)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.block_size, self.num_blocks = graph_block, num_blocks
        self.cache = model.paged_cache(num_blocks)
        # a static decode step's block table is as wide as the longest request may need
        self.cache.row_capacity = min(self.capacity or num_blocks * graph_block, num_blocks * graph_block)
        self.allocator = self.cache.allocator
        self.peak_allocated_blocks = 0

    def _check_request(self, prompt_len: int, max_new_tokens: int):
        fed = fed_positions(prompt_len, max_new_tokens)  # the last new token takes no slot
        if self.capacity is not None and fed > self.capacity:
            super()._check_request(prompt_len, max_new_tokens)
        # the graph's guards on the sequence's length (L + T once cached), as the dense engine's
        self.model.check_step_sizes(1, [1], range(fed), caller="the engine's")
        need = blocks_for(fed, self.block_size)
        if need > self.num_blocks:
            raise ValueError(f"a prompt of {prompt_len} tokens plus {max_new_tokens} new ones needs {need} KV cache "
                             f"blocks of {self.block_size} tokens, more than the engine's whole pool "
                             f"(num_blocks={self.num_blocks}): it could never run; raise num_blocks or ask for fewer "
                             f"tokens (it is fed {fed} positions: every token but the last new one)")

    # -- the step's parts (see Engine._admit for the order) -----------------------------------
    def _next_prefill(self) -> _Prefill | None:
        """The oldest waiting request, once the blocks for its longest possible length
        (prompt + max_new_tokens - 1 positions: its last token is never fed) can be
        promised; until then it waits, first in first out."""
        with self._lock:
            if not self._waiting:
                return None
            request = self._waiting[0]
            need = blocks_for(fed_positions(request.prompt.numel(), request.max_new_tokens), self.block_size)
            if not self.allocator.reserve(need):
                return None  # not enough blocks to promise: it waits for a request to finish
            self._waiting.popleft()
        job = _Prefill(request)
        job.kv = _Blocks(need)
        return job

    def _prefill_cache(self, job: _Prefill, tokens: int):
        """The prompt goes straight into the request's own blocks (no copy when it joins)."""
        job.kv.grow(self.allocator, tokens, self.block_size)
        self.cache.use_rows([job.kv.blocks])
        return self.cache

    def _join(self, job: _Prefill) -> bool:
        row = _Row(job.request, job.seq)
        row.kv = job.kv
        return self._enter(row, job.request.prompt.numel(), job.logits)

    def _decode(self):
        rows = self._rows
        for r in rows:
            r.kv.grow(self.allocator, r.cached + 1, self.block_size)
        longest = max(r.cached for r in rows)
        ids = torch.stack([r.seq[0, r.length - 1] for r in rows])[:, None]
        pad = torch.tensor([longest - r.cached for r in rows], dtype=torch.long, device=ids.device)
        self.cache.use_rows([r.kv.blocks for r in rows])
        # static steps where they run: one CUDA graph per batch size on a GPU (static_paged.py)
        logits = self.model.run_step(ids, longest, pad, self.cache,
                                     host_pad=[longest - r.cached for r in rows])[:, -1, :].float()
        for r in rows:
            r.cached += 1
        held = sum(r.cached for r in rows) + (self._prefilling.done if self._prefilling is not None else 0)
        self.peak_cached_tokens = max(self.peak_cached_tokens, held)
        self.peak_allocated_blocks = max(self.peak_allocated_blocks, self.allocator.used)
        self._account(self.allocator.used * self.block_size, held)
        self._hand_out(logits)

    def _retire(self, row: _Row):
        """The row leaves and its blocks (and the rest of its promise) go back; no other row moves."""
        self._rows.remove(row)
        row.kv.release(self.allocator)
        row.request._done.set()

    def stats(self) -> dict:
        """As the dense engine's, with the pool: allocated_positions counts the slots of the
        blocks handed out now (a paged cache allocates as tokens arrive), pool_positions the
        whole pool; kv_waste averages, over the decode steps, the share of handed-out slots
        that held no token (each request's last block is partly filled)."""
        held = sum(r.cached for r in self._rows) + (self._prefilling.done if self._prefilling is not None else 0)
        return {"allocated_positions": self.allocator.used * self.block_size, "cached_tokens": held,
                "peak_cached_tokens": self.peak_cached_tokens, "running": len(self._rows),
                "waiting": len(self._waiting) + (self._prefilling is not None), "steps": self.steps,
                "kv_waste": self._waste(), "pool_positions": self.num_blocks * self.block_size,
                "block_size": self.block_size, "free_blocks": self.allocator.free,
                "used_blocks": self.allocator.used, "peak_allocated_blocks": self.peak_allocated_blocks}

    def _give_back_caches(self):
        pass  # the block pool is the engine's own

    def _fail_rows(self, error: BaseException, stage: str):
        for row in self._rows:
            row.kv.release(self.allocator)
        super()._fail_rows(error, stage)

    def _release_job(self, job: _Prefill):
        job.kv.release(self.allocator)


__all__ = ["PagedEngine", "Request"]
