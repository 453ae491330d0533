"""Forward hooks on the model at capture: their output changes are traced into the graph,
but their Python side effects (recording activations, counting calls) run only while
capturing, never on the optimized model's calls. optimize() says so, naming the modules."""
from __future__ import annotations

import warnings

import torch

# hooks of these libraries are theirs, not the user's: transformers records outputs
# (output_hidden_states / attentions) through hooks whose work is part of the traced call
_LIBRARY_HOOKS = ("transformers.", "fxforge.")


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """'name (kinds)' for each module of `model` with a forward hook or pre-hook of the
    user's, and 'all modules (global ...)' for hooks registered on every module."""
    from torch.nn.modules import module as nn_module

    found = []
    for name, m in model.named_modules():
        kinds = [kind for kind, hooks in (("forward hook", m._forward_hooks), ("forward pre-hook", m._forward_pre_hooks))
                 if any(_users(h) for h in hooks.values())]
        if kinds:
            found.append(f"{name or type(model).__name__} ({', '.join(kinds)})")
    for kind, hooks in (("global forward hook", nn_module._global_forward_hooks),
                        ("global forward pre-hook", nn_module._global_forward_pre_hooks)):
        if any(_users(h) for h in hooks.values()):
            found.append(f"every module ({kind}, register_module_forward_{'pre_' if 'pre' in kind else ''}hook)")
    return found


def warn_about_hooks(model: torch.nn.Module):
    found = hooked_modules(model)
    if not found:
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    warnings.warn(f"{type(model).__name__} has forward hooks on {shown}: they ran while capturing, so what they do "
                  "to inputs and outputs is part of the optimized graph, but their Python side effects (recording "
                  "activations, counters, prints) will not run on the optimized model's calls. Call the original "
                  "model where those side effects are needed.", stacklevel=4)


def _users(hook) -> bool:
    fn = getattr(hook, "hook", hook)  # torch's _WrappedHook
    fn = getattr(fn, "func", fn)  # functools.partial
    return not (getattr(fn, "__module__", None) or "").startswith(_LIBRARY_HOOKS)
