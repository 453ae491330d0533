"""The non-tensor arguments of a call: whether one is the constant the graph was captured
with, and which arguments forward() takes at a default a call may pass explicitly."""
from __future__ import annotations

import inspect
import math

# defaults a call may pass as they are: passing one is the same call as leaving it out
_PLAIN = (type(None), bool, int, float, str)
# transformers reads these through **kwargs, each defaulting to the config field of its name
# (can_return_tuple: config.return_dict; output_attentions / output_hidden_states likewise)
_CONFIG_DEFAULTS = ("return_dict", "output_attentions", "output_hidden_states")


def forward_defaults(model) -> dict:
    """{argument: the value forward() takes when a call leaves it out}, for the arguments
    whose default is plain data (None, a bool, a number, a string). A call that passes one
    at that value is the call without it, so the graph captured without it answers it
    (attention_mask=None, labels=None, return_dict=True on a transformers model)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    out = {name: p.default for name, p in params.items()
           if p.default is not inspect.Parameter.empty and type(p.default) in _PLAIN}
    config = getattr(model, "config", None)
    if config is not None and any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for name in _CONFIG_DEFAULTS:
            value = getattr(config, name, None)
            if type(value) is bool and name not in params:
                out[name] = value
    return out


def same_constant(a, b) -> bool:
    """Whether the call's argument `a` is the constant `b` the graph was captured with, as
    the model's code could tell them apart: == is not enough, for 1 == 1.0 == True while
    `x.long() * k` has another dtype at k=1.0 and `flag is True` another branch. So the
    types must be the same (bool, int, float distinct), a float the same bits up to NaN
    (NaN is NaN, 0.0 is not -0.0: 1 / s differs), containers element by element. A saved
    model's constants come back from JSON with the same types (bool, int, float, NaN).
    A numpy scalar that is an instance of the captured type (np.float64 is a float, to
    isinstance and to torch alike) counts as that type; np.True_ (not a bool: `flag is
    True` is False for it) and np.float32 (not a float) do not."""
    if a is b:
        return True
    if type(a) is not type(b):
        if type(b) in (float, complex) and isinstance(a, type(b)) and type(a).__module__ == "numpy":
            return same_constant(type(b)(a), b)
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, complex):
        return same_constant(a.real, b.real) and same_constant(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_constant(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_constant(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same_constant(x, y) for y in b) for x in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 (an == that does not give one bool: only the object itself)
        return False


def numpy_hint(value, captured) -> str:
    """A hint for a numpy scalar given for a captured Python constant: pass the Python one."""
    if type(value).__module__ != "numpy" or not hasattr(value, "item"):
        return ""
    py = type(captured).__name__
    why = "`flag is True` is False for it" if py == "bool" else f"isinstance(value, {py}) is False for it"
    return f"; a numpy {type(value).__name__} is not a Python {py} to the model's code ({why}): pass {py}(value)"
