"""A CallSpec (how the model is called and what structure it returns) as JSON, and back.

Why not pickle or torch's treespec_dumps: both need the output classes importable and
registered at load time, and fail opaquely when they are not. Here each pytree node is
written as plain data: built-in containers by name, any other class (a transformers
ModelOutput, a namedtuple) by its import path and field names. Loading rebuilds the class
when it can be imported; when it cannot (transformers not installed), the outputs come back
as a dict with the same keys, with a warning, rather than not at all.
"""
from __future__ import annotations

import importlib
import math
import warnings
from collections import OrderedDict
from typing import Any

import torch.utils._pytree as pytree

from ..ir.capture import CallSpec

_CONTAINERS = {tuple: "tuple", list: "list", dict: "dict", OrderedDict: "ordered_dict", type(None): "none"}
_CONTAINER_TYPES = {name: t for t, name in _CONTAINERS.items()}


class UnsavableCallError(TypeError):
    """The model's inputs or outputs hold something save() cannot write as data."""


# -- TreeSpec -------------------------------------------------------------------------------
def treespec_to_json(spec) -> dict:
    if spec.is_leaf():
        return {"node": "leaf"}
    children = [treespec_to_json(spec.child(i)) for i in range(spec.num_children)]
    if spec.type in _CONTAINERS:
        return {"node": _CONTAINERS[spec.type], "context": _plain(spec.context, _where(spec)), "children": children}
    if _is_namedtuple(spec.type):
        return {"node": "namedtuple", "class": _class_path(spec.type), "fields": list(spec.type._fields),
                "children": children}
    # any other registered class whose context is its keys (transformers' ModelOutput)
    return {"node": "class", "class": _class_path(spec.type), "context": _plain(spec.context, _where(spec)),
            "children": children}


def _where(spec) -> str:
    return f"the structure of a {spec.type.__name__} in the model's inputs or outputs"


def treespec_from_json(data: dict):
    kind = data["node"]
    if kind == "leaf":
        return _leaf()
    children = [treespec_from_json(c) for c in data["children"]]
    if kind in _CONTAINER_TYPES:
        return pytree.TreeSpec(_CONTAINER_TYPES[kind], data["context"], children)
    cls = _import_class(data["class"])
    if kind == "namedtuple":
        if cls is None:
            return pytree.TreeSpec(tuple, None, children)
        return pytree.TreeSpec(cls, cls, children)
    if cls is None or cls not in pytree.SUPPORTED_NODES:
        keys = data["context"]
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            return pytree.TreeSpec(dict, keys, children)
        return pytree.TreeSpec(tuple, None, children)
    return pytree.TreeSpec(cls, data["context"], children)


# -- CallSpec -------------------------------------------------------------------------------
def call_spec_to_json(spec: CallSpec) -> dict:
    return {
        "in_spec": treespec_to_json(spec.in_spec),
        "input_leaves": [_leaf_entry(entry) for entry in spec.input_leaves],
        "out_spec": treespec_to_json(spec.out_spec),
        "output_leaves": [_leaf_entry(entry) for entry in spec.output_leaves],
        "injected_kwargs": _plain(spec.injected_kwargs, "the keyword arguments fxforge adds"),
        "kwarg_order": list(spec.kwarg_order),
        "positional_names": list(spec.positional_names),
        "default_kwargs": {k: v for k, v in spec.default_kwargs.items() if _is_plain(v)},
        "output_views_input": list(spec.output_views_input),
        "output_same_as": [[i, j] for i, j in spec.output_same_as.items()],
        "output_layouts": [[i, layout] for i, layout in spec.output_layouts.items()],
    }


def call_spec_from_json(data: dict) -> CallSpec:
    return CallSpec(treespec_from_json(data["in_spec"]), [tuple(e) for e in data["input_leaves"]],
                    treespec_from_json(data["out_spec"]), [tuple(e) for e in data["output_leaves"]],
                    dict(data["injected_kwargs"]), tuple(data["kwarg_order"]), tuple(data["positional_names"]),
                    dict(data.get("default_kwargs", {})),  # (older saves: none)
                    # (older saves: none, so every output aliasing an input is copied)
                    tuple(data.get("output_views_input", ())), {i: j for i, j in data.get("output_same_as", ())},
                    # (older saves: none, so outputs keep the graph's layout)
                    {i: layout for i, layout in data.get("output_layouts", ())})


# -- helpers --------------------------------------------------------------------------------
def _leaf_entry(entry) -> list:
    kind, payload = entry
    return [kind, _plain(payload, f"the constant argument or output {payload!r}")]


def _plain(value, where) -> Any:
    """`value` if it survives JSON unchanged (None, bool, int, float, str, lists, dicts
    with str keys), else a clear error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise UnsavableCallError(f"cannot save {where}: it holds a {type(value).__name__} ({value!r}), which is not "
                             "plain data; save() writes constants as JSON (None, bool, int, float, str, lists, "
                             "dicts with str keys)")


def _is_plain(value) -> bool:
    # a float default that JSON would not bring back the same (NaN, inf) is left out: a call
    # passing it is then refused, as it was before defaults were saved
    return value is None or type(value) in (bool, int, str) or (type(value) is float and math.isfinite(value))


def _is_namedtuple(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _class_path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str):
    """The class at `module:qualname`, or None (with a warning) when it cannot be imported."""
    module_name, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as e:
        warnings.warn(f"the saved model returns a {path}, which cannot be imported here ({e}); "
                      "it returns a dict with the same keys (a tuple for a namedtuple) instead", stacklevel=3)
        return None


def _leaf():
    return pytree.treespec_leaf() if hasattr(pytree, "treespec_leaf") else pytree.LeafSpec()
