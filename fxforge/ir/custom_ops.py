"""Operators from outside PyTorch that a graph calls through `torch_call` (transformers'
`transformers.grouped_mm_fallback`, a user's `torch.library.custom_op`), and the Python
module that registers each one.

Why: such an op exists in `torch.ops` only once its module has been imported. A model's
code imports it before capture; a new process that loads a saved program (fxforge.load)
never builds the model, so save() records each op's module and load() imports it, and
an op nobody registered fails with its name and the module to import, not with an
AttributeError from deep inside the program.
"""
from __future__ import annotations

import importlib

import torch

# namespaces PyTorch registers itself (their ops exist after `import torch`)
_TORCH_NAMESPACES = frozenset({"aten", "prims", "prim", "quantized", "_quantized", "mkldnn", "mkl", "onednn",
                               "_c10d_functional", "c10d", "c10d_functional", "profiler", "higher_order",
                               "inductor", "rngprims", "debugprims", "fbgemm", "_test", "cuda", "xpu"})


class CustomOpMissing(RuntimeError):
    """A torch_call target that is not registered in this process."""


def namespace_of(target: str) -> str:
    return target.split(".", 1)[0]


def is_custom(target: str) -> bool:
    return namespace_of(target) not in _TORCH_NAMESPACES


def op_modules(graph) -> dict[str, str | None]:
    """{target: the module that registers it (None: not found)} for every torch_call of
    `graph` whose op comes from outside PyTorch."""
    found: dict[str, str | None] = {}
    for node in graph.nodes:
        if node.op == "torch_call" and is_custom(node.attrs["target"]):
            target = node.attrs["target"]
            if target not in found:
                found[target] = _registering_module(target)
    return found


def _registering_module(target: str) -> str | None:
    namespace, name = target.split(".")[:2]
    try:  # ops made with torch.library.custom_op keep the function they wrap
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - older torch
        return None
    opdef = OPDEFS.get(f"{namespace}::{name}")
    fn = getattr(opdef, "_init_fn", None)
    return getattr(fn, "__module__", None)


def import_op_modules(modules: dict[str, str | None]) -> None:
    """Import the module of each op that is not registered yet (what load() calls)."""
    for target, module in modules.items():
        if _registered(target) or module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CustomOpMissing(
                f"the saved program calls the operator {target!r}, registered by the Python module {module!r}, "
                f"which does not import here ({e}); install what provides it (the library the model came from) "
                "and load again") from e


def _registered(target: str) -> bool:
    namespace, name = target.split(".")[:2]
    return hasattr(getattr(torch.ops, namespace), name)


def missing_op_error(target: str) -> CustomOpMissing:
    """The error for a torch_call whose operator is not registered in this process."""
    return CustomOpMissing(
        f"the program calls the operator {target!r}, which is not registered in this process: import the "
        f"library that defines the {namespace_of(target)!r} operators (for a model from transformers, the "
        "transformers module that registers it) before running it")
