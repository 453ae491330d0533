"""fast.save(path) and fxforge.load(path): an optimized model as files that load in a new
process without the model's class and without capture.

Layout (a directory, so that each part can be read by its own tool):

    path/
      model.ir             the optimized IR as text (as the passes left it; the backend's
                           planning, e.g. cpu_linear, is redone at load for the machine)
      weights.safetensors  every parameter the IR names, by that name (quantized tensors
                           included); tied weights are stored once
      meta.json            the format and its version, the call spec (argument and output
                           structure), generation defaults (eos/pad), the model name, the
                           transformers config, which weights are stored under another name,
                           and the module that registers each operator from outside PyTorch
                           the IR calls (imported at load: ir/custom_ops.py)

A file of another format version is refused with an error that names both versions.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import warnings

import torch

from ..ir.custom_ops import check_registered, import_op_modules, op_modules, unimportable_ops
from ..ir.parser import ParseError
from .call_spec_json import call_spec_from_json, call_spec_to_json

FORMAT = "fxforge-saved-model"
FORMAT_VERSION = 1
IR_FILE, WEIGHTS_FILE, META_FILE = "model.ir", "weights.safetensors", "meta.json"


class IncompatibleSaveError(ValueError):
    """The directory was not written by save(), or by a version this fxforge cannot read."""


# -- save ---------------------------------------------------------------------------------
def save_model(fast, path: str) -> str:
    """Write `fast` (an OptimizedModel) to the directory `path` (created; files in it are
    overwritten). Returns the path."""
    from safetensors.torch import save_file

    from ..ir.printer import print_graph

    _check_save_path(path)
    graph = fast.pipeline_graph
    tensors, aliases = _unique_tensors(graph.params)
    _check_storable(tensors)
    modules = op_modules(graph)
    _warn_unimportable(modules)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxforge_version": _fxforge_version(),
        "torch_version": torch.__version__,
        "model_name": fast.model_name,
        "call_spec": call_spec_to_json(fast.spec),
        "generation_defaults": dict(fast.generation_defaults),
        "left_padding_shifts_positions": bool(fast.left_padding_shifts_positions),
        "config": _config_to_json(fast.config),
        "aliases": aliases,
        # operators from outside PyTorch the IR calls, and the module that registers each:
        # load() imports them, since a new process never builds the model that did
        "op_modules": modules,
    }
    remembered = _cpu_linear_choices(fast)
    if remembered is not None:
        meta["cpu_linear"] = remembered
    text = print_graph(graph)  # before anything is written: a graph that cannot print leaves no half save
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a file where a folder of the path should be
        raise NotADirectoryError(f"cannot save to {path}: {e.strerror} ({e.filename}); fast.save(path) writes a "
                                 "directory (model.ir, weights.safetensors, meta.json), so give the path of a "
                                 "directory, new or one save() wrote before") from None
    with open(os.path.join(path, IR_FILE), "w") as f:
        f.write(text)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE),
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return path


def _check_save_path(path) -> None:
    """`path` names a directory to write (or a place for one): not an existing file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"fast.save(path) takes the path of a directory (a str), got {type(path).__name__}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"cannot save to {path}: it is a file, and fast.save(path) writes a directory "
                                 "(model.ir, weights.safetensors, meta.json); give the path of a directory, new or "
                                 "one save() wrote before")


def _check_storable(tensors: dict) -> None:
    """Refuse, naming them, weights of a dtype safetensors cannot store (complex128,
    complex32 in safetensors 0.8), before any file is written."""
    by_dtype: dict = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    bad = {dtype: names for dtype, names in by_dtype.items() if not _safetensors_stores(dtype)}
    if bad:
        dtype, names = next(iter(bad.items()))
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise TypeError(f"cannot save: the weight {names[0]!r}{more} is a {dtype} tensor, which {WEIGHTS_FILE} "
                        "(safetensors) cannot store; give the model that tensor in a dtype it stores (complex64, "
                        "or torch.view_as_real's float pair) and optimize it again")


@functools.lru_cache(maxsize=None)
def _safetensors_stores(dtype: torch.dtype) -> bool:
    """Whether safetensors (this version) writes tensors of `dtype`: asked of safetensors
    itself, as its table of dtypes is private and grows with its versions."""
    from safetensors.torch import save

    try:
        with warnings.catch_warnings():  # complex32: "ComplexHalf support is experimental"
            warnings.simplefilter("ignore")
            save({"t": torch.zeros(1, dtype=dtype)})
    except Exception:  # noqa: BLE001 (KeyError for an unknown dtype; whatever another version raises)
        return False
    return True


def _warn_unimportable(modules: dict) -> None:
    """Warn about each op a new process cannot register by an import (the save loads only
    where the loading code registers it first): the save still holds the right program."""
    for target, why in unimportable_ops(modules).items():
        warnings.warn(f"the program calls the operator {target!r}, registered by {why}: fxforge.load() in a new "
                      "process fails with CustomOpMissing unless the loading code registers it first; to load "
                      "anywhere, define it in a module that can be imported and save again", stacklevel=4)


def _cpu_linear_choices(fast) -> dict | None:
    """The CPU linear kernels the program runs (runtime/cpu_linear.py: chosen by timing
    once per machine), so that a load on this machine builds the same program (the same
    float rounding) whatever its cache holds by then. None where none were chosen."""
    from .cpu_linear_cache import decisions_document

    for stats in fast.runtime_stats:
        remembered = stats.details.get("cpu_linear", {}).get("remembered")
        if remembered is not None and remembered.decisions:
            return decisions_document(remembered.fingerprint, remembered.decisions)
    return None


def _remembered_cpu_linear(meta: dict, meta_path: str, cpu_linear):
    """load()'s cpu_linear mode: the saved program's choices (cpu_linear.Remembered) unless
    the caller asked to measure again or for no choice at all."""
    from .cpu_linear import Remembered
    from .cpu_linear_cache import decisions_from_document

    doc = meta.get("cpu_linear")
    if doc is None or not (cpu_linear is True or cpu_linear == "cached"):
        return cpu_linear
    try:
        fingerprint, decisions = decisions_from_document(doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(meta_path, "cpu_linear", f"it cannot be read ({type(e).__name__}: {e})") from None
    return Remembered(fingerprint, decisions)


def _unique_tensors(params: dict) -> tuple[dict, dict]:
    """(name -> contiguous CPU tensor, name -> name it is stored under). safetensors refuses
    tensors that share memory: the same view twice (tied weights) is stored once, and any
    other overlap is copied."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in params.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in by_view:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        out = t.detach().to("cpu").contiguous()
        if out.untyped_storage().data_ptr() in storages or out.data_ptr() != out.untyped_storage().data_ptr() \
                or out.numel() * out.element_size() != out.untyped_storage().nbytes():
            out = out.clone()  # a slice of a larger tensor, or one that shares memory with another
        storages.add(out.untyped_storage().data_ptr())
        stored[name] = out
    return stored, aliases


def _config_to_json(config) -> dict | None:
    """A transformers config as {"class": path, "values": to_dict()}; None if there is none."""
    if config is None:
        return None
    if not (hasattr(config, "to_json_string") and hasattr(type(config), "from_dict")):
        warnings.warn(f"model.config is a {type(config).__name__}, not a transformers config: it is not saved",
                      stacklevel=3)
        return None
    cls = type(config)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "values": json.loads(config.to_json_string(use_diff=False))}


# -- load ---------------------------------------------------------------------------------
def _check_load_device(path, device):
    """A device the weights can be loaded onto, named in the error where not (the file is
    fine: blaming it sent users to save again)."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"cannot load {path}: device={device!r} is not a device ({error}); use 'cpu' or 'cuda'") \
            from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"cannot load {path} onto device {str(device)!r}: an optimized model runs on 'cpu' or "
                         "'cuda' (its backends' devices), and its weights are real tensors there")


def load_model(path: str, *, backend="auto", device=None, cpu_linear: bool | str = True):
    """The OptimizedModel saved in the directory `path` by `fast.save(path)`."""
    from safetensors.torch import load_file

    from .build import model_from_ir

    _check_load_device(path, device)
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"cannot load {path} onto device {str(device)!r}: CUDA is not available on this machine "
                           "(torch.cuda.is_available() is False); load it with device='cpu' (the default)")
    meta = read_meta(path)
    meta_path = os.path.join(path, META_FILE)
    _check_files(path)
    modules = meta.get("op_modules", {})  # (saves before session 13 have none)
    import_op_modules(modules)
    check_registered(modules, modules)  # all at once, each with what registers it (build_program checks the rest)
    with open(os.path.join(path, IR_FILE)) as f:
        text = f.read()
    weights_path = os.path.join(path, WEIGHTS_FILE)
    try:
        weights = load_file(weights_path, device=str(device) if device is not None else "cpu")
    except PermissionError:  # not damaged: the user's to fix
        raise
    except Exception as e:  # noqa: BLE001 (safetensors' SafetensorError, an OSError, ...)
        raise IncompatibleSaveError(f"{weights_path} cannot be read ({type(e).__name__}: {e}): the file is damaged "
                                    "or cut short; save the model again with fast.save(path)") from None
    weights = _aligned(weights)
    for name, stored_as in meta["aliases"].items():
        if stored_as not in weights:
            raise _damaged(meta_path, "aliases", f"{name!r} is stored as {stored_as!r}, which {WEIGHTS_FILE} does "
                                                 "not hold")
        weights[name] = weights[stored_as]
    try:
        spec = call_spec_from_json(meta["call_spec"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _damaged(meta_path, "call_spec", f"it cannot be read ({type(e).__name__}: {e})") from None
    try:
        fast = model_from_ir(text, weights, spec=spec, name=meta["model_name"], backend=backend, device=device,
                             cpu_linear=_remembered_cpu_linear(meta, meta_path, cpu_linear))
    except ParseError as e:
        raise ParseError(f"{os.path.join(path, IR_FILE)}: {e}") from None
    fast.generation_defaults = dict(meta["generation_defaults"])
    fast.left_padding_shifts_positions = bool(meta.get("left_padding_shifts_positions", False))  # older saves
    fast.config = _config_from_json(meta["config"])
    return fast


def _check_files(path: str) -> None:
    """Each file of a save is there (meta.json was checked by read_meta)."""
    for name in (IR_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise IncompatibleSaveError(f"{os.path.join(path, name)} is missing: a save is a directory with "
                                        f"{IR_FILE}, {WEIGHTS_FILE} and {META_FILE}, as fast.save(path) writes it; "
                                        "copy the whole directory, or save the model again")


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives, and more than any kernel asks


def _aligned(weights: dict) -> dict:
    """`weights` with each tensor not at an ALIGNMENT-byte address copied to one that is.

    safetensors.load_file gives tensors that point into one buffer at their file offsets,
    aligned to 8 bytes only; some kernels read 16 or more at a time and need more (PyTorch's
    bf16 int8 matmul, `_weight_int8pack_mm`, crashes the process on an int8 weight 8 bytes
    off 16). A copy costs one pass over the few tensors that need it."""
    return {name: t if t.data_ptr() % ALIGNMENT == 0 else t.clone() for name, t in weights.items()}


def read_meta(path: str) -> dict:
    """meta.json of a saved model, after checking that this fxforge can read it."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isdir(path) or not os.path.exists(meta_path):
        raise IncompatibleSaveError(f"{path} is not a model saved by fxforge: expected a directory with "
                                    f"{IR_FILE}, {WEIGHTS_FILE} and {META_FILE} (write one with fast.save(path))")
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise IncompatibleSaveError(f"{meta_path} is not valid JSON ({e}): the file is damaged or cut short; "
                                        "save the model again with fast.save(path)") from None
    if not isinstance(meta, dict):
        raise IncompatibleSaveError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object: the file is "
                                    "damaged; save the model again with fast.save(path)")
    if meta.get("format") != FORMAT:
        raise IncompatibleSaveError(f"{meta_path} is not an fxforge save file (format {meta.get('format')!r}, "
                                    f"expected {FORMAT!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):  # "1" is not format 1: an edit
        raise _damaged(meta_path, "format_version", f"it is the JSON {_json_type(version)} {json.dumps(version)}, "
                                                    f"expected a number (this fxforge writes {FORMAT_VERSION})")
    if version != FORMAT_VERSION:
        raise IncompatibleSaveError(
            f"{path} was saved by fxforge {meta.get('fxforge_version', '?')} in save format {version}; this fxforge "
            f"({_fxforge_version()}) reads format {FORMAT_VERSION} only. Load it with the fxforge that saved it, "
            "or optimize the model again and save it with this one")
    for key, types, what in _FIELDS:
        if key not in meta:
            raise _damaged(meta_path, key, "it is missing")
        if not isinstance(meta[key], types):
            raise _damaged(meta_path, key, f"it is a JSON {_json_type(meta[key])}, expected {what}")
    bad = [k for k, v in meta["aliases"].items() if not isinstance(v, str)]
    if bad:
        raise _damaged(meta_path, "aliases", f"{bad[0]!r} is not mapped to the name of a stored weight")
    if meta["config"] is not None and not (isinstance(meta["config"].get("class"), str)
                                           and isinstance(meta["config"].get("values"), dict)):
        raise _damaged(meta_path, "config", 'expected {"class": "module:Class", "values": {...}} or null')
    modules = meta.get("op_modules", {})  # (saves before session 13 have none)
    if not isinstance(modules, dict):
        raise _damaged(meta_path, "op_modules", f"it is a JSON {_json_type(modules)}, expected an object mapping "
                                                'an operator ("namespace.name") to the module that registers it')
    for target, module in modules.items():
        parts = target.split(".")
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise _damaged(meta_path, "op_modules", f"{target!r} is not an operator name such as "
                                                    '"transformers.grouped_mm_fallback" (namespace.name)')
        if module is not None and not (isinstance(module, str) and all(p.isidentifier() for p in module.split("."))):
            raise _damaged(meta_path, "op_modules", f"the module of {target!r}, {json.dumps(module)}, is not a "
                                                    "Python module name (or null)")
    from .generate import DEFAULTS

    def _is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def token_ids(v):
        return v is None or _is_int(v) or (isinstance(v, list) and all(_is_int(t) for t in v))

    for key, value in meta["generation_defaults"].items():
        default = DEFAULTS.get(key)
        if key.endswith("token_id") or key.endswith("suppress_tokens"):
            ok, want = token_ids(value), "a token id, a list of token ids or null"
        elif key == "stop_strings":
            ok = value is None or isinstance(value, str) or (isinstance(value, list)
                                                             and all(isinstance(t, str) for t in value))
            want = "a string, a list of strings or null"
        elif isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int) or key in _AT_LEAST:
            least = _AT_LEAST.get(key)
            ok = value is None or (_is_int(value) and (least is None or value >= least))
            want = "an integer" if least is None else f"an integer >= {least} (or null)"
        elif isinstance(default, float):
            ok, want = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), "a number"
        else:  # a setting generate() refuses anyway (kept so that it does): any JSON value
            continue
        if not ok:
            raise _damaged(meta_path, "generation_defaults", f"{key}={json.dumps(value)} is not {want}")
    return meta


# the least value of each count generate() takes (what its own checks refuse below it):
# a meta.json holding less was edited, and is refused at load rather than at a later generate
_AT_LEAST = {"max_new_tokens": 1, "max_length": 0, "min_new_tokens": 0, "min_length": 0, "top_k": 0,
             "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "num_beams": 1,
             "num_return_sequences": 1}

# the fields load() reads from meta.json: (key, accepted types, what it should be)
_FIELDS = (("model_name", (str, type(None)), "a string"),
           ("call_spec", dict, "an object (the model's argument and output structure)"),
           ("generation_defaults", dict, "an object such as {\"eos_token_id\": 2}"),
           ("config", (dict, type(None)), "an object or null"),
           ("aliases", dict, "an object mapping a weight's name to the name it is stored under"))


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _damaged(meta_path: str, key: str, why: str) -> IncompatibleSaveError:
    return IncompatibleSaveError(f"{meta_path}: the field {key!r} is not as fast.save() writes it: {why}. The file "
                                 "was edited or damaged; save the model again with this fxforge (fast.save(path))")


def _config_from_json(data):
    if data is None:
        return None
    module_name, _, qualname = data["class"].partition(":")
    values = _special_floats_decoded(data["values"])
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as e:
        warnings.warn(f"the saved config is a {data['class']}, which cannot be imported here ({e}); "
                      "fast.config is its dict of values instead", stacklevel=3)
        return values
    try:
        return cls.from_dict(values)
    except Exception as e:  # noqa: BLE001 (another transformers version may validate otherwise)
        warnings.warn(f"the saved {qualname} could not be rebuilt here ({type(e).__name__}: {str(e)[:200]}); "
                      "fast.config is its dict of values instead", stacklevel=3)
        return values


_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_floats_decoded(obj):
    """`obj` with transformers' JSON tags for floats JSON cannot hold ({"__float__":
    "Infinity"}, as to_json_string writes Mamba2's time_step_limit=(0.0, inf)) read back as
    floats; from_dict does not decode them itself."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {k: _special_floats_decoded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_special_floats_decoded(v) for v in obj]
    return obj


def _fxforge_version() -> str:
    from .. import __version__

    return __version__
