"""Operators from outside PyTorch that a graph calls through `torch_call` (transformers'
`transformers.grouped_mm_fallback`, a user's `torch.library.custom_op`), and the Python
module that registers each one.

Why: such an op exists in `torch.ops` only once its module has been imported. A model's
code imports it before capture; a new process that loads a saved program (fxforge.load)
never builds the model, so save() records each op's module and load() imports it, and
an op nobody registered fails at load (and whenever a program is built: runtime/program.py)
with its name and the module to import, not with an AttributeError at its first call. An
op no import can register (defined in the saving script, `__main__`, or with the older
torch.library.Library API, whose module cannot be told) is warned about at save().
"""
from __future__ import annotations

import importlib
import sys

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
        OPDEFS = {}
    opdef = OPDEFS.get(f"{namespace}::{name}")
    fn = getattr(opdef, "_init_fn", None)
    module = getattr(fn, "__module__", None)
    if module is None and namespace in sys.modules and namespace != "__main__":
        # an op of the older torch.library.Library API or a C++ extension keeps no Python
        # function: a loaded module named after its namespace (torchvision's ops) registers it
        module = namespace
    return module


# what a module recorded for an op means when a new process cannot import it to register the op
_NOT_IMPORTABLE = {"__main__": "the script that saved the model (module __main__), which another process "
                               "cannot import",
                   None: "code fxforge cannot trace to a module (torch.library.Library, or a C++ extension)"}


def unimportable_ops(modules: dict[str, str | None]) -> dict[str, str]:
    """{target: why no new process can import what registers it} for the ops of
    `modules` (op_modules' answer) that a load elsewhere cannot register by itself."""
    return {target: _NOT_IMPORTABLE[module] for target, module in modules.items() if module in _NOT_IMPORTABLE}


def import_op_modules(modules: dict[str, str | None]) -> None:
    """Import the module of each op that is not registered yet (what load() calls). A
    module no import can give (the saving script's __main__, none recorded) is skipped:
    check_registered names those ops."""
    for target, module in modules.items():
        if _registered(target) or module in _NOT_IMPORTABLE:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CustomOpMissing(
                f"the saved program calls the operator {target!r}, registered by the Python module {module!r}, "
                f"which does not import here ({e}); install what provides it (the library the model came from) "
                "and load again") from e


def check_registered(targets, modules: dict[str, str | None] | None = None) -> None:
    """Raise CustomOpMissing naming every operator of `targets` (torch_call targets) that is
    not registered in this process, with what registered it where that is known
    (`modules`: a save's op_modules): a program is built whole, so an op that is missing
    fails it then, not at its first call with an AttributeError from torch.ops."""
    missing = [t for t in dict.fromkeys(targets) if not _resolves(t)]
    if not missing:
        return
    modules = modules or {}
    if len(missing) == 1:
        raise missing_op_error(missing[0], modules)
    raise CustomOpMissing(f"the program calls {len(missing)} operators not registered in this process:\n"
                          + "\n".join(f"  - {t}: {_how_to_register(t, modules)}" for t in missing))


def _how_to_register(target: str, modules: dict[str, str | None]) -> str:
    if target in modules and modules[target] in _NOT_IMPORTABLE:
        return (f"it was registered by {_NOT_IMPORTABLE[modules[target]]}; run the code that defines it (its "
                f"torch.library definition, {_schema_name(target)!r}) before fxforge.load, or move that code "
                "into a module that can be imported and save the model again")
    module = modules.get(target)
    if module and module in sys.modules:
        return (f"its module {module}, which registered it when the model was saved, imports here but does not "
                "register it (another version of that library?); install the version the model was saved with")
    if module:
        return f"import {module} (the module that registered it when the model was saved) first"
    return (f"import the library that defines the {namespace_of(target)!r} operators (for a model from "
            "transformers, the transformers module that registers it) first")


def _schema_name(target: str) -> str:
    namespace, name = target.split(".")[:2]
    return f"{namespace}::{name}"


def _registered(target: str) -> bool:
    namespace, name = target.split(".")[:2]
    return hasattr(getattr(torch.ops, namespace), name)


def _resolves(target: str) -> bool:
    """Whether torch.ops.<target> (overload included) exists here."""
    obj = torch.ops
    try:
        for part in target.split("."):
            obj = getattr(obj, part)
    except (AttributeError, RuntimeError):
        return False
    return True


def missing_op_error(target: str, modules: dict[str, str | None] | None = None) -> CustomOpMissing:
    """The error for a torch_call whose operator is not registered in this process."""
    return CustomOpMissing(f"the program calls the operator {target!r}, which is not registered in this process: "
                           f"{_how_to_register(target, modules or {})}")
