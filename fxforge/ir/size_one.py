"""Sizes of one: where a model computes something else at batch 1 or at one token.

torch.export traces the dynamic dims at sizes >= 2 (capture grows the example), and the
"size is not 0 or 1" conditions it records are not kept as guards (ir/guards.py): so one
graph serves batch 1 and one-token decoding, as every model needs. A model whose own code
looks at a size being 1 (`x.squeeze(0)`, `if ids.shape[1] == 1:`) computes something else
there, and the trace cannot show it. So after capture, `check_sizes_of_one` runs the graph
with dynamic sizes set to 1 (the example's first row, its first token) against the model
itself, on the same inputs: every set of them at 1 together, smallest first (B alone, T
alone, then B and T), the others at sizes >= 2:

- where they agree, nothing changes;
- where they differ, the graph gets the guard that refuses that set all at 1 and nothing
  else: `B >= 2` for one size, `B + T >= 3` for two (each is >= 1, so the sum exceeds the
  count unless all are 1). A call with those at 1 then raises GuardError instead of
  answering differently (with a KV cache a guard on T is one on the sequence, L + T: one-
  token decoding steps still run). A larger set with a refused set in it is not probed:
  its calls are refused already (`B >= 2` refuses B = T = 1 too, where squeeze(0) agrees:
  a call refused, never another answer);
- where they differ and the example itself has that set at 1, the graph cannot be the
  computation asked for: CaptureError, with the remedies.

Every set, not only each alone and all at once: `x.squeeze(0)` gives the same at B = T = 1
(a softmax over one element either way) and differs at B = 1, T = 5; `if B == 1 and T == 1`
beside an input of its own length S differs at B = T = 1 whatever S, and the guard of all
three at 1 (B + T + S >= 4) left B = T = 1, S = 5 answered with the other branch. With more
than MAX_SUBSET_SYMBOLS sizes (2**n - 1 probes) only each alone and all together are
probed, and where all together differ, every two at 1 together are refused (which smaller
set differs is not known): a conservative guard, and a set of three or more at 1 that
differs where all together agree goes unseen there.

Outputs that are numbers, not tensors (`1.0 if T == 1 else 0.5`, `x.shape[1]`), are
compared as well: capture made them a constant or a function of the sizes, which is what
the call gives at any size.

Each probe runs on the example's data and on a few random draws (`_Draws`): agreeing on
the example's data alone (a non-negative example under `x.clamp(min=0)`) proves little.
A probe costs an eager forward of the model and a reference evaluation of the graph per
draw, at sizes no larger than the example's but for the others of a set found as below;
with a batch and a length, three probes (B, T, both), and one more at the example itself
(`check_at_example`: the graph must be the model's computation there). A model whose
dropout draws differ between calls (two forwards in training mode) is not compared.

Every set a call may give as 1 is probed at sizes the graph's guards allow, or guarded: a
probe refused by another guard (T % 2 == 0, T >= 4 refuse T = 1) says nothing of batch 1
at a T they allow, and was once read as "they agree" (batch 1 got the graph of batch >=
2). So the others are at the example's sizes, or where the guards refuse those (B * T >= 6
at the example's T = 3) at the first sizes >= 2 they allow (`_sizes_at_one`, a search of
the guards alone); a set no allowed call is found for is guarded, unless a guard refuses
it at 1 whatever the others (`_refused_at_one`).

The same probe decides guards that exclude one size, `Ne(T, c)` (`_drop_points_that_hold`):
export writes them where a buffer of c rows is sliced by the length, and they refused a
size eager runs; one that the model and the graph agree at (on every draw) is dropped.
That probe runs at batch 1 where the graph serves it (`_point_sizes`): a forward at the
block size with the example's batch cost more than the rest of optimize().

Outputs are compared chunk by chunk (`_close`): they can be a model's whole logits. In the
check at the example itself, rows at the padded positions of an attention mask are not
compared (`_real_rows`): a fully masked query's eager output is rounding noise in fp16. A
probe that decides whether a guard may go compares every row.
"""
from __future__ import annotations

import itertools
import math

import sympy
import torch
import torch.utils._pytree as pytree

from .evaluate import input_sizes
from .graph import Graph
from .guards import GuardChecker, GuardError, _in_floats
from .types import parse_size_text


def check_sizes_of_one(model: torch.nn.Module, graph: Graph, spec, args, kwargs) -> list:
    """Probe the dynamic sizes of `graph` at 1, each set of them together (see the module
    docstring); add a guard where the model answers differently there. Returns the
    symbols guarded."""
    from .capture import flatten_call

    try:
        leaves = flatten_call(spec, tuple(args), dict(kwargs or {}))
    except (TypeError, ValueError):
        return []
    symbols = _probe_symbols(graph)
    draws = _Draws(graph, spec, leaves)
    refused: list[tuple] = []  # the sets of sizes whose being all 1 a guard added here refuses
    unless: dict[tuple, sympy.Symbol] = {}  # ... but where this other size is 1 too
    for subset in _subsets_at_one(symbols):
        if any(set(done) <= set(subset) and unless.get(done) not in subset for done in refused):
            continue  # a call with these at 1 has a smaller set at 1 that is refused already
        differs, exempt = _subset_differs(model, graph, spec, leaves, draws, subset, symbols)
        if differs:
            refused.append(subset)
            if exempt is not None:
                unless[subset] = exempt
    if len(symbols) > MAX_SUBSET_SYMBOLS and tuple(symbols) in refused:
        # too many sizes for every set of them to be probed, and all at 1 differ: which
        # smaller set is the cause is not known, so every two at 1 are refused
        _refuse_pairs(graph, symbols, refused)
    # after the probes at 1, whose error says more where the example has a size of 1
    check_at_example(model, graph, spec, leaves)
    _drop_points_that_hold(model, graph, spec, draws, symbols)
    return [s for s in symbols if any(s in done for done in refused)]


# The most size symbols whose every set is probed at 1 (2**n - 1 probes); beyond, each alone
# and all together
MAX_SUBSET_SYMBOLS = 4


def _subsets_at_one(symbols: list) -> list[tuple]:
    """The sets of sizes probed at 1 together, smallest first (so the guard added is the
    smallest set that differs): every non-empty one, or beyond MAX_SUBSET_SYMBOLS symbols
    each alone and all together."""
    n = len(symbols)
    sizes = range(1, n + 1) if n <= MAX_SUBSET_SYMBOLS else sorted({1, n})
    return [subset for k in sizes for subset in itertools.combinations(symbols, k)]


def _subset_differs(model, graph: Graph, spec, leaves: list, draws: "_Draws", subset: tuple,
                    symbols: list) -> tuple[bool, sympy.Symbol | None]:
    """Probe the sizes of `subset` at 1 together, the others >= 2; where the model answers
    differently there, or where no such call is found that the guards allow (and they
    may allow one), add the guard that refuses them all at 1 (`_guard_at_one`), unless
    another size at 1 too makes them agree (`_agreeing_with_one_more`: a mask's batch B1
    at 1 differs beside ids of batch 2, not beside ids of batch 1). (Whether it did, that
    other size or None.) CaptureError where that guard would refuse the example itself."""
    from .capture import CaptureError

    at_example = all(_example_size(graph, spec, leaves, s) == 1 for s in subset)
    sizes = _sizes_at_one(graph, spec, leaves, subset, symbols)
    if sizes is None:
        # no call with these at 1 found that the guards allow: where they may allow one
        # (none found among the sizes searched), it is refused, as it was not probed (but
        # the example's own sizes: check_at_example compares the example itself)
        if _refused_at_one(graph, subset) or at_example:
            return False, None
        graph.guards.append(_guard_at_one(subset))
        return True, None
    why = _probe(model, graph, spec, draws, sizes)
    if why is None:
        return False, None
    if isinstance(why, RunFailed) and (at_example or why.by_model):
        # a call that fails to run shows no other computation at 1, only a call refused:
        # where the example runs with these sizes at 1 (check_at_example compared it), or
        # where the model itself raises (ids of batch 2 with a mask of batch 1, which HF's
        # padding code indexes by batch): a guard there would refuse the calls of sizes that
        # do agree (batch 1 with its mask of batch 1)
        return False, None
    if at_example:
        where = " and ".join(f"{s} == 1" for s in subset)
        two = " or ".join(f"{s} >= 2" for s in subset)
        raise CaptureError(
            f"the model computes something else when {where} ({why}): its code looks at that size "
            "(a squeeze, a branch on it), and fxforge captures dynamic sizes at >= 2, so the graph would "
            f"not be this example's computation. Optimize with an example where {two} (calls with "
            f"{where} are then refused), or with dynamic=False to capture exactly this shape")
    # only a graph that cannot run there (sizes it takes as equal) is spared where the other
    # size is 1 too: a difference in values stays refused whatever the others, as a probe
    # of few random values (T == 1) agreeing proves little
    exempt = _agreeing_with_one_more(model, graph, spec, leaves, draws, subset, symbols) \
        if isinstance(why, RunFailed) else None
    graph.guards.append(_guard_at_one(subset, unless=exempt))
    return True, exempt


def _agreeing_with_one_more(model, graph: Graph, spec, leaves: list, draws: "_Draws", subset: tuple,
                            symbols: list) -> sympy.Symbol | None:
    """A size Y not in `subset` such that `subset` and Y all at 1 (the others >= 2) agree
    with the model, where `subset` alone at 1 does not; None if there is none. Two sizes
    that must be equal (ids' batch B and a mask's batch B1, which export names apart where
    the model would broadcast a mask of batch 1) differ at B1 == 1 only beside B >= 2."""
    for other in symbols:
        if other in subset:
            continue
        sizes = _sizes_at_one(graph, spec, leaves, subset + (other,), symbols)
        if sizes is not None and _probe(model, graph, spec, draws, sizes) is None:
            return other
    return None


def _reworded(why: str, text: str) -> str:
    """`text` in place of the reason `why`, of its kind (a RunFailed stays one)."""
    return RunFailed(text, why.by_model) if isinstance(why, RunFailed) else text


def _guard_at_one(subset, unless: sympy.Symbol | None = None) -> sympy.Basic:
    """The guard that refuses the sizes of `subset` all at 1 and nothing else: each is >= 1,
    so their sum exceeds their count unless all are 1 (`B >= 2` for one, `B + T >= 3`).
    With `unless` = Y, the sizes at 1 are refused only where Y >= 2: with a = sum - count
    (0 only when all are 1) and c = Y - 1, a * c >= c holds where a >= 1 or c == 0
    (`(B1 - 1)*(B - 1) >= B - 1`)."""
    if unless is None:
        return sympy.Ge(sympy.Add(*subset), len(subset) + 1)
    return sympy.Ge((sympy.Add(*subset) - len(subset)) * (unless - 1), unless - 1)


def _refuse_pairs(graph: Graph, symbols: list, refused: list):
    """Refuse every two of `symbols` at 1 together (but those a guard refuses already): the
    conservative guard where all at 1 differ and the sets between were not probed."""
    all_at_one = _guard_at_one(symbols)
    graph.guards = [g for g in graph.guards if g != all_at_one]
    refused.remove(tuple(symbols))
    for pair in itertools.combinations(symbols, 2):
        if not any(set(done) <= set(pair) for done in refused):
            graph.guards.append(_guard_at_one(pair))
            refused.append(pair)


def check_at_example(model, graph: Graph, spec, leaves: list):
    """The graph run on the example itself against the model: CaptureError where they
    differ. torch.export follows tensors and sizes, not what Python makes of them: a model
    that formats a size (`len(str(x.shape[1]))`: under export str() of a size is its
    symbol's name, "s1") or branches on something export cannot see computes something
    else in the graph even at the example's own shape. (A graph that cannot be evaluated
    here is left to the probes at other sizes, as before.)"""
    from .capture import CaptureError, eager_failure

    try:
        why = _difference(model, graph, spec, leaves, _inputs_of(spec, leaves), failures=False,
                          real_rows_only=True, eager_must_run=True)
    except _EagerFailed as e:
        raise eager_failure(e.__cause__, traced=True) from e.__cause__
    if why is not None:
        raise CaptureError(
            f"the captured graph does not compute what the model computes on the example inputs themselves: "
            f"{why}. The model's code depends on something torch.export cannot follow (Python code on a size "
            "or a tensor's value: str() / len() / formatting of x.shape, a Python-side cache or global, a "
            "random or time-dependent choice), so the graph holds another computation. Write that part with "
            "tensor or size operations, or optimize with dynamic=False to capture this exact shape")


# The largest excluded size probed (an eager forward at that length)
MAX_POINT_PROBE = 4096


def _drop_points_that_hold(model, graph: Graph, spec, draws: "_Draws", symbols: list):
    """A guard `Ne(T, c)` excludes one size. export writes one where the model slices a
    buffer of c rows by the length (nanoGPT's causal mask, `bias[:, :, :T, :T]`): at T == c
    the slice is the whole buffer, which export reasons about apart, though the computation
    is the same. Such a guard refused T == c, a size eager runs (generating up to the block
    size). So the graph is run at the excluded size against the model: where they agree the
    guard goes; where they differ (a branch on that size), it stays."""
    for g in list(graph.guards):
        points = _excluded_points(g, symbols, [o for o in graph.guards if o is not g])
        if not points:
            continue
        (sym,) = g.free_symbols
        differ = [c for c in points if _point_differs(model, graph, spec, draws, sym, c, g)]
        if differ != points:  # the guard goes; the sizes where the model computes otherwise stay refused
            at = graph.guards.index(g)
            graph.guards[at:at + 1] = [sympy.Ne(sym, c) for c in differ]


def _point_differs(model, graph: Graph, spec, draws: "_Draws", sym, c: int, g) -> bool:
    """Whether the model computes otherwise than the graph at `sym == c`, the size guard `g`
    excludes; True too where that probe cannot be made (the guard then stays)."""
    sizes = _point_sizes(graph, spec, draws, sym, c, g)
    if _leaves_at_sizes(graph, spec, draws.leaves, sizes) is None:
        return True
    return _probe(model, graph, spec, draws, sizes, ignore=g) is not None


def _point_sizes(graph: Graph, spec, draws: "_Draws", sym, c: int, ignore) -> dict:
    """The sizes to probe an excluded size `sym == c` at: the batch at 1 as well, where the
    graph serves batch 1 (its guards allow it and the probe can be made). Whether T == c is
    computed otherwise does not hang on the batch, and a probe at the block size with the
    example's batch cost a forward of that batch at the full length (nanoGPT at block 4096,
    batch 8: more memory than the machine had). Where batch 1 is refused (`B >= 2`: the
    model computes otherwise there) the example's batch is kept."""
    sizes = {sym: c}
    batch = {s: 1 for s in _batch_symbols(graph) if s != sym}
    if not batch:
        return sizes
    probe = _leaves_at_sizes(graph, spec, draws.leaves, {**batch, **sizes})
    if probe is None or _guards_refuse(graph, _inputs_of(spec, probe), ignore):
        return sizes
    return {**batch, **sizes}


def _batch_symbols(graph: Graph) -> list:
    """The size symbols that are the leading dim of every tensor input they appear in (the
    batch); a length (a KV cache's past, dim 2) is not one."""
    dims: dict = {}
    for v in graph.inputs:
        for d, size in enumerate(getattr(v.type, "shape", ())):
            for s in getattr(size, "free_symbols", ()):
                dims.setdefault(s, set()).add(d if size == s else -1)
    return [s for s, at in dims.items() if at == {0}]


# A guard that excludes more sizes than this is a range, not points
MAX_POINTS = 4


def _excluded_points(g, symbols: list, others: list = ()) -> list[int]:
    """The sizes an inequality on one symbol excludes: `Ne(T, 64)` -> [64], and its scaled
    forms export writes for a slice (`x[:, -3:]`: Ne(8*T, 24) -> [3]); [] where it is not
    one (or excludes more than MAX_POINTS sizes, or one beyond MAX_POINT_PROBE). A size that
    one of the `others` guards on the same symbol refuses anyway is not counted: MPT's
    `Ne(16 - Max(0, 16 - T), 16)` excludes every T >= 16, a range, but beside
    `Eq(T, 16 - Max(0, 16 - T))` (T <= 16) it excludes T = 16 alone, a size eager runs."""
    if not isinstance(g, sympy.Unequality) or len(g.free_symbols) != 1:
        return []
    (sym,) = g.free_symbols
    if sym not in symbols:
        return []
    same = [o for o in others if o.free_symbols == {sym}]
    refused_anyway = (lambda n: False) if not same else \
        (lambda n, tests=GuardChecker(same)._tests: not all(t([n], {sym: n}) for t in tests))
    try:  # a polynomial (8*T - 24): its roots, all of them
        roots = sympy.roots(sympy.Poly(g.lhs - g.rhs, sym))
        if sum(roots.values()) != sympy.degree(g.lhs - g.rhs, sym):
            return []
        points = sorted(int(r) for r in roots if r.is_Integer and r >= 1)
        return points if len(points) <= MAX_POINTS and all(c <= MAX_POINT_PROBE for c in points) else []
    except (sympy.PolynomialError, sympy.polys.polyerrors.GeneratorsNeeded, ValueError):
        pass
    # otherwise (Max, floor, Mod: 8*T != 8*Max(1, T - 4)) the sizes up to the probed ones, and
    # a few beyond, which must all hold
    test = GuardChecker([g])._tests[0]
    points = []
    for n in range(1, MAX_POINT_PROBE + 1):  # a compiled test: microseconds each
        if not test([n], {sym: n}) and not refused_anyway(n):
            points.append(n)
            if len(points) > MAX_POINTS:
                return []
    if not all(test([n], {sym: n}) or refused_anyway(n)
               for n in (MAX_POINT_PROBE + 1, 2 * MAX_POINT_PROBE, 10 ** 6, 10 ** 9)):
        return []
    return points


def _probe(model, graph: Graph, spec, draws: "_Draws", sizes: dict, ignore=None) -> str | None:
    """How the model and the graph differ with the symbols in `sizes` at those sizes, on
    the example's data or on any of the random draws (`_Draws`); None where they agree on
    all, or where the probe cannot be made or the graph's guards (but `ignore`) refuse it
    already."""
    for i, leaves in enumerate(draws):
        probe = _leaves_at_sizes(graph, spec, leaves, sizes)
        if probe is None:
            return None
        inputs = _inputs_of(spec, probe)
        if i == 0 and _guards_refuse(graph, inputs, ignore):
            return None  # the graph refuses these sizes already
        why = _difference(model, graph, spec, probe, inputs, noise_differs=True)
        if why is None:
            continue
        if i == 0:
            return why
        # random data the model does not take at its own sizes either (ids out of some
        # range, a mask it checks) says nothing about these sizes: that draw is left out
        if draws.usable(i, model):
            return _reworded(why, f"{why}, on random inputs ({draws.names[i]})")
    return None


# The sizes tried for the other symbols, after the example's, to find a call with one size
# at 1 that the guards allow (`_sizes_at_one`), and the most such calls checked
SEARCH_SIZES = range(1, 17)
MAX_SEARCH = 4096


def _sizes_at_one(graph: Graph, spec, leaves: list, subset: tuple, symbols: list) -> dict | None:
    """Sizes to probe the symbols of `subset` at 1 together at: the others at the example's
    sizes where the guards allow that (the usual case), else the first combination of
    SEARCH_SIZES they allow (`B * T >= 4` with the example's T = 2 allows B = 1 at T = 4).
    The others are >= 2 (one at 1 is another set's probe), the example's size of one that
    is 1 there replaced by 2. The guards are checked on the sizes alone (compiled tests,
    microseconds each) before any probe data is made; None where none is found, or the
    probe cannot be made."""
    checker = GuardChecker(graph.guards)
    base = input_sizes(graph, _inputs_of(spec, leaves))
    others = [s for s in symbols if s not in subset]
    first = {s: base[s] if base.get(s, 0) >= 2 else 2 for s in others}
    choices = [[first[s], *(n for n in SEARCH_SIZES if n >= 2 and n != first[s])] for s in others]
    for values in itertools.islice(itertools.product(*choices), MAX_SEARCH):
        sizes = {**dict.fromkeys(subset, 1), **dict(zip(others, values))}
        if _allows(checker, {**base, **sizes}):
            return sizes if _leaves_at_sizes(graph, spec, leaves, sizes) is not None else None
    return None


def _allows(checker: GuardChecker, sizes: dict) -> bool:
    values = [sizes.get(s) for s in checker.symbols]
    return all(test(values, sizes) for test in checker._tests)


def _refused_at_one(graph: Graph, subset) -> bool:
    """Whether a guard refuses the sizes of `subset` all at 1 whatever the other sizes
    (Eq(Mod(T, 2), 0) refuses T == 1; B + T >= 3 refuses B == T == 1)."""
    ones = {s: sympy.Integer(1) for s in subset}
    for g in graph.guards:
        if _in_floats(g):  # decided in floats at run time (guards.py), not by sympy's exact value
            continue
        try:
            if g.xreplace(ones) is sympy.false:
                return True
        except Exception:  # noqa: BLE001 (sympy: a Mod by zero, ...): undecided, not refused
            continue
    return False


def _guards_refuse(graph: Graph, inputs: list, ignore=None) -> bool:
    """Whether the graph's guards (but `ignore`) refuse inputs of these sizes."""
    try:
        GuardChecker([g for g in graph.guards if g is not ignore]).check(input_sizes(graph, inputs))
    except GuardError:
        return True
    return False


def _inputs_of(spec, leaves: list) -> list:
    return [leaves[pos] for pos, _ in sorted(_tensor_leaves(spec), key=lambda leaf: leaf[1])]


class _Draws:
    """The call's leaves at the example's sizes: the example's own data first, then random
    draws of every tensor input. A probe where the graph and the model agree on the
    example's data alone proves little: `if x.shape[1] == 8: x = x.clamp(min=0)` agrees
    at T == 8 on a non-negative example (torch.rand), and its guard went. So each probe
    also runs on independent draws: floats standard normal, scaled large and negative;
    integers (token ids, positions) uniform in the example's own range (its ids are valid
    ones); bools random. Each draw costs a forward of the model and an evaluation of the
    graph per probe (SmolLM2 at size 1: 0.6 s), so there are few: two with float inputs
    (standard normal, which has negative values, and the same scaled by 100), one without
    (token ids: another draw of valid ids). Made at first use, with a generator of their own (the caller's
    random state is left as it was); the draws count only where the model and the graph
    agree on them at the example's sizes (`usable`, checked only where a draw differs)."""

    FLOAT_KINDS = ("floats standard normal", "floats normal x 100")
    OTHER_KINDS = ("integers uniform in the example's range",)

    def __init__(self, graph: Graph, spec, leaves: list):
        self.graph, self.spec, self.leaves = graph, spec, leaves
        positions = [pos for pos, _ in _tensor_leaves(spec)]
        floats = any(isinstance(leaves[p], torch.Tensor) and (leaves[p].is_floating_point() or leaves[p].is_complex())
                     for p in positions)
        self.names = ["the example's data", *(self.FLOAT_KINDS if floats else self.OTHER_KINDS)]
        self._made: dict[int, list] = {0: leaves}
        self._usable: dict[int, bool] = {}

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> list:
        if i not in self._made:
            gen = torch.Generator().manual_seed(1234 + i)
            draw = list(self.leaves)
            for pos, _ in _tensor_leaves(self.spec):
                if isinstance(draw[pos], torch.Tensor):
                    draw[pos] = _random_like(draw[pos], i - 1, gen)
            self._made[i] = draw
        return self._made[i]

    def usable(self, i: int, model) -> bool:
        """Whether the model and the graph agree on draw `i` at the example's own sizes."""
        if i not in self._usable:
            draw = self[i]
            self._usable[i] = _difference(model, self.graph, self.spec, draw, _inputs_of(self.spec, draw)) is None
        return self._usable[i]


def _random_like(x: torch.Tensor, kind: int, gen: torch.Generator) -> torch.Tensor:
    """Random data of x's shape, dtype and device (see _Draws): kind 0 standard normal,
    1 scaled by 100 for floats; integers uniform in x's own range; bools random."""
    if x.numel() == 0:
        return x
    if x.dtype == torch.bool:
        out = torch.randint(0, 2, x.shape, generator=gen, device="cpu").bool()
    elif x.is_floating_point() and (values := _few_values(x)) is not None:
        # a float input of one or two values (a 0/1 mask): its own values, at random places;
        # normal draws would be data the model is never given, and a branch that treats
        # both spellings of a mask alike would differ there and keep a false guard
        out = values[torch.randint(0, len(values), x.shape, generator=gen, device="cpu")]
    elif x.is_floating_point() or x.is_complex():
        out = torch.randn(x.shape, generator=gen, device="cpu", dtype=torch.cfloat if x.is_complex() else torch.float32)
        out = out * 100 if kind == 1 else out
    else:
        lo, hi = int(x.min()), int(x.max())
        if lo == hi:  # one value (an all-ones mask): 0 too, or a branch on the batch that drops the mask hides
            lo, hi = min(lo, 0), max(hi, 1)
        if hi - lo < 2**62 and hi < 2**63 - 1:
            out = torch.randint(lo, hi + 1, x.shape, generator=gen, device="cpu", dtype=torch.int64)
        else:  # (hi + 1 would overflow int64: a hash or seed input) the example's own values, at random places
            flat = x.detach().reshape(-1).cpu().long()
            out = flat[torch.randint(0, flat.numel(), x.shape, generator=gen, device="cpu")]
    return out.to(device=x.device, dtype=x.dtype)


def _few_values(x: torch.Tensor) -> torch.Tensor | None:
    """The distinct values of float x (float32, on the CPU) when there are at most two; with
    0 beside a single one (the usual all-ones example mask: a draw of it all ones hides a
    branch that ignores the mask)."""
    values = torch.unique(x.detach().float().cpu())
    if len(values) == 1:
        values = torch.cat([values, values.new_tensor([0.0 if values[0] != 0 else 1.0])])
    return values if len(values) <= 2 else None


def _tensor_leaves(spec) -> list[tuple[int, int]]:
    """(position among the call's leaves, graph input index) of each tensor leaf."""
    return [(pos, index) for pos, (kind, index) in enumerate(spec.input_leaves) if kind == "tensor"]


def _probe_symbols(graph: Graph) -> list:
    """The size symbols that are a whole dim of some tensor input, in order."""
    out = []
    for v in graph.inputs:
        for d in getattr(v.type, "shape", ()):
            if isinstance(d, sympy.Symbol) and d not in out:
                out.append(d)
    return out


def _example_size(graph: Graph, spec, leaves: list, sym) -> int | None:
    for pos, index in _tensor_leaves(spec):
        for d, size in enumerate(graph.inputs[index].shape):
            if size == sym:
                return int(leaves[pos].shape[d])
    return None


def _leaves_at_sizes(graph: Graph, spec, leaves: list, sizes: dict):
    """The call's leaves with every dim whose size holds a symbol of `sizes` made as long
    as that size is there, the other symbols at the call's own sizes (a `T + 1` dim beside
    a `T` dim follows T): cut to its first elements, or extended cyclically (as capture
    grows the example); None where a size cannot be worked out so (a symbol no dim of its
    own binds) or is negative."""
    every = {**input_sizes(graph, _inputs_of(spec, leaves)), **sizes}
    probe = list(leaves)
    for pos, index in _tensor_leaves(spec):
        v, x = graph.inputs[index], probe[pos]
        for d, size in enumerate(v.shape):
            if not (isinstance(size, sympy.Basic) and size.free_symbols & sizes.keys()):
                continue
            n = size.xreplace({s: sympy.Integer(every[s]) for s in size.free_symbols if s in every})
            if not (n.is_Integer and n >= 0):
                return None
            n, old = int(n), x.shape[d]
            if n == old:
                continue
            if n > old and old == 0:
                return None  # nothing to extend an empty dim with
            x = x.narrow(d, 0, n) if n <= old else x.index_select(d, torch.arange(n, device=x.device) % old)
        probe[pos] = x
    return probe


class RunFailed(str):
    """_difference's answer when a probe's sizes could not run (the model or the graph
    raised there): a reason like any other, of a kind the callers can tell apart.
    `by_model`: the model itself raised (eager refuses the call)."""

    def __new__(cls, text: str, by_model: bool = False):
        out = super().__new__(cls, text)
        out.by_model = by_model
        return out


class _EagerFailed(Exception):
    """The model raised at the example (the cause): _difference with eager_must_run."""


def _difference(model, graph: Graph, spec, probe: list, inputs: list, failures: bool = True,
                noise_differs: bool = False, real_rows_only: bool = False,
                eager_must_run: bool = False) -> str | None:
    """How the model's outputs at the probe differ from the graph's there, or None (also
    where either side fails to run, unless `failures`, or where the model does not repeat
    itself: dropout in training mode, torch.rand in its forward -- unless `noise_differs`:
    a probe that decides whether a guard may go cannot tell noise from a real difference
    there, so such a model keeps the guard)."""
    from .capture import _default_call_has_cache, run_as_traced
    from .evaluate import evaluate

    call_args, call_kwargs = pytree.tree_unflatten(probe, spec.in_spec)
    # the masks of the call the graph stands for: the model's default call, unless the user
    # passed use_cache (capture traced it so: _masks_as_with_cache)
    user_use_cache = "use_cache" in call_kwargs and "use_cache" not in getattr(spec, "injected_kwargs", {})
    cache_masks = not user_use_cache and _default_call_has_cache(model)

    def run_model():
        return run_as_traced(model, call_args, call_kwargs, cache_masks)

    def evaluate_graph():
        with torch.no_grad():
            return evaluate(graph, inputs)

    try:
        # both sides from the same random state: a model that draws noise in forward
        # (torch.rand) compares like any other where the graph draws in the same order
        side = "the model"
        try:
            eager = _seeded(run_model)
        except Exception as e:  # noqa: BLE001 (at the example: the model is broken, say so)
            if eager_must_run:
                raise _EagerFailed() from e
            raise
        again = _seeded(run_model) if model.training else None
        side = "the graph"
        ours = _seeded(evaluate_graph)
    except Exception as e:  # noqa: BLE001 (either side failing at size 1 says the two differ)
        if isinstance(e, _EagerFailed):
            raise
        if not failures:
            return None
        return RunFailed(f"running {side} at these sizes failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}", by_model=side == "the model")
    if again is not None and not _repeats(eager, again):
        return None  # the model does not repeat itself (dropout in training mode): nothing to compare
    # only the example's own check skips padded rows (half-precision noise there): a probe
    # deciding whether a guard may go compares every row (a branch may change only those)
    why = _outputs_differ(eager, ours, spec, _padding(call_args, call_kwargs) if real_rows_only else [],
                          input_sizes(graph, inputs))
    if why is not None and again is None:
        # a model random in eval mode too (noise from torch.rand) differs from any other run
        # of itself: checked only here, where a difference was found (one more forward)
        try:
            if not _repeats(eager, run_model()):
                return f"{why} (the model does not repeat itself: random in eval mode)" if noise_differs else None
        except Exception:  # noqa: BLE001 (it ran a moment ago: the difference stands)
            pass
    return why


def _seeded(fn):
    """fn() from a fixed random state, the caller's own restored after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0x5EED)
        return fn()


def _repeats(eager, again) -> bool:
    return all(not isinstance(a, torch.Tensor) or (a.shape == b.shape and _close(a, b))
               for a, b in zip(pytree.tree_leaves(eager), pytree.tree_leaves(again)))


def _padding(call_args, call_kwargs) -> list[torch.Tensor]:
    """The padding of the call: where an input named like a mask (`attention_mask`) is a
    [batch, length] tensor of 0 and 1 (integer or bool) with a 0 in it, that mask as bools
    (True at the real tokens)."""
    out = []
    for path, x in pytree.tree_flatten_with_path((call_args, call_kwargs))[0]:
        if not (isinstance(x, torch.Tensor) and x.dim() == 2 and "mask" in pytree.keystr(path).lower()):
            continue
        if x.is_floating_point() or x.is_complex() or x.numel() == 0:
            continue
        real = x != 0
        if not real.all() and bool(((x == 0) | (x == 1)).all()):
            out.append(real)
    return out


def _real_rows(ref: torch.Tensor, got: torch.Tensor, padding: list) -> tuple:
    """ref and got at the real tokens alone where their leading dims are a padding mask's
    [batch, length]: at a padded position every key is masked, and what eager attention
    gives there is rounding noise (fp16: scores + finfo.min keeps no digit of the scores),
    which the model's users do not read. Other outputs whole."""
    for real in padding:
        if ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(real.shape):
            real = real.to(ref.device)
            return ref[real], got[real]
    return ref, got


def _outputs_differ(eager, ours: list, spec, padding: list = (), sizes: dict | None = None) -> str | None:
    """How the model's outputs `eager` differ from the graph's `ours`, or None; rows of
    `padding` (`_padding`) are not compared (`_real_rows`). An output that is a number, not
    a tensor (`1.0 if T == 1 else 0.5`, `x.shape[1]`), is compared too: the graph's is a
    constant or a function of the call's `sizes` (`_scalar_output_of`)."""
    eager_paths = pytree.tree_flatten_with_path(eager)[0]
    eager_leaves = [leaf for _, leaf in eager_paths]
    if len(eager_leaves) != len(spec.output_leaves):
        return f"{len(eager_leaves)} outputs instead of {len(spec.output_leaves)}"
    for i, (ref, (kind, index)) in enumerate(zip(eager_leaves, spec.output_leaves)):
        path = pytree.keystr(eager_paths[i][0])
        name = f"output {i}" + (f" ({path})" if path and path != "[0]" else "")
        if kind != "value":
            why = _scalar_differs(ref, kind, index, sizes)
            if why is not None:
                return f"{name} {why}"
            continue
        if not isinstance(ref, torch.Tensor):
            continue
        got = ours[index]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{name} has shape {tuple(ref.shape)}, the graph gives {tuple(got.shape)}"
        if got.dtype != ref.dtype:
            return f"{name} is {ref.dtype}, the graph gives {got.dtype}"
        ref, got = _real_rows(ref, got, padding)
        if not _close(got, ref):
            where = " at the real (not padded) tokens" if ref.shape != eager_leaves[i].shape else ""
            return f"{name} differs by up to {_max_abs_difference(got, ref):.3g}{where} (max |eager - graph|)"
    return None


# The outputs that are not tensors compared with the graph's (others, a model's own objects,
# may not compare by value)
SCALARS = (bool, int, float, complex, str, type(None))


def _scalar_differs(ref, kind: str, payload, sizes: dict | None) -> str | None:
    """How the model's output `ref` that is not one of the graph's values (a leaf of kind
    "const" or "size", capture._scalar_output) differs from what the call gives there, or
    None: a constant must be the same constant (same_constant: 1 is not 1.0 nor True), a
    size the size's value at the call's `sizes` (a float within rounding)."""
    from .call_constants import same_constant

    if kind == "const":
        if not (isinstance(ref, SCALARS) and isinstance(payload, SCALARS)) or same_constant(ref, payload):
            return None
        return f"is {ref!r}, the graph gives {payload!r}"
    if kind != "size" or sizes is None or not isinstance(ref, (bool, int, float)):
        return None
    type_name, text = payload
    expr = parse_size_text(text)
    try:
        value = expr.xreplace({s: sympy.Integer(sizes[s]) for s in expr.free_symbols})
        got = {"int": int, "float": float, "bool": bool}[type_name](value)
    except (KeyError, TypeError, ValueError):
        return None  # not worked out at these sizes: the module computes it as it does
    if isinstance(ref, float) and isinstance(got, float):
        same = math.isclose(ref, got, rel_tol=1e-9) or (math.isnan(ref) and math.isnan(got))
    else:
        same = same_constant(ref, got)
    return None if same else f"is {ref!r}, the graph gives {got!r}"


# Elements compared at a time: the outputs compared can be the size of a model's logits
# (batch x length x vocab), and copies of them whole (masks, float64) cost more than the
# forward that made them
CHUNK = 2 ** 20


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether the graph's `got` is the model's `ref`: integers and bools equal; floats with
    NaN at the same places, the same infinities, and each finite value within tol *
    max(1, max |ref|) (tol 1e-4 in float32/64, 2e-2 below). Compared CHUNK elements at a
    time, float64 per chunk."""
    if got.dtype != ref.dtype or got.shape != ref.shape:
        return False
    if not ref.dtype.is_floating_point:
        return torch.equal(got, ref)
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    scale, worst = 1.0, 0.0
    for g, r in _chunks(got, ref):
        if not torch.equal(g.isnan(), r.isnan()):
            return False
        finite = r.isfinite()
        infinite = ~finite & ~r.isnan()
        if infinite.any() and not torch.equal(g[infinite], r[infinite]):
            return False
        if finite.any():
            scale = max(scale, r.abs().masked_fill(~finite, 0).max().item())
            worst = max(worst, _abs_difference(g, r).masked_fill(~finite, 0).max().item())
    return worst <= tol * scale


def _max_abs_difference(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| in float64 (NaN counted as infinite), chunk by chunk."""
    return max((_abs_difference(g, r).nan_to_num(float("inf")).max().item() for g, r in _chunks(got, ref)),
               default=0.0)


def _abs_difference(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (g.double() - r.double()).abs()


def _chunks(got: torch.Tensor, ref: torch.Tensor):
    """(got, ref) flattened, CHUNK elements at a time (views where they are contiguous)."""
    got, ref = got.reshape(-1), ref.reshape(-1)
    for start in range(0, ref.numel(), CHUNK):
        yield got[start:start + CHUNK], ref[start:start + CHUNK]
