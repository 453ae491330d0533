"""A stand-in for a Triton kernel object in a kernel module: it records the grid and the
keyword arguments (constexprs) of each launch, and runs the real kernel only if asked to,
so a test can see what a launch wrapper asks for (a grid for a huge batch, a specialization
for huge tensors) without launching it."""


class LaunchSpy:
    def __init__(self, kernel=None, block_ms=(16, 32, 64, 128)):
        self.kernel = kernel  # the real kernel, launched after recording; None: nothing runs
        self.block_ms = block_ms  # the autotuner's BLOCK_M values a grid function is asked for
        self.launches = []  # (grids, kwargs), one per launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):  # an autotuned launch: the grid for every block size it may pick
                grids = [grid({**kwargs, "BLOCK_M": bm, "BLOCK_N": 16}) for bm in self.block_ms]
            else:
                grids = [grid]
            self.launches.append((grids, kwargs))
            if self.kernel is not None:
                return self.kernel[grid](*args, **kwargs)
        return launch


def over_cuda_limits(grid) -> bool:
    """Whether some axis of a grid is past CUDA's limits (2**31 - 1, then 65535, 65535)."""
    return len(grid) > 3 or any(n > limit for n, limit in zip(grid, (2 ** 31 - 1, 65535, 65535)))




def small_and_huge_caches(q_len: int):
    """Meta tensors (no memory): a query [2, 4, q_len, 64], and K/V of 100 keys either as a
    small tensor or as a prefix of a 2**32-element cache, whose offsets need 64 bits."""
    import torch

    q = torch.empty(2, 4, q_len, 64, device="meta")
    small = torch.empty(2, 4, 100, 64, device="meta")
    huge = torch.empty(2, 4, 2 ** 23, 64, device="meta")[:, :, :100]
    return q, (small, huge)
