"""Backends by name: which Backend object runs an optimized graph (see base.py).

  torch      PyTorch library calls (SDPA, packed quantized kernels); the default on CPU.
  triton     our Triton kernels on CUDA; the default when the model is on a GPU.
  interpret  the same Triton kernels through Triton's interpreter on CPU tensors (tests).

`register_backend(name, factory)` adds one: `factory(device, **options) -> Backend`.
The registry is explicit (a dict you can pass around); the default one is below.
"""
from __future__ import annotations

from typing import Callable

import torch

from .base import Backend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend, attention_dispatch, triton_available


def _triton(device, **options):
    return TritonBackend(device, interpret=False, **options)


def _interpret(device, **options):
    return TritonBackend(device, interpret=True, **options)


# the registry optimize() uses
BACKENDS: dict[str, Callable[..., Backend]] = {"torch": TorchBackend, "triton": _triton, "interpret": _interpret}


def register_backend(name: str, factory: Callable[..., Backend], *, replace: bool = False,
                     registry: dict | None = None):
    """Make `optimize(..., backend=name)` build its backend with `factory(device, **options)`."""
    registry = BACKENDS if registry is None else registry
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it picks triton on CUDA and torch elsewhere")
    if name in registry and not replace:
        raise ValueError(f"backend {name!r} is already registered; pass replace=True to replace it")
    registry[name] = factory


def unregister_backend(name: str, registry: dict | None = None):
    registry = BACKENDS if registry is None else registry
    if name in ("torch", "triton", "interpret"):
        raise ValueError(f"backend {name!r} is built in and cannot be removed")
    registry.pop(name, None)


def resolve_backend(name, device: torch.device, registry: dict | None = None, cpu_linear: bool | str = True,
                    process_group=None, **options) -> Backend:
    """The Backend for `name` ("auto", a registered name, or a Backend instance).
    cpu_linear: optimize()'s setting (runtime/cpu_linear.py), checked here; it reaches the
    backend's factory only when it is not the default, since only the torch backend plans it.
    process_group: the torch.distributed group a tensor-parallel graph's collectives run on;
    it reaches the factory only when given (None: the default group)."""
    from ..cpu_linear import cpu_linear_mode

    mode = cpu_linear_mode(cpu_linear)
    if mode != "cached":
        options["cpu_linear"] = mode
    if process_group is not None:
        options["process_group"] = process_group
    if isinstance(name, Backend):
        if process_group is not None:
            if name.process_group is not None and name.process_group is not process_group:
                raise ValueError(f"backend {name!r} already holds another process group than the one given")
            name.process_group = process_group
        return name
    registry = BACKENDS if registry is None else registry
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if name not in registry:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(registry)} "
                         "(fxforge.register_backend adds your own)")
    backend = registry[name](torch.device(device), **options)
    if not isinstance(backend, Backend):
        raise TypeError(f"the factory of backend {name!r} returned {type(backend).__name__}, not a Backend")
    return backend


def op_table(name: str = "torch", registry=None, kernels=None, device="cpu") -> dict:
    """IR op name -> implementation for a backend by name, on `device` (tests and the gqa
    calibration use it). `kernels`: a PointwiseKernels for the Triton backends to use."""
    backend = resolve_backend(name, torch.device(device))
    if kernels is not None and isinstance(backend, TritonBackend):
        backend.pointwise = kernels
    return backend.op_table(registry)


__all__ = ["Backend", "TorchBackend", "TritonBackend", "register_backend", "unregister_backend",
           "resolve_backend", "op_table", "attention_dispatch", "triton_available", "BACKENDS"]
