"""A custom rewrite pass, written with fxforge's pattern DSL (the final code of
docs/writing-passes.md).

Many models spell the SiLU/Swish activation by hand as `x * torch.sigmoid(x)`. Our rule
rewrites that into the single `silu` op, so later passes (and the fused kernels) see one
op. We register the pass, run the pipeline, and check the effect in the report, the IR
dumps and the outputs.

    python examples/custom_pass.py [--dump out/]
"""
import argparse
import tempfile

import torch

import fxforge
from fxforge.passes.pattern import Rule, apply_rules, op, var


class HandWrittenSwishMLP(torch.nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.sigmoid(h)  # SiLU, spelled by hand
        return self.down(h)


def swish_to_silu(m, b):
    """The replacement: the matched root becomes silu(x). Declining (returning None)
    would leave the graph as it was."""
    return b.emit("silu", m["x"])


# The rule table: one entry per rewrite, with a `# before -> after` comment.
RULES = [
    # mul(x, sigmoid(x)) -> silu(x)   (either operand order)
    Rule("swish_to_silu", op("mul", var("x"), op("sigmoid", var("x")), commutative=True), swish_to_silu),
]


def fold_swish(graph, ctx):
    """A pass: apply the table to a fixed point; ctx.rules counts what fired for report()."""
    return apply_rules(graph, RULES, ctx.rules, pass_name="fold_swish")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None, help="write the IR after every pass here")
    args = ap.parse_args()
    dump = args.dump or tempfile.mkdtemp(prefix="fxforge_custom_pass_")

    torch.manual_seed(0)
    model = HandWrittenSwishMLP().eval()
    x = torch.randn(2, 5, 32)

    # A registry of our own keeps the global default pipeline untouched; with
    # registry=None the pass would join every later fxforge.optimize call.
    registry = fxforge.passes.default_registry()
    fxforge.register_pass("fold_swish", after="cleanup", registry=registry)(fold_swish)
    fast = fxforge.optimize(model, (x,), registry=registry, dump_dir=dump)

    print(fast.report())
    fired = next(s for s in fast.stats if s.name == "fold_swish").rules["swish_to_silu"]
    print(f"\nswish_to_silu fired {fired} time(s); IR dumps in {dump}")
    before = open(f"{dump}/01_cleanup.ir").read()
    after = open(f"{dump}/02_fold_swish.ir").read()
    print("before:", [ln.strip() for ln in before.splitlines() if "sigmoid(" in ln])
    print("after: ", [ln.strip() for ln in after.splitlines() if "silu(" in ln])

    with torch.no_grad():
        same = torch.allclose(fast(x), model(x), atol=1e-6)
    print("outputs equal eager:", same)
    assert fired == 1 and "silu(" in after and "sigmoid(" not in after and same
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
