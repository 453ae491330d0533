"""One walk over a node's attribute values at any depth.

Attrs nest: a torch_call keeps its ATen arguments as tuples and lists, a fused node keeps
its ops' attrs inside its `body`. Passes that look for something in them (a size symbol,
the length T used as a value, a float that depends on the dtype) walk the same structure,
and each needs only to know where a leaf sits; so the walk is written once, here.
"""
from __future__ import annotations

from typing import Iterator


def attr_leaves(value, trail: tuple = ()) -> Iterator[tuple[object, tuple]]:
    """(leaf, trail) for each leaf of `value`: the items of tuples and lists and the values
    of dicts, at any depth; anything else (a number, a sympy expression, a string, a dtype)
    is a leaf. `trail` holds a (container, key or index) step for each level from the
    top down to the leaf, for a caller that needs to know where it sits: inside a list,
    under which attribute name, in which fused body entry."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        yield value, trail
        return
    for key, item in items:
        yield from attr_leaves(item, trail + ((value, key),))
