"""Host time of a whole forward through the Triton backend with every Triton launch stubbed
out: what fxforge's program and launch wrappers cost per call before Triton's own launch
path and the GPU's work, for SmolLM2-135M's shapes with random weights. Runs anywhere (the
`interpret` backend plans exactly what `triton` plans; nothing is launched).

Inputs of 1-8 tokens, so that the stubbed kernels (decode GEMVs, attention, the generated
pointwise kernels) are nearly all the work, and what is timed is host time. Two rows: a
call with the shapes of the call before (a decode step, a repeated prompt length: every
launch plan is kept) and a call with a new length (every fused node plans its launch
again).

    python benchmarks/host_overhead.py [--layers 30] [--calls 10]
"""
import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # nothing is launched; keeps triton importable without a GPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxforge  # noqa: E402
from decode_launches import smollm2_random  # noqa: E402
from report import finish  # noqa: E402


def _stub_launches() -> list:
    """Make every Triton launch (a kernel's, an autotuned kernel's) do nothing; returns the
    list each launch appends to, to count them."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    launches = []

    def run(self, *args, **kwargs):
        launches.append(1)
    InterpretedFunction.run = run
    Autotuner.run = run
    return launches


def _ms_per_call(fast, inputs: list) -> float:
    """The median call's milliseconds (a shared machine's load shows in the mean)."""
    times = []
    for ids in inputs:
        start = time.perf_counter()
        fast(ids)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--calls", type=int, default=14)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = smollm2_random(args.layers)
    ids = torch.randint(3, 49152, (1, 1))
    fast = fxforge.optimize(model, (ids,), backend="interpret")
    launches = _stub_launches()
    fast(ids)
    fast(ids)
    rows = []
    del launches[:]
    same = _ms_per_call(fast, [ids] * args.calls)
    rows.append({"call": "same shapes as the call before", "host_ms": round(same, 2),
                 "launches": len(launches) // args.calls})
    del launches[:]
    new = _ms_per_call(fast, [torch.randint(3, 49152, (1, 2 + i)) for i in range(args.calls)])
    rows.append({"call": "a new length", "host_ms": round(new, 2), "launches": len(launches) // args.calls})
    eager = _ms_per_call(model, [ids] * args.calls)
    rows.append({"call": "(eager transformers on this CPU, the work included)", "host_ms": round(eager, 2),
                 "launches": None})
    for r in rows:
        print(f"{r['call']:55s} {r['host_ms']:9.2f} ms   launches {r['launches']}")
    finish(rows, args.out)


if __name__ == "__main__":
    main()
