"""The pass pipeline: a registry of named passes, the default order, stats and dumps.

A pass is `fn(graph) -> graph` or `fn(graph, ctx) -> graph`; `ctx` (a `PassContext`)
carries the user's options, a counter of rules fired, and notes for the report.

The IR typechecks after every pass a user registers (`builtin=False`, the default), always;
after the built-in passes only under FXFORGE_CHECK=1 (tests): after all of them it costs
15-85 ms on tests/zoo.py's small models, a third to nearly all of the passes' own time. A
user's pass must also keep the graph's interface (inputs: number, names, types, roles;
outputs: number and types), which the model's call feeds and reads. A user's pass gets
weights of its own (`own_weights`, run_pipeline), never the source model's tensors. An
exception a pass raises names the pass: a `PassError` with
the original as `__cause__`, except the deliberate errors of fxforge's own passes
(KVCacheError, GQAError, a ValueError about the model ...), which keep their type (callers
catch them) and get a note naming the pass.
"""
from __future__ import annotations

import inspect
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from ..ir.graph import Graph
from ..ir.pause_gc import paused_gc
from ..ir.roles import role_of
from ..ir.typecheck import IRCheckError, typecheck


@dataclass
class PassInfo:
    name: str
    fn: Callable
    # A pass that only runs when its option is given (e.g. quantize="int8"); None: always.
    option: str | None = None
    doc: str = ""
    # Turns the user's value of `option` into what the pass reads (a config), or None for
    # "leave this pass out"; raises ValueError/TypeError naming the option for a value it
    # cannot mean. Run before capture, so a typo fails in milliseconds, not after a minute
    # of tracing, and a value such as gqa=0 cannot quietly switch the pass off.
    parse: Callable[[Any], Any] | None = None
    # fxforge's own passes: trusted to keep the IR well typed (checked under FXFORGE_CHECK).
    # Any other pass is typechecked after every run, so that a broken rewrite fails there,
    # naming the pass, not as a wrong answer or a KeyError in the program.
    builtin: bool = False
    # The pass cannot run without its option (gqa needs a head count, shard a number of
    # ranks, quantize a scheme): passes=[..., name] without it is refused by name, where
    # kv_cache (default KVCacheConfig()) runs on without one.
    needs_option: bool = False
    # Passes that, when both are in a pipeline, must run after this one (gqa shrinks the
    # K/V projections the cache is built from: after kv_cache it finds the cache's inputs).
    runs_before: tuple = ()
    # The pass changes the model's answer on purpose (a cheaper approximation): optimize()
    # measures the error against the source model and states it in report(), as it does
    # for quantize and gqa. An exact pass (the default) makes no such measurement.
    approximate: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a pass name is a non-empty str, got {self.name!r}")
        if not _PASS_NAME.fullmatch(self.name) or ".." in self.name:
            # the name is a file name too: dump_dir gets NN_<name>.ir
            raise ValueError(f"pass name {self.name!r}: use letters, digits, '_', '-' and '.' (not '..'); the "
                             "name is part of the dump's file names (NN_<name>.ir)")
        if self.option is not None and (not isinstance(self.option, str) or self.option in RESERVED_OPTIONS):
            raise ValueError(f"pass {self.name!r}: option={self.option!r} cannot be a pass option: "
                             + ("it is one of optimize()'s own keywords, which never reach a pass; choose "
                                "another name" if isinstance(self.option, str) else "an option is a str"))
        _check_pass_fn(self.name, self.fn)

    def parse_option(self, value):
        """The option's value as the pass reads it (unchanged without a parser)."""
        return self.parse(value) if self.parse is not None else value

    def enabled_by(self, value) -> bool:
        """Whether this option value turns the pass on: a parsed config that is not None,
        or, for a user pass without a parser, any truthy value."""
        return self.parse_option(value) is not None if self.parse is not None else bool(value)

    def wants_ctx(self) -> bool:
        arity = _positional_arity(self.fn)
        return arity is not None and arity[1] >= 2


_PASS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# optimize()'s (and optimize_captured()'s) own keywords: optimize() keeps them, so a pass
# option of that name would never be seen by its pass (tests/test_ir_text_edges.py checks
# this list against their signatures).
RESERVED_OPTIONS = frozenset({
    "model", "example_inputs", "example_kwargs", "passes", "disable", "backend", "dump_dir", "dynamic",
    "registry", "cpu_linear", "verbose", "capture_cache", "copy_weights", "capture", "device"})


def _positional_arity(fn) -> tuple[int, float] | None:
    """(required, most) positional arguments `fn` takes; None when Python cannot say (a
    builtin without a signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    required += sum(1 for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty)
    most = float("inf") if any(p.kind == p.VAR_POSITIONAL for p in params) else len(positional)
    return required, most


def _check_pass_fn(name, fn):
    """A pass is called as fn(graph) or fn(graph, ctx): refuse anything else when it is
    registered, not at the first optimize()."""
    if not callable(fn):
        raise TypeError(f"pass {name!r}: expected a function fn(graph) -> graph or fn(graph, ctx) -> graph, "
                        f"got {type(fn).__name__} {fn!r}")
    arity = _positional_arity(fn)
    if arity is not None and (arity[0] > 2 or arity[1] < 1):
        raise TypeError(f"pass {name!r}: {getattr(fn, '__name__', fn)!s}{inspect.signature(fn)} cannot be called as "
                        "fn(graph) or fn(graph, ctx); a pass takes the graph (and optionally a PassContext) "
                        "and returns a graph")


class PassError(RuntimeError):
    """A pass raised: the message names the pass, `__cause__` is what it raised."""

    def __init__(self, message: str, pass_name: str):
        super().__init__(message)
        self.pass_name = pass_name


def _quiet(message: str):
    pass


@dataclass
class PassContext:
    options: dict[str, Any] = field(default_factory=dict)
    rules: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    # Per-pass structured findings for the report (e.g. quantize: bytes per layer).
    details: dict[str, Any] = field(default_factory=dict)
    # A progress line for a long step inside a pass (calibration, packing weights); the
    # manager connects it to optimize()'s progress output (fxforge/log.py).
    status: Callable[[str], None] = _quiet

    def note(self, text: str):
        self.notes.append(text)


@dataclass
class PassStats:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    rules: Counter
    notes: list[str]
    details: dict


class PassRegistry:
    """Named passes and the default pipeline order. One default registry lives in
    `fxforge.passes.registry`; tests and users may build their own."""

    def __init__(self):
        self.passes: dict[str, PassInfo] = {}
        self.order: list[str] = []

    def add(self, info: PassInfo, before: str | None = None, after: str | None = None, append: bool = False,
            replace: bool = False):
        """Register `info`. replace=True swaps a pass of the same name in place (its position
        kept unless before=/after= is given): re-running a notebook cell that registers a
        pass is then harmless."""
        if info.name in self.passes:
            if not replace:
                raise ValueError(f"a pass named {info.name!r} is already registered; pass replace=True to "
                                 f"replace it (e.g. a notebook cell run twice), or unregister_pass({info.name!r}) "
                                 f"first")
            if before is None and after is None and not append:
                self.passes[info.name] = info
                return info
            self.remove(info.name)
        if before and after:
            raise ValueError("give before= or after=, not both")
        owner = next((p for p in self.passes.values() if p.builtin and p.option == info.option
                      and p.name != info.name), None) if info.option and not info.builtin else None
        if owner is not None:  # optimize(quantize=...) would switch on both, each reading the other's value
            raise ValueError(f"pass {info.name!r}: option={info.option!r} is the option of fxforge's own pass "
                             f"{owner.name!r}; choose another option name")
        anchor = before or after
        if anchor is not None and anchor not in self.order:
            raise ValueError(f"cannot place {info.name!r} relative to unknown pass {anchor!r}; "
                             f"the pipeline is {self.order}")
        self.passes[info.name] = info
        if append:
            self.order.append(info.name)
        elif before:
            self.order.insert(self.order.index(before), info.name)
        elif after:
            self.order.insert(self.order.index(after) + 1, info.name)
        elif "fuse_elementwise" in self.order:
            # default: before pointwise fusion (so the user's rules see plain ops) and the
            # final cleanup (so their rewrite gets tidied up)
            self.order.insert(self.order.index("fuse_elementwise"), info.name)
        else:
            self.order.insert(len(self.order) - 1 if self.order else 0, info.name)
        return info

    def remove(self, name: str):
        if name not in self.passes:
            raise ValueError(f"no pass named {name!r} is registered; known passes: {', '.join(self.known())}")
        del self.passes[name]
        self.order = [n for n in self.order if n != name]

    def get(self, name: str) -> PassInfo:
        if name not in self.passes:
            raise ValueError(f"unknown pass {name!r}; known passes: {', '.join(self.known())}")
        return self.passes[name]

    def known(self) -> list[str]:
        return sorted(self.passes)

    def parse_options(self, options: dict) -> dict:
        """Every option's value as its pass reads it (None: that pass is off). Raises
        TypeError for an option no pass takes, and the pass's own error for a bad value."""
        by_option = {info.option: info for info in self.passes.values() if info.option}
        unknown = set(options) - set(by_option)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for fxforge.optimize; "
                            f"pass options known: {sorted(by_option) or 'none'}")
        return {name: by_option[name].parse_option(value) for name, value in options.items()}

    def pipeline(self, options: dict, passes: list[str] | None = None, disable=()) -> list[PassInfo]:
        for name in list(passes or []) + list(disable):
            self.get(name)  # unknown names fail early, listing the known ones
        if passes is not None:
            chosen = [self.get(n) for n in passes]
        else:
            chosen = []
            for name in self.order:
                info = self.passes[name]
                if name in disable:
                    continue
                if info.option is not None and not info.enabled_by(options.get(info.option)):
                    continue
                chosen.append(info)
        self._check_options_run(options, chosen, passes, disable)
        if passes is not None:
            self._check_listed(options, chosen, list(passes))
        return chosen

    def _check_listed(self, options: dict, chosen: list[PassInfo], passes: list[str]):
        """passes= may name a pass whose option is missing, or put two in an order they
        cannot run in: say so here, not as an error from deep inside the pass."""
        for info in chosen:
            if info.needs_option and options.get(info.option) is None:
                raise ValueError(f"passes={passes!r} lists {info.name!r}, which needs the option {info.option}= "
                                 f"({info.doc or 'its configuration'}); give {info.option}=..., or leave "
                                 f"{info.name!r} out of passes=")
        position = {name: i for i, name in reversed(list(enumerate(passes)))}  # first run of each
        for info in chosen:
            for later in info.runs_before:
                if later in position and position[later] < position[info.name]:
                    raise ValueError(f"passes={passes!r} runs {info.name!r} after {later!r}, but {info.name!r} "
                                     f"must run before it (the default pipeline's order is "
                                     f"{[n for n in self.order if n in position]!r}): reorder passes=")

    def _check_options_run(self, options: dict, chosen: list[PassInfo], passes, disable):
        """An option that turns a pass on (kv_cache=True) while passes= or disable= leave out
        every pass it drives would be silently ignored: refuse the conflict instead."""
        names = {info.name for info in chosen}
        for option, value in options.items():
            # the first pass registered for an option is the one that does it (kv_cache; its
            # fuse_rope_attention only fuses what kv_cache made)
            main = next((info for name in self.order if (info := self.passes[name]).option == option), None)
            if main is None or main.name in names or not main.enabled_by(value):
                continue
            which = repr(main.name)
            how = (f"disable={list(disable)!r} leaves it out" if main.name in disable
                   else f"passes={list(passes or [])!r} does not include it")
            raise ValueError(f"the option {option}= asks for pass {which}, but {how}: the option would be "
                             f"ignored; drop {option}=, or run the pass")


def check_enabled() -> bool:
    return os.environ.get("FXFORGE_CHECK", "") not in ("", "0")


def run_pipeline(graph: Graph, pipeline: list[PassInfo], options: dict | None = None,
                 check: bool | None = None, dump=None, reporter=None,
                 own_weights: Callable[[Graph], Graph] | None = None) -> tuple[Graph, list[PassStats]]:
    """Run passes in order. `dump(index, name, graph)` is called after each pass (and, with
    the name `<pass>.failed`, with the graph a pass returned that fails its checks);
    `reporter` (fxforge.log.Reporter: progress bar, FXFORGE_LOG lines) hears each pass start and end.
    `own_weights(graph)` is called once, just before the first pass that is not fxforge's
    own, and returns the graph with weights of its own (optimize(): copies of those still
    shared with the source model), so that a user's pass that edits `graph.params[...]` in
    place cannot reach the model. fxforge's own passes never write a weight in place."""
    with paused_gc():
        return _run_passes(graph, pipeline, options, check, dump, reporter, own_weights)


def _run_passes(graph, pipeline, options, check, dump, reporter=None, own_weights=None):
    check = check_enabled() if check is None else check
    options = dict(options or {})
    stats: list[PassStats] = []
    if check:
        typecheck(graph)
    if dump is not None:
        dump(0, "capture", graph)
    for i, info in enumerate(pipeline, start=1):
        if own_weights is not None and not info.builtin:
            graph, own_weights = own_weights(graph), None  # (once: later copies would be of copies)
        if reporter is not None:
            reporter.pass_started(i, len(pipeline), info.name)
        ctx = PassContext(options=options, status=reporter.status if reporter is not None else _quiet)
        before = len(graph.nodes)
        start = time.perf_counter()
        try:
            out = _run_one(info, graph, ctx)
        except Exception as e:
            _add_fusion_notes(e, stats)
            raise
        seconds = time.perf_counter() - start
        if not isinstance(out, Graph):
            raise TypeError(f"pass {info.name!r} returned {type(out).__name__}, not a Graph")
        try:
            _check_result(info, graph, out, check)
        except IRCheckError:
            if dump is not None:  # the graph that failed, for the pass's author to read
                _dump_failed(dump, i, info.name, out)
            raise
        graph = out
        stats.append(PassStats(info.name, seconds, before, len(graph.nodes), ctx.rules, ctx.notes, ctx.details))
        if reporter is not None:
            reporter.pass_finished(i, len(pipeline), stats[-1])
        if dump is not None:
            dump(i, info.name, graph)
    return graph, stats


def _check_result(info: PassInfo, graph: Graph, out: Graph, check: bool):
    """The graph a pass returned still types, and still fits the model's call: the same
    outputs, and (for a user's pass) the same inputs and output types."""
    if check or not info.builtin:
        try:
            typecheck(out, weights=bool(graph.params) or None)  # weights it had, it keeps
        except IRCheckError as e:
            raise IRCheckError(f"after pass {info.name!r}: {e}") from None
    if len(out.outputs) != len(graph.outputs):
        # the model's call rebuilds its output from exactly these values
        raise IRCheckError(f"after pass {info.name!r}: the graph returns {len(out.outputs)} value(s) where it "
                           f"returned {len(graph.outputs)}; a pass must keep the graph's outputs (their "
                           "number and order), since the model's call returns them")
    if not info.builtin:
        # (fxforge's own passes may add inputs: kv_cache's positions and cache lengths)
        _check_inputs(info.name, graph, out)
        _check_output_types(info.name, graph, out)


def _dump_failed(dump, index: int, name: str, graph: Graph):
    """Dump the graph a pass returned that failed its checks, if it can be printed at all
    (a dump must never hide the error it would explain)."""
    try:
        dump(index, f"{name}.failed", graph)
    except Exception:  # noqa: BLE001
        pass


def _add_fusion_notes(error: Exception, stats: list[PassStats]):
    """kv_cache and gqa refuse a model whose attention fuse_attention declined and point at
    its notes; optimize() raises, so there is no report() to read them in: the error
    carries them (shown under its message)."""
    if "fuse_attention" not in str(error) or not hasattr(error, "add_note"):
        return
    ran = [s for s in stats if s.name == "fuse_attention"]
    if not ran:
        error.add_note("fuse_attention did not run before this pass (left out by passes= or disable=)")
        return
    notes = [n for s in ran for n in s.notes]
    error.add_note("fuse_attention's notes: " + (" | ".join(notes) if notes else "none (it fused nothing and "
                                                 "found no softmax it could have fused)"))


def _input_signature(graph: Graph) -> list[tuple]:
    """What the model's call relies on in each graph input: (name, type, role)."""
    names = list(graph.input_names) + [None] * (len(graph.inputs) - len(graph.input_names))
    return [(name, str(v.type), role_of(v)) for name, v in zip(names, graph.inputs)]


def _check_inputs(name: str, before: Graph, after: Graph):
    """A user's pass keeps the graph's inputs (their number, order, names, types and
    roles): the call hands the model's arguments to them by position, so a dropped or
    retyped input would fail at the first call (`program() takes 1 positional argument
    but 2 were given`) or compute on the wrong argument."""
    old, new = _input_signature(before), _input_signature(after)
    if len(new) != len(old):
        raise IRCheckError(f"after pass {name!r}: the graph takes {len(new)} input(s) where it took {len(old)} "
                           f"({', '.join(str(o[0]) for o in old)}); a pass must keep the graph's inputs, since "
                           "the model's call passes its arguments to them: leave an input a rewrite no longer "
                           "reads in graph.inputs (an unread input costs nothing)")
    for i, (o, n) in enumerate(zip(old, new)):
        for what, a, b in (("name", o[0], n[0]), ("type", o[1], n[1]), ("role", o[2], n[2])):
            if a != b:
                raise IRCheckError(f"after pass {name!r}: input {i} ({o[0]}) has {what} {b} where it had {a}; a "
                                   "pass must keep each input's name, type and role, since the model's call passes "
                                   "its arguments to them as they are")


def _check_output_types(name: str, before: Graph, after: Graph):
    """A user's pass keeps each output's type: the call hands them back as the model's
    outputs, so a cast or a slice there would change what fast(...) returns, unseen by a
    typecheck of the graph alone."""
    for i, (old, new) in enumerate(zip(before.outputs, after.outputs)):
        if str(old.type) != str(new.type):
            raise IRCheckError(f"after pass {name!r}: output {i} is {new.type} where it was {old.type}; a pass must "
                               "keep each output's dtype and shape, since the model's call returns them as they are")


def _run_one(info: PassInfo, graph: Graph, ctx: PassContext) -> Graph:
    try:
        return info.fn(graph, ctx) if info.wants_ctx() else info.fn(graph)
    except Exception as e:
        if info.builtin and _deliberate(e):
            if hasattr(e, "add_note"):  # (Python 3.11+)
                e.add_note(f"(in pass {info.name!r})")
            raise
        raise PassError(f"pass {info.name!r} raised {type(e).__name__}: {e}", info.name) from e


def _deliberate(e: Exception) -> bool:
    """An error a built-in pass raises on purpose (KVCacheError, GQAError, IRCheckError, a
    ValueError or TypeError about the model or an option): its type is part of the API
    (callers catch it), and its message says what went wrong where. Anything else (a
    KeyError, an AttributeError, torch's RuntimeError) is a bug the PassError names."""
    return (type(e).__module__.startswith("fxforge.") or isinstance(e, (ValueError, TypeError))) \
        and not isinstance(e, PassError)


def format_report(stats: list[PassStats], capture_seconds: float | None = None) -> str:
    """capture_seconds None: the graph was not captured here but read from IR text
    (fxforge.load, load_ir), and the passes' rows are those of the run that wrote it, if any."""
    lines = [f"{'pass':<20} {'time':>9} {'nodes':>13}  rules fired"]
    if capture_seconds is None:
        lines.append(f"{'capture':<20} {'-':>9}  (loaded from IR text: no capture or passes in this process)")
    else:
        lines.append(f"{'capture':<20} {capture_seconds * 1000:>7.1f}ms")
    for s in stats:
        fired = ", ".join(f"{k}={v}" for k, v in sorted(s.rules.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"
        lines.append(f"{s.name:<20} {s.seconds * 1000:>7.1f}ms {s.nodes_before:>5} -> {s.nodes_after:<5}  {fired}")
        for note in s.notes:
            lines.append(f"{'':<20}   note: {note}")
    return "\n".join(lines)
