"""CPU linear kernels: for each float32 weight shape, the library kernel and weight layout
that run a one-token matrix-vector product fastest, and the kernel for each bucket of
row counts (the k + 1 tokens of a speculative verification step, the 9-15 and 16-32 rows of a
batched decoding step), chosen by timing them once per machine.

Why: decoding one token is a chain of matrix-vector products bound by reading weights.
PyTorch's `F.linear` on the CPU calls the BLAS (MKL), which on a 2-core AMD EPYC read a
row-major weight at about 15 GB/s; oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`,
the kernel torch.compile's CPU freezing path uses) read the same weight stored column-major
at 30-40 GB/s, the machine's memory bandwidth, and was 2-3x faster at prefill sizes too.
On a 2-core Intel Xeon, MKL wins instead. Which kernel and layout win depends on the CPU,
the shape and the libraries, so nothing is assumed: each distinct shape is timed with the
weights coming from memory, as in decoding, and F.linear on the weight as given stays
unless another candidate is clearly faster.

Determinism: timing is noisy, and a program that depends on noise differs between two
runs. So the measurement is robust (median of interleaved rounds, a time budget, a margin
to leave F.linear and a fixed order among near ties), and its result is kept per machine
(runtime/cpu_linear_cache.py): the first optimize() on a machine times and writes, every
later one reads and builds the same program without timing. `cpu_linear="measure"` times
again and overwrites; `cpu_linear=False` keeps F.linear without timing anything.

Few rows: speculative decoding checks k draft tokens in one step of k + 1 rows, and on
a 2-core Xeon the kernel fastest at one row was 1.3-1.8x slower there than another
(SmolLM2's lm_head, 49152x576, one thread, ms: F.linear row-major 24.5 at one row and 42
at five, oneDNN on the same row-major weight 25 and 31). So each shape gets a second
choice for 2..FEW_ROWS rows, timed at FEW_TIMED_ROWS, and every call picks by its row
count; more rows (prompts) keep the one-row choice. The few-row choice may use the
weight's stored layout or the row-major original, never a new copy: where the one-row
choice stored a column-major copy and a few rows run faster on the original, the plan
keeps a reference to the original (the model's own tensor: no new memory while the
model lives; the report gives the bytes).

Row buckets: the few rows are the first of ROW_BUCKETS, each a range of row counts with
its own choice, timed at one row count inside it against the one-row choice, under the
same rules, cached under its own key. The others hold a continuous-batching engine's
decoding steps with 9-15 and 16-32 running requests, which ran the one-row choice before.
They are split at 16 because MKL's float32 product changes kernel there: on the 2-core
Xeon, from 2 to 15 rows its time grows with every row, and 16 rows run in half the time
of 11 (SmolLM2's lm_head, 2 threads: 4.2 ms at one row, 16.9 at 11, 9.1 at 16, 10.8 at
24; oneDNN on the same row-major weight 8.1 at 11). A bucket timed at 16 alone chose
F.linear for 9-15 rows, where it was the slowest candidate. Each bucket is timed in its
middle (12 and 24 rows). More rows (prompts, prefill chunks) keep the one-row choice: a
bucket there would be timed on products bound by arithmetic, at a cost of seconds, for
the 1.0-1.15x the layouts differed by on SmolLM2's MLP and q/k/v weights at 256-512 rows.

Opt-in, a third layout for 2-32 rows: oneDNN's own blocked copy of a weight
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing uses),
which made SmolLM2's five-row verification step 1.3x faster in place (lm_head 11 ms
against 17 on the best plain layout; 5.9 ms at 11 rows against 8.1). It is a second copy
of the weight, so it is only a candidate when the torch backend is given the memory for
it (`TorchBackend("cpu", few_rows_packed_mb=...)`: at most that many MiB of copies, the
largest weights first; 0, the default, packs nothing). One copy serves every bucket that
chooses it: oneDNN packs for a row count, but copies packed for 5, 12, 16 and 24 rows
gave the same values at the same speed at every count from 5 to 24 (a copy packed for
one row is another format, and the one-row choice never reads it).

The values never change, only strides and the kernel, so the IR and its text do not.
Column-major weights are copies: the program no longer reads the model's own weights
(the report gives the bytes). Half precision is left to F.linear. A copy follows its
weight: after an in-place edit (`fast.state_dict()[k].mul_(0.5)`, `fast.load_state_dict`)
its first use makes it again (runtime/derived.py).
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ir.graph import Graph
from ..passes.manager import PassStats
from .cpu_linear_cache import (Decision, cache_file, machine_fingerprint, read_decisions, rows_key, shape_key,
                               write_decisions)
from .derived import holder, rewrite

BASELINE = ("aten", "row")
PACKED = ("onednn", "packed")  # a few rows only, opt-in: a second copy of the weight
# Among candidates that tie (within TIE of the fastest), the first here wins: F.linear on
# the weight as given, then the layouts that need no copy of the weights, then a second copy.
PREFERENCE = [BASELINE, ("onednn", "row"), ("onednn", "column"), ("aten", "column"), PACKED]
TIE = 1.03
# The chosen candidate must beat F.linear on the row-major weight by this much: a near tie is noise.
MIN_SPEEDUP = 1.05
# Bytes of weights each candidate is timed over: more than a server CPU's last-level cache,
# so that the timing sees memory, not cache hits (it picks the wrong layout otherwise).
COLD_BYTES = 40 << 20
MAX_COPIES = 128
# Weights smaller than this are not timed (F.linear stays): see _untimed_shapes.
MIN_TIMED_BYTES = 256 << 10
# Timing rounds per shape: at least MIN_ROUNDS (a median of 3 outvotes one disturbed
# round), more while the budget for the whole model lasts.
MIN_ROUNDS, MAX_ROUNDS = 3, 9
CALLS_PER_ROUND = 16
DROP_SLOWER = 3.0
MIN_WINS = 0.75
# Timing time per model: no round starts after TIME_BUDGET_S, and rounds past MIN_ROUNDS
# stop at TARGET_SHARE of it, which leaves room for the minimum on a busy machine.
TIME_BUDGET_S = 0.5
TARGET_SHARE = 0.5


@dataclass(frozen=True)
class RowBucket:
    """Calls with `first`..`last` activation rows run one choice per weight shape, timed at
    `timed` rows; `budget` scales FEW_ROWS_BUDGET_S, its timing time."""
    first: int
    last: int
    timed: int
    budget: float = 1.0

    def holds(self, rows: int) -> bool:
        return self.first <= rows <= self.last

    @property
    def name(self) -> str:
        return f"{self.first}-{self.last}"


# Calls with 2..FEW_ROWS activation rows (speculative verification of up to 7 draft
# tokens) take the few-row choice, timed at FEW_TIMED_ROWS rows (k = 4 draft tokens + 1).
FEW_ROWS = 8
FEW_TIMED_ROWS = 5
# The buckets, in order, none overlapping and none holding one row: the few rows, then an
# engine's decoding steps of 9-15 and 16-32 running requests, apart because MKL changes
# kernel at 16 rows (see the docstring), each timed in its middle. More rows keep the
# one-row choice.
ROW_BUCKETS = (RowBucket(2, FEW_ROWS, FEW_TIMED_ROWS), RowBucket(FEW_ROWS + 1, 15, 12, budget=1.5),
               RowBucket(16, 32, 24, budget=1.5))
# Timing time per model for each bucket's choices (times its `budget`), on top of
# TIME_BUDGET_S: the lm_head of a small model costs 30-40 ms a call at five rows.
FEW_ROWS_BUDGET_S = 1.0
# Part of the cache's fingerprint: bump it when the measurement or the rule changes.
METHOD_VERSION = 5


def onednn_linear(x, w, b=None):
    if x.dim() > 2:  # as rows: oneDNN's 3-d product was up to 1.4x slower than the same rows in 2-d
        return torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "").reshape(
            *x.shape[:-1], w.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


KERNELS = {"aten": F.linear, "onednn": onednn_linear}


@dataclass(eq=False)
class _Copied:
    """A weight the program reads through a copy the plan made (`stored`, column-major, the
    tensor the program passes) or that has a packed copy (made for `packed_rows` rows), with
    the version of `source` (the graph's weight) they were made from (runtime/derived.py)."""
    stored: torch.Tensor
    source: torch.Tensor
    packed_rows: int | None
    watch: object = None  # what to read the source's version from
    seen: int = 0

    def __post_init__(self):
        self.watch = holder(self.source)
        self.seen = self.watch._version


@dataclass
class CpuLinearPlan:
    """(out, in) -> (kernel, layout) for the float32 linear weights of one graph: `choices`
    for one row (and for row counts in no bucket), `by_rows[bucket]` for the row counts of
    a RowBucket where that differs (`few_rows`: the first bucket's). `originals`:
    id(stored column-major copy) -> (that copy, the row-major original), for the bucket
    choices on row-major weights; `packed`: id(stored weight) -> (that weight, its
    oneDNN-packed copy), one shared by every bucket that chooses it (both filled by apply)."""
    choices: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)
    speedups: dict[tuple[int, int], float] = field(default_factory=dict)
    by_rows: dict[RowBucket, dict[tuple[int, int], tuple[str, str]]] = field(default_factory=dict)
    row_speedups: dict[RowBucket, dict[tuple[int, int], float]] = field(default_factory=dict)
    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    packed_bytes_limit: int = 0
    not_packed: int = 0  # weights some bucket chose PACKED for whose copy did not fit in the limit
    # id(stored weight) -> its copies and their source, for weights read through a copy:
    # made again at their first use after an in-place edit of the source (runtime/derived.py)
    copied: dict[int, _Copied] = field(default_factory=dict)

    @property
    def few_rows(self) -> dict[tuple[int, int], tuple[str, str]]:
        """The choices for 2..FEW_ROWS rows (speculative verification), where they differ."""
        return self.by_rows.get(ROW_BUCKETS[0], {})

    def bucket(self, shape: tuple[int, int], rows: int) -> RowBucket | None:
        """The bucket whose choice a call with `rows` rows on `shape` runs; None: the one-row choice."""
        if rows > 1:
            for bucket, choices in self.by_rows.items():
                if bucket.holds(rows) and shape in choices:
                    return bucket
        return None

    def choice(self, shape: tuple[int, int], rows: int) -> tuple[str, str]:
        """The (kernel, layout) a call with `rows` activation rows on a weight of `shape` runs."""
        bucket = self.bucket(shape, rows)
        return self.by_rows[bucket][shape] if bucket else self.choices.get(shape, BASELINE)

    def linear(self, x, w, b=None):
        """The torch backend's `linear`: the chosen kernel for this weight shape and row count."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, w, b)
        if self.copied:
            copied = self.copied.get(id(w))
            if copied is not None and copied.watch._version != copied.seen:
                self._renew(copied)
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        kernel, layout = self.choice(tuple(w.shape), rows)
        # (any layout gives the same values: this only picks the faster read; a weight the
        # plan holds no copy of runs the kernel on the weight as given)
        if layout == "row" and not w.is_contiguous():
            stored, original = self.originals.get(id(w), (None, None))
            if stored is w:
                w = original
        elif layout == "packed":
            stored, copy = self.packed.get(id(w), (None, None))
            if stored is w:
                w = copy
        return KERNELS[kernel](x, w, b)

    def _renew(self, copied: _Copied):
        """Make `copied`'s copies again from its source, whose values changed in place."""
        if copied.stored is not copied.source:
            rewrite(copied.stored, copied.source)  # in place: the program holds this tensor
        if copied.packed_rows is not None:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(copied.source.detach().contiguous(),
                                                                 copied.packed_rows)
            self.packed[id(copied.stored)] = (copied.stored, packed)
        copied.seen = copied.watch._version

    def apply(self, graph: Graph) -> tuple[Graph, list[str], int]:
        """The graph with column-major copies of the weights whose shape chose that layout
        (and the originals noted where a bucket's rows read those, and the packed copies
        that fit in packed_bytes_limit)."""
        params = dict(graph.params)
        moved, nbytes, packed_bytes = [], 0, 0
        # the largest weights first: they gain the most per call from a packed copy
        for name in sorted(_linear_weights(graph), key=lambda n: -params[n].numel()):
            w = params[name]
            shape = tuple(w.shape)
            packed_for = [b.timed for b, choices in self.by_rows.items() if choices.get(shape) == PACKED]
            copy = None
            if packed_for:
                size = w.numel() * w.element_size()
                if packed_bytes + size <= self.packed_bytes_limit:
                    with torch.no_grad():  # one copy for every bucket (see the docstring)
                        copy = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), min(packed_for))
                    packed_bytes += size
                else:
                    self.not_packed += 1
            if self.choices.get(shape, BASELINE)[1] == "column" and w.is_contiguous():
                with torch.no_grad():
                    params[name] = w.detach().t().contiguous().t()
                moved.append(name)
                nbytes += w.numel() * w.element_size()
                if any(choices.get(shape, ("", ""))[1] == "row" for choices in self.by_rows.values()):
                    self.originals[id(params[name])] = (params[name], w)
            if copy is not None:
                self.packed[id(params[name])] = (params[name], copy)
            if params[name] is not w or copy is not None:
                self.copied[id(params[name])] = _Copied(params[name], w, min(packed_for) if copy is not None else None)
        out = graph.with_nodes(graph.nodes)
        out.params = params
        return out, moved, nbytes

    def originals_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for _, w in self.originals.values())

    def packed_bytes(self) -> int:
        """Bytes of the packed copies (a packed copy holds as many values as its weight)."""
        return sum(w.numel() * w.element_size() for w, _ in self.packed.values())


@dataclass(frozen=True)
class Remembered:
    """The choices a saved model's program was built with (fast.save writes them, load
    reads them). On the machine, libraries and thread count they were made with, load
    takes them before this machine's cache, so it builds the same program, the same
    kernels and so the same float rounding, whatever the cache holds by then: a choice
    cut short on a busy machine is never cached, and timing it again can pick another
    kernel (a loaded SmolLM2 then gave other logits in the last bits). Elsewhere they
    are ignored and the shapes are planned as usual."""
    fingerprint: dict
    decisions: dict  # key (cpu_linear_cache.shape_key / rows_key) -> Decision

    def here(self) -> dict:
        """The decisions, where this machine is the one they were made on; else {}."""
        fingerprint = machine_fingerprint(timing_method(timing_candidates()))
        return dict(self.decisions) if json.loads(json.dumps(fingerprint)) == self.fingerprint else {}


def cpu_linear_mode(value) -> str | Remembered | None:
    """optimize()'s `cpu_linear` argument as a mode: "cached", "measure", None (off), or
    the Remembered choices of a saved model (load)."""
    if isinstance(value, Remembered):
        return value
    if value is True or value == "cached":
        return "cached"
    if value is False:
        return None
    if value == "measure":
        return "measure"
    raise ValueError(f"cpu_linear={value!r}: expected True or \"cached\" (measure once per machine, then "
                     f"reuse), \"measure\" (time again and update the cache), or False (F.linear, no timing)")


def plan_cpu_linears(graph: Graph, mode: str = "cached",
                     packed_bytes: int = 0) -> tuple[Graph, CpuLinearPlan, PassStats]:
    """Choose a kernel and layout for every float32 weight shape of the graph's linears
    (from this machine's cache, timing the shapes it lacks, or timing all of them when
    `mode` is "measure"); return the graph with weights in their chosen layout, the plan,
    and a report line. `packed_bytes`: memory for oneDNN-packed copies for a few rows (0: none)."""
    start = time.perf_counter()
    names = _linear_weights(graph)
    shapes = sorted({tuple(graph.params[n].shape) for n in names} - set(_untimed_shapes(graph, names)))
    packed = packed_bytes > 0 and PACKED[0] in {c[0] for c in timing_candidates()}
    given = mode.here() if isinstance(mode, Remembered) else {}
    mode = "cached" if isinstance(mode, Remembered) else mode
    decisions, source = _decisions(shapes, mode, packed, given) if shapes else ({}, {})
    plan = CpuLinearPlan(packed_bytes_limit=packed_bytes if packed else 0)
    for shape in shapes:
        decision = decisions[shape_key(shape)]
        if decision.choice != BASELINE:
            plan.choices[shape] = decision.choice
            plan.speedups[shape] = decision.speedup
        one = plan.choices.get(shape, BASELINE)
        for bucket in ROW_BUCKETS:
            few = decisions.get(rows_key(shape, bucket.name, packed=packed))
            # (a cached bucket choice was made against this one-row choice: the two are timed
            # and cached together; the layout check guards against a file edited by hand)
            if few is not None and few.choice != one and few.layout in (one[1], "row", "packed" if packed else "row"):
                plan.by_rows.setdefault(bucket, {})[shape] = few.choice
                plan.row_speedups.setdefault(bucket, {})[shape] = few.speedup
    out, moved, nbytes = plan.apply(graph)
    picked = Counter("_".join(plan.choices[shape]) for shape in (tuple(graph.params[n].shape) for n in names)
                     if shape in plan.choices)
    notes = []
    for shape, (k, layout) in sorted(plan.choices.items()):
        notes.append(f"[{shape[0]}, {shape[1]}]: {k} on {layout}-major weights, "
                     f"{plan.speedups[shape]:.2f}x faster than F.linear at one token")
    for bucket in ROW_BUCKETS:
        for shape, (k, layout) in sorted(plan.by_rows.get(bucket, {}).items()):
            on = "a packed copy of the weights" if layout == "packed" else f"{layout}-major weights"
            notes.append(f"[{shape[0]}, {shape[1]}] at {bucket.name} rows: {k} on {on}, "
                         f"{plan.row_speedups[bucket][shape]:.2f}x faster than the one-row choice at "
                         f"{bucket.timed} rows")
    if plan.originals:
        notes.append(f"{len(plan.originals)} row-major originals kept beside their column-major copies for "
                     f"{_bucket_names(plan)} rows ({plan.originals_bytes() / 2**20:.1f} MiB, the model's own tensors)")
    if plan.packed or plan.not_packed:
        notes.append(f"{len(plan.packed)} oneDNN-packed copies for {_bucket_names(plan)} rows "
                     f"({plan.packed_bytes() / 2**20:.1f} MiB of {plan.packed_bytes_limit / 2**20:.0f} allowed)"
                     + (f"; {plan.not_packed} more did not fit and run oneDNN on the stored weight"
                        if plan.not_packed else ""))
    if picked:
        notes.append(f"{sum(picked.values())} of {len(names)} float32 linear weights on a faster kernel; "
                     f"{len(moved)} stored column-major ({nbytes / 2**20:.1f} MiB of copies)")
    elif names:
        notes.append(f"F.linear kept for all {len(names)} float32 linear weights (none faster, or under "
                     f"{MIN_TIMED_BYTES >> 10} KiB)")
    if source:
        notes.append(_source_note(source))
    stats = PassStats("cpu_linear", time.perf_counter() - start, len(graph.nodes), len(out.nodes), rules=picked,
                      notes=notes, details={"cpu_linear": {"choices": dict(plan.choices), "few_rows": dict(plan.few_rows),
                                                           "remembered": _remembered(shapes, decisions, packed),
                                                           "rows": {b.name: dict(c) for b, c in plan.by_rows.items()},
                                                           "column_major": moved, "bytes": nbytes,
                                                           "originals_bytes": plan.originals_bytes(),
                                                           "packed_bytes": plan.packed_bytes(), **source}})
    return out, plan, stats


def _bucket_names(plan: CpuLinearPlan) -> str:
    """The row ranges whose choices differ from the one-row choice somewhere ("2-8, 9-15")."""
    return ", ".join(b.name for b in ROW_BUCKETS if plan.by_rows.get(b))


def _untimed_shapes(graph: Graph, names: list[str]) -> list[tuple[int, int]]:
    """Weights too small to be worth timing: they sit in cache, a call costs more than the
    read, and timing hundreds of tiny copies would cost more than it finds."""
    shapes = {tuple(graph.params[n].shape) for n in names}
    return [s for s in shapes if s[0] * s[1] * 4 < MIN_TIMED_BYTES]


def _remembered(shapes, decisions: dict, packed: bool) -> Remembered:
    """The decisions this program was built from, for save() (Remembered)."""
    keys = [shape_key(s) for s in shapes] + [rows_key(s, b.name, packed=packed) for s in shapes for b in ROW_BUCKETS]
    return Remembered(json.loads(json.dumps(machine_fingerprint(timing_method(timing_candidates())))),
                      {k: decisions[k] for k in keys if k in decisions})


def _decisions(shapes: list[tuple[int, int]], mode: str, packed: bool = False,
               given: dict | None = None) -> tuple[dict[str, Decision], dict]:
    """The decision for every shape, by shape_key, and where they came from: `given` (a
    saved model's, Remembered), this machine's cache file, or timing now (then written to
    the file)."""
    candidates = timing_candidates()
    fingerprint = machine_fingerprint(timing_method(candidates))
    path = cache_file(fingerprint)
    known = read_decisions(path, fingerprint, candidates + [PACKED]) if mode == "cached" else {}
    known = {**known, **(given or {})}
    missing = [s for s in shapes if shape_key(s) not in known]
    timing_start = time.perf_counter()
    timed = {shape_key(s): d for s, d in measure_choices(missing, candidates).items()}
    decisions = {**known, **timed}
    complete = {key: d for key, d in timed.items() if d.rounds >= MIN_ROUNDS}
    rows_timed, rows_cut_short = {}, {}
    for bucket in ROW_BUCKETS:
        # A bucket's choice is made against the one-row one: timed again whenever that is.
        # (with packed copies allowed or not: two choices, cached under two keys)
        def key(s):
            return rows_key(s, bucket.name, packed=packed)

        bucket_missing = [s for s in shapes if s in missing or key(s) not in known]
        one_row = {s: decisions[shape_key(s)].choice for s in bucket_missing}
        bucket_candidates = candidates + ([PACKED] if packed else [])
        bucket_timed = measure_row_choices(bucket, bucket_missing, one_row, bucket_candidates)
        decisions.update({key(s): d for s, d in bucket_timed.items()})
        rows_timed[bucket.name] = len(bucket_missing)
        rows_cut_short[bucket.name] = sum(d.rounds < MIN_ROUNDS for d in bucket_timed.values())
        # A shape cut short (the budget ran out on a busy machine) keeps F.linear for this
        # model only: caching it would fix that guess for every later run on this machine.
        # Its bucket choices, made against that guess, are not cached either.
        complete.update({key(s): d for s, d in bucket_timed.items()
                         if d.rounds >= MIN_ROUNDS and decisions[shape_key(s)].rounds >= MIN_ROUNDS})
    source = {"from_cache": len(shapes) - len(missing), "timed": len(missing), "rows_timed": rows_timed,
              "timing_seconds": time.perf_counter() - timing_start, "cache_file": path, "cache_error": None,
              "cut_short": sum(decisions[shape_key(s)].rounds < MIN_ROUNDS for s in shapes),
              "rows_cut_short": rows_cut_short}
    if complete:
        source["cache_error"] = write_decisions(path, fingerprint, candidates + [PACKED], complete)
    return decisions, source


def _source_note(source: dict) -> str:
    """Says where the choices came from, so that a report tells a measured program from a
    remembered one."""
    cached, timed = source["from_cache"], source["timed"]
    if not timed:
        note = f"choices for {_shapes(cached)} read from the cache (nothing timed): {source['cache_file']}"
    else:
        note = f"{_shapes(timed)} timed now ({source['timing_seconds']:.2f} s)"
        if cached:
            note = f"{_shapes(cached)} read from the cache, {note}"
        if source["cache_error"]:
            note = f"{note}; not cached ({source['cache_error']})"
        else:
            note = f"{note}, saved to {source['cache_file']}"
    if any(source["rows_timed"].values()):
        note += "; row-bucket choices timed now: " + ", ".join(
            f"{n} at {name} rows" for name, n in source["rows_timed"].items() if n)
    if source["cut_short"]:
        note += (f"; {_shapes(source['cut_short'])} kept F.linear because the timing budget ran out (a busy "
                 f"machine?), not cached: the next optimize() times them again")
    if any(source["rows_cut_short"].values()):
        cut = ", ".join(f"{n} at {name} rows" for name, n in source["rows_cut_short"].items() if n)
        note += (f"; row-bucket choices ({cut}) kept the one-row kernel because the timing budget ran out, "
                 f"not cached: the next optimize() times them again")
    return note


def _shapes(n: int) -> str:
    return f"{n} weight shape{'' if n == 1 else 's'}"


def timing_candidates() -> list[tuple[str, str]]:
    """(kernel, layout) pairs this build can run, in PREFERENCE order, without PACKED: a
    second copy of the weight is a candidate only where memory is given for it (added
    by the caller). (Timed among the rest, a packed copy that won where none may be made
    left a bucket on the one-row choice although a layout the program holds beat it.)"""
    kernels = {k for k in KERNELS if k != "onednn" or onednn_available()}
    return [c for c in PREFERENCE if c[0] in kernels and c != PACKED]


def timing_method(candidates) -> dict:
    """Everything about the measurement that could change its answer: part of the cache's
    fingerprint, so that changing it measures again instead of trusting old choices."""
    return {"version": METHOD_VERSION, "candidates": ["_".join(c) for c in candidates],
            "cold_bytes": COLD_BYTES, "max_copies": MAX_COPIES, "min_speedup": MIN_SPEEDUP, "tie": TIE,
            "row_buckets": [[b.first, b.last, b.timed, b.budget] for b in ROW_BUCKETS],
            "min_wins": MIN_WINS, "calls_per_round": CALLS_PER_ROUND, "min_rounds": MIN_ROUNDS}


def measure_choices(shapes: list[tuple[int, int]], candidates: list[tuple[str, str]],
                    budget_s: float | None = None) -> dict[tuple[int, int], Decision]:
    """Time every candidate on every shape and decide, in about TARGET_SHARE of `budget_s`
    and starting no round after `budget_s` (so at most one round of one shape more): on a
    busy machine a shape left without MIN_ROUNDS rounds keeps F.linear (cut short), rather
    than optimize() taking seconds."""
    return _measure(shapes, {s: candidates for s in shapes}, {s: BASELINE for s in shapes}, 1,
                    TIME_BUDGET_S if budget_s is None else budget_s)


def measure_row_choices(bucket: RowBucket, shapes: list[tuple[int, int]],
                        one_row: dict[tuple[int, int], tuple[str, str]], candidates: list[tuple[str, str]],
                        budget_s: float | None = None) -> dict[tuple[int, int], Decision]:
    """The choice for the row counts of `bucket` for each shape, timed at bucket.timed
    rows against its one-row choice `one_row[shape]` (what those calls would run
    otherwise), among the candidates that read a weight the program already has: the
    stored layout (the one-row choice's) or the row-major original, or a packed copy where
    `candidates` has PACKED. Same budget rules as measure_choices (the budget:
    FEW_ROWS_BUDGET_S times bucket.budget)."""
    allowed = {s: [c for c in candidates if c[1] in (one_row[s][1], "row", "packed")] for s in shapes}
    return _measure(shapes, allowed, one_row, bucket.timed,
                    FEW_ROWS_BUDGET_S * bucket.budget if budget_s is None else budget_s)


def _measure(shapes, candidates_of, baseline_of, rows: int, budget_s: float) -> dict[tuple[int, int], Decision]:
    if not shapes:
        return {}
    start = time.perf_counter()
    # One buffer for every shape and layout: allocating (and zero-filling) tens of MiB per
    # candidate cost more than the timing itself.
    largest = max(s[0] * s[1] for s in shapes)
    buffer = torch.zeros(max(COLD_BYTES // 4, largest))
    deadline, hard_stop = start + TARGET_SHARE * budget_s, start + budget_s
    decisions = {}
    # The largest weights first: they take most of a decoding step, so they get the time.
    shapes = sorted(shapes, key=lambda s: (-s[0] * s[1], s))
    for i, shape in enumerate(shapes):
        shape_stop = time.perf_counter() + max(0.0, deadline - time.perf_counter()) / (len(shapes) - i)
        baseline = baseline_of[shape]
        decisions[shape] = decide(round_seconds(shape, candidates_of[shape], buffer, shape_stop, hard_stop, rows,
                                                baseline), baseline)
    return decisions


def decide(rounds: dict[tuple[str, str], list[float]], baseline: tuple[str, str] = BASELINE) -> Decision:
    """The choice from each candidate's seconds per call in each round. A candidate's time
    is its median over rounds; those within TIE of the fastest count as equally fast and
    the first of them in PREFERENCE wins (F.linear as given first, then layouts that need
    no copy). Leaving F.linear takes a MIN_SPEEDUP margin and beating it in most rounds
    timed side by side (MIN_WINS): on a busy machine one lucky round is not a win, and
    noise alone should not move a choice off the default. Fewer than MIN_ROUNDS rounds
    (time ran out) keep F.linear too. `baseline` replaces F.linear as the default for the
    few-row choice (the one-row choice: what those calls would run otherwise)."""
    completed = max(len(r) for r in rounds.values())
    if completed < MIN_ROUNDS:
        return Decision(*baseline, 1.0, {}, completed)
    medians = {c: statistics.median(r) for c, r in rounds.items() if r}
    fastest = min(medians.values())
    tied = [c for c in [baseline] + PREFERENCE if c in medians and medians[c] <= fastest * TIE]
    choice = tied[0]
    speedup = medians[baseline] / medians[choice]
    if choice != baseline and (speedup < MIN_SPEEDUP or _win_share(rounds[choice], rounds[baseline]) < MIN_WINS):
        choice = baseline
    return Decision(choice[0], choice[1], speedup if choice != baseline else 1.0,
                    {"_".join(c): t * 1e6 for c, t in medians.items()}, completed)


def _win_share(candidate: list[float], baseline: list[float]) -> float:
    """The share of the rounds timed for both in which `candidate` was faster."""
    pairs = list(zip(candidate, baseline))
    return sum(c < b for c, b in pairs) / len(pairs)


def round_seconds(shape: tuple[int, int], candidates: list[tuple[str, str]], buffer: torch.Tensor,
                  stop: float, hard_stop: float, rows: int = 1,
                  baseline: tuple[str, str] = BASELINE) -> dict[tuple[str, str], list[float]]:
    """Seconds of a call with `rows` activation rows of each candidate on `shape`, one figure per round: the
    median of its calls in that round. A round calls every candidate CALLS_PER_ROUND times
    on cold weights (_next_copies), in an order rotated per round, so that
    load from elsewhere hits all candidates alike. The median of the calls, not their sum:
    on a shared machine another process's time slice spoils a few calls, not their median.
    At least MIN_ROUNDS rounds, more (up to MAX_ROUNDS) until `stop`; none started after
    `hard_stop`. A candidate far slower than the fastest after two rounds is not timed
    again (_still_in_the_running)."""
    rounds: dict[tuple[str, str], list[float]] = {c: [] for c in candidates}
    if time.perf_counter() >= hard_stop:
        return rounds
    weights = {layout: cold_weights(buffer, shape, layout, rows) for layout in {c[1] for c in candidates}}
    x = torch.randn(rows, shape[1], generator=_private_generator(), device="cpu")  # the caller's random state is theirs
    for kernel, layout in candidates:  # oneDNN builds its primitive on the first call of a shape
        KERNELS[kernel](x, weights[layout][0])
    timed, cursor = list(candidates), 0
    for round_ in range(MAX_ROUNDS):
        order = timed[round_ % len(timed):] + timed[:round_ % len(timed)]
        for kernel, layout in order:
            some = _next_copies(weights[layout], cursor)
            cursor += len(some)
            rounds[(kernel, layout)].append(statistics.median(_call_seconds(KERNELS[kernel], x, some)))
        if round_ == 1:
            timed = _still_in_the_running(rounds, timed, baseline)
        now = time.perf_counter()
        if now >= hard_stop or (round_ + 1 >= MIN_ROUNDS and now >= stop):
            break
    return rounds


def _still_in_the_running(rounds: dict[tuple[str, str], list[float]], timed: list[tuple[str, str]],
                          baseline: tuple[str, str] = BASELINE):
    """The candidates worth more rounds: the baseline, F.linear (every decision compares with it) and
    those whose best round so far is within DROP_SLOWER of the best of all. Noise only
    ever adds time, so a best round that slow is the kernel, not a busy moment."""
    best = min(min(r) for r in rounds.values() if r)
    return [c for c in timed if c == baseline or min(rounds[c]) <= best * DROP_SLOWER]


def _next_copies(weights: list[torch.Tensor], cursor: int) -> list[torch.Tensor]:
    """The CALLS_PER_ROUND copies from `cursor` on, cyclically. The row- and column-major
    copies are views of the same memory, so one cursor for all candidates makes each read
    memory that every other copy was read after: none finds the last one's in the cache."""
    n = min(CALLS_PER_ROUND, len(weights))
    return [weights[(cursor + i) % len(weights)] for i in range(n)]


def cold_weights(buffer: torch.Tensor, shape: tuple[int, int], layout: str, rows: int = FEW_TIMED_ROWS
                 ) -> list[torch.Tensor]:
    """Views of `buffer` as weights of `shape` in `layout`, enough of them to overflow a
    server CPU's last-level cache: decoding reads every weight from memory once per token.
    (packed: copies packed for `rows` rows)"""
    out_features, in_features = shape
    n = out_features * in_features
    copies = min(MAX_COPIES, max(1, COLD_BYTES // (n * 4)))
    flat = [buffer[i * n:(i + 1) * n] for i in range(copies)]
    if layout == "packed":  # copies of their own, packed as the plan packs them
        return [torch.ops.mkldnn._reorder_linear_weight(w.view(out_features, in_features), rows)
                for w in flat]
    if layout == "row":
        return [w.view(out_features, in_features) for w in flat]
    return [w.view(in_features, out_features).t() for w in flat]


def _call_seconds(kernel, x, weights) -> list[float]:
    """Seconds of each call of `kernel` on `x`, one call per weight of `weights`."""
    times = []
    for w in weights:
        start = time.perf_counter()
        kernel(x, w)
        times.append(time.perf_counter() - start)
    return times


def _private_generator() -> torch.Generator:
    """Random numbers for timing and checks come from a generator of their own: drawn from
    torch's global one, they moved the user's seeded stream (torch.manual_seed(0); optimize or
    a first torch.compile call; then sampling drew other tokens than eager)."""
    return torch.Generator().manual_seed(0)


def onednn_available() -> bool:
    """oneDNN's linear is an internal op of PyTorch's CPU build: check it runs and agrees."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        gen = _private_generator()
        x, w, b = (torch.randn(*shape, generator=gen, device="cpu") for shape in ((3, 8), (5, 8), (5,)))
        return torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


def _linear_weights(graph: Graph) -> list[str]:
    seen: dict[str, None] = {}
    for node in graph.nodes:
        if node.op == "linear":
            name = node.inputs[1].param
            w = graph.params.get(name) if name else None
            if w is not None and w.dim() == 2 and w.dtype == torch.float32 and w.device.type == "cpu":
                seen[name] = None
    return list(seen)
