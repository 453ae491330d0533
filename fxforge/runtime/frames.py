"""Keep the hot Python frames of a model call off CPython's data-stack chunk boundaries.

CPython (3.11 on) keeps Python frames on a "data stack" made of 16 KiB chunks (2048
slots) and frees a chunk as soon as the first frame in it returns. A caller whose frame
nearly fills a chunk leaves no room for the frames of the functions it calls, so each
such call maps a fresh chunk and unmaps it on return. A generated program calls hundreds
of ops that are Python functions: on SmolLM2 that was about 300 mmap/munmap pairs per
decode step, each one a TLB shootdown that also stalls the OpenMP worker thread, and
decoding ran at full or at half speed depending on how deep the caller's stack happened
to be (measured in docs/benchmarks.md).

A frame bigger than a chunk never fits in the caller's chunk: it starts a chunk of its
own, which CPython sizes with at least 1000 free slots after the frame, so everything it
calls stays inside that chunk. `frame_of_its_own` gives a function such a frame by
reserving a bigger value stack (unused slots: nothing else changes). The price is one
32 KiB map per call of that function, so it goes only on the few entry points that make
many Python calls (a program, a model call, generate()), never on the ops themselves.
"""
from __future__ import annotations

import inspect
import types

# One data-stack chunk, in slots (pointers): DATA_STACK_CHUNK_SIZE / sizeof(PyObject *).
FRAME_SLOTS_MIN = 2048
# A generator's or coroutine's frame lives in its object, not on the data stack: padding
# it would only make every such object 16 KiB bigger.
_OWN_FRAME_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def with_frame_of_its_own(code: types.CodeType) -> types.CodeType:
    """`code` with its value stack grown so that its frame takes FRAME_SLOTS_MIN slots or more."""
    slots = code.co_nlocals + code.co_stacksize
    if slots >= FRAME_SLOTS_MIN or code.co_flags & _OWN_FRAME_FLAGS:
        return code
    return code.replace(co_stacksize=code.co_stacksize + FRAME_SLOTS_MIN - slots)


def frame_of_its_own(fn):
    """Decorator: `fn` always starts a data-stack chunk of its own (see the module doc)."""
    fn.__code__ = with_frame_of_its_own(fn.__code__)
    return fn


def frame_slots(fn) -> int:
    """The frame size of a Python function, in slots (locals + value stack)."""
    return fn.__code__.co_nlocals + fn.__code__.co_stacksize
