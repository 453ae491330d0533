"""Blocks of a paged KV cache: a free list over block ids 0..num_blocks-1.

The allocator hands out block ids and takes them back; it knows nothing of tensors (the
pool's buffers are in paged_cache.py). `reserve` lets a scheduler promise blocks to a
request before it writes them: a promised block is not free for anyone else, so a request
that was admitted can always grow to its full length (no preemption needed), while the
blocks themselves are handed out only as its tokens arrive (memory follows the tokens).
"""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """No free block is left (the message says how many were asked and are free)."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        # Ids never handed out are the range _fresh..num_blocks-1, not a list: the allocator
        # costs what is handed out, not num_blocks (a pool too large for the device must
        # reach the memory check with its message, not a MemoryError building a list).
        # Released ids are reused first, the last one released first; then low fresh ids,
        # so a small workload touches a compact prefix.
        self._fresh = 0
        self._released: list[int] = []
        self._owned: set[int] = set()
        self.reserved = 0  # promised to admitted requests, not handed out yet

    @property
    def free(self) -> int:
        """Blocks neither handed out nor promised."""
        return self.num_blocks - len(self._owned) - self.reserved

    @property
    def used(self) -> int:
        return len(self._owned)

    def _take(self) -> int:
        if self._released:
            return self._released.pop()
        self._fresh += 1
        return self._fresh - 1

    def allocate(self, n: int = 1, *, reserved: bool = False) -> list[int]:
        """n block ids. reserved=True takes them from this caller's promise (see reserve)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if reserved:
            if n > self.reserved:
                raise OutOfBlocks(f"{n} reserved block(s) asked, {self.reserved} reserved")
            self.reserved -= n
        elif n > self.free:
            raise OutOfBlocks(f"{n} KV cache block(s) asked, {self.free} free of {self.num_blocks} "
                              f"({self.reserved} promised to running requests)")
        out = [self._take() for _ in range(n)]
        self._owned.update(out)
        return out

    def release(self, blocks) -> None:
        """Give blocks back (a finished request's)."""
        for b in blocks:
            if b not in self._owned:
                raise ValueError(f"block {b} is not allocated (released twice, or not from this allocator)")
            self._owned.remove(b)
            self._released.append(b)

    def reserve(self, n: int) -> bool:
        """Promise n blocks for later `allocate(reserved=True)`; False (nothing promised)
        when fewer than n are free."""
        if n > self.free:
            return False
        self.reserved += n
        return True

    def unreserve(self, n: int) -> None:
        if n > self.reserved:
            raise ValueError(f"cannot give back {n} promised blocks, {self.reserved} are promised")
        self.reserved -= n


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)
