"""The torch.finfo values a model may bake into its graph, and their names.

A float a model computed from its dtype while it was captured (`torch.finfo(x.dtype).eps`
in a hand-written RMSNorm, a `finfo.min` mask fill, T5's clamp to `finfo.max - 1000`) is
only a number in the graph. Capture names it where it notes a constant tensor
(ir/capture.py), and `OptimizedModel.to(dtype)` looks for it among the graph's scalars,
names it and says what it is in the new dtype (runtime/retarget.py). Both read the same
fields and the same naming, so they live here, apart from either.
"""
from __future__ import annotations

import torch

# the torch.finfo fields a model takes constants from (an epsilon, a mask fill, a clamp
# bound): a float equal to one of these for the dtype it was captured in was, as likely
# as not, computed from that dtype; `resolution` is left out (1e-06 for float32: a common
# literal epsilon). smallest_subnormal is tiny * eps (not every torch's finfo has it).
_FINFO_FIELDS = ("eps", "tiny", "max", "smallest_subnormal")


def finfo_value(dtype: torch.dtype, field: str) -> float:
    info = torch.finfo(dtype)
    if field == "smallest_subnormal":
        return float(info.tiny) * float(info.eps)
    return float(getattr(info, field))


def finfo_name(value, dtype: torch.dtype) -> str | None:
    """`torch.finfo(dtype).<field>` (or its negative: `-...eps`, `...min`) where the Python
    float `value` equals it exactly, else None."""
    if isinstance(value, bool) or not isinstance(value, float) or not dtype.is_floating_point:
        return None
    for name in _FINFO_FIELDS:
        if abs(value) == finfo_value(dtype, name):
            if name == "max":
                name = "max" if value > 0 else "min"
            return f"{'-' if value < 0 and name != 'min' else ''}torch.finfo({dtype}).{name}"
    return None


def finfo_named_value(named: str, dtype: torch.dtype) -> float:
    """The value for `dtype` of what finfo_name named for another dtype
    ("torch.finfo(torch.float32).eps", "-torch.finfo(...).tiny", "...min")."""
    sign, field = named.startswith("-"), named.rpartition(".")[2]
    value = finfo_value(dtype, "max" if field == "min" else field) * (-1 if field == "min" else 1)
    return -value if sign else value
