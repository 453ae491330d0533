"""fxforge as a torch.compile backend.

    torch.compile(model, backend="fxforge")                 # after pip install (entry point)
    torch.compile(model, backend=fxforge.dynamo.backend)    # no installation needed
    fx = fxforge.dynamo.FxforgeBackend(quantize="int8")     # options, and a record of what it built
    torch.compile(model, backend=fx); ...; fx.models[0].ir

The name "fxforge" reaches torch through the `torch_dynamo_backends` entry point in
pyproject.toml (torch looks it up the first time the name is used), so importing fxforge
registers nothing and does not import torch._dynamo. From a source checkout that is not
installed, call fxforge.dynamo.register() once.
"""
from .backend import CompiledSubgraph, Fallback, FxforgeBackend, backend

# the entry point's target (pyproject.toml: [project.entry-points.torch_dynamo_backends])
fxforge_backend = backend

__all__ = ["FxforgeBackend", "CompiledSubgraph", "Fallback", "backend", "fxforge_backend", "register"]


def register(name: str = "fxforge"):
    """Make torch.compile(backend=name) find fxforge without the installed entry point.
    Registering the same name again is harmless."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if _COMPILER_FNS.get(name) is not backend:
        _COMPILER_FNS.pop(name, None)  # a stale registration (e.g. a reloaded module)
        register_backend(backend, name=name)
