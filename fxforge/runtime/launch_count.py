"""Count what a piece of work costs the host: kernel launches (Triton and torch), host
syncs, and host time. A decode step on a GPU is launch- and host-bound before it is
memory-bound (DESIGN.md), so these counts are what to drive down and what a test pins.

    with LaunchCounter() as c:
        model.run_cached(...)
    c.triton, c.torch, c.syncs, c.by_name

Triton launches are counted where every launch passes, whatever wrapper made it:
`JITFunction.run` (compiled) and `InterpretedFunction.run` (TRITON_INTERPRET=1), patched
only while a counter is open. Torch ops are seen by a TorchDispatchMode; views and
allocations launch nothing and are not counted. A host sync is an op whose result the host
must wait for on a GPU: `.item()`/`bool()`/`int()` of a tensor (aten._local_scalar_dense),
ops with data-dependent output shapes (nonzero, masked_select, unique), and copies to the
CPU. On CPU tensors these cost nothing, but they are counted all the same: the count says
what the same step would do on a GPU. (`tensor.tolist()` reads memory without dispatching
an op and is not seen.)
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or re-describe memory: no kernel runs.
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_unsafe_view", "set_", "resize_", "as_strided", "t", "_reshape_alias",
              "unsqueeze_", "squeeze_", "transpose_", "record_stream", "is_same_size", "sym_size",
              "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "numel", "result_type"}
# Ops whose result the host must read before it can go on (or whose output size is data).
_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
          "unique_consecutive", "is_nonzero", "equal", "allclose", "nonzero_static_sync"}


class _TorchOps(TorchDispatchMode):
    def __init__(self, counter: "LaunchCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter._inside_kernel:  # the interpreter's own copies of a kernel's arguments
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNCS or _copies_to_host(name, args, kwargs):
            self.counter.syncs += 1
            self.counter.sync_names[name] += 1
        if name not in _NO_LAUNCH and not func.is_view and name not in ("_local_scalar_dense",):
            self.counter.torch += 1
            self.counter.by_name[f"aten.{name}"] += 1
        return func(*args, **kwargs)


def _copies_to_host(name: str, args, kwargs) -> bool:
    """A device -> CPU copy (`.cpu()`, `.to("cpu")`), which waits for the device."""
    if name not in ("_to_copy", "copy_", "to"):
        return False
    src = args[1] if name == "copy_" else args[0]
    dst_device = kwargs.get("device") if name != "copy_" else args[0].device
    if not isinstance(src, torch.Tensor) or dst_device is None:
        return False
    return src.device.type not in ("cpu", "meta") and torch.device(dst_device).type == "cpu"


class LaunchCounter:
    """A context that counts launches and syncs of what runs inside it (see the module doc)."""

    def __init__(self):
        self.triton = 0
        self.torch = 0
        self.syncs = 0
        self.by_name: Counter = Counter()  # "triton.<kernel>" / "aten.<op>" -> launches
        self.sync_names: Counter = Counter()
        self._stack = contextlib.ExitStack()
        self._inside_kernel = 0

    @property
    def launches(self) -> int:
        return self.triton + self.torch

    def __enter__(self):
        for cls in _kernel_classes():
            self._stack.enter_context(_counting_runs(cls, self))
        self._stack.enter_context(_TorchOps(self))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def _kernel_classes() -> list:
    """Triton's launchable kernel classes, where triton is installed (and imported: a
    process that never imported it launched no Triton kernel)."""
    import sys

    if "triton" not in sys.modules:
        return []
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a triton without the interpreter
        pass
    return classes


@contextlib.contextmanager
def _counting_runs(cls, counter: LaunchCounter):
    original = cls.__dict__["run"]

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            counter.triton += 1
            counter.by_name[f"triton.{getattr(self, '__name__', type(self).__name__)}"] += 1
        counter._inside_kernel += 1
        try:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter._inside_kernel -= 1

    cls.run = run
    try:
        yield
    finally:
        cls.run = original


@dataclass
class DecodeProfile:
    """Launches, host syncs and host time of one decode step (averaged over `steps`)."""
    steps: int
    triton: float
    torch: float
    syncs: float
    host_us: float  # wall time of a step, counters off; on a GPU with no sync inside, host time
    top: list  # (name, launches per step), most first
    sync_names: dict

    @property
    def launches(self) -> float:
        return self.triton + self.torch

    def __str__(self) -> str:
        top = ", ".join(f"{n}={c:g}" for n, c in self.top[:8])
        syncs = f" ({', '.join(f'{n}={c:g}' for n, c in self.sync_names.items())})" if self.sync_names else ""
        return (f"decode step: {self.launches:g} launches ({self.triton:g} triton + {self.torch:g} torch), "
                f"{self.syncs:g} host syncs{syncs}, {self.host_us:.0f} host us; most launched: {top} "
                "(the model's step alone: generate() adds its token choice per step, a few launches and "
                "one host sync to check for EOS)")


def decode_profile(model, steps: int = 2, prompt_len: int = 4, batch: int = 1) -> DecodeProfile:
    """Profile `steps` decode steps of an OptimizedModel built with kv_cache=True, after a
    prefill of `prompt_len` tokens and one untimed warm-up step (first calls compile and
    plan). The step is `run_cached`, the eager step. Where generate() runs static steps
    (`model.uses_static_decode()`, CUDA graphs on a GPU), the graph holds these same
    kernels plus a few small ones that compute the positions and the key bias; its host
    cost is one replay."""
    device = model.device
    vocab = _vocab_size(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len + steps + 2), generator=gen, device="cpu").to(device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    with model.kv_cache_lease(batch, ids.shape[1]) as cache, torch.no_grad():
        model.run_cached(ids[:, :prompt_len], 0, pad, cache)
        pos = prompt_len
        model.run_cached(ids[:, pos:pos + 1], pos, pad, cache)  # warm-up
        pos += 1
        host = []
        for _ in range(steps):  # timed without the counters, which slow the host down
            t0 = time.perf_counter()
            model.run_cached(ids[:, pos:pos + 1], pos, pad, cache)
            host.append(time.perf_counter() - t0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        with LaunchCounter() as c:
            for k in range(steps):
                model.run_cached(ids[:, pos + k:pos + k + 1], pos + k, pad, cache)
    per = lambda x: x / steps  # noqa: E731
    return DecodeProfile(steps, per(c.triton), per(c.torch), per(c.syncs), min(host) * 1e6,
                         [(n, per(k)) for n, k in c.by_name.most_common()],
                         {n: per(k) for n, k in c.sync_names.items()})


def _vocab_size(model) -> int:
    from ..ir import roles

    index = roles.output_index(model.graph, roles.LOGITS)
    return int(model.graph.outputs[index].shape[-1])
