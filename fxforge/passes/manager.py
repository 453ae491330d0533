"""The pass pipeline: a registry of named passes, the default order, stats and dumps.

A pass is `fn(graph) -> graph` or `fn(graph, ctx) -> graph`; `ctx` (a `PassContext`)
carries the user's options, a counter of rules fired, and notes for the report.
"""
from __future__ import annotations

import inspect
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from ..ir.graph import Graph
from ..ir.pause_gc import paused_gc
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

    def parse_option(self, value):
        """The option's value as the pass reads it (unchanged without a parser)."""
        return self.parse(value) if self.parse is not None else value

    def enabled_by(self, value) -> bool:
        """Whether this option value turns the pass on: a parsed config that is not None,
        or, for a user pass without a parser, any truthy value."""
        return self.parse_option(value) is not None if self.parse is not None else bool(value)

    def wants_ctx(self) -> bool:
        try:
            return len(inspect.signature(self.fn).parameters) >= 2
        except (TypeError, ValueError):
            return False


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
        self.passes.pop(name, None)
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
            return [self.get(n) for n in passes]
        chosen = []
        for name in self.order:
            info = self.passes[name]
            if name in disable:
                continue
            if info.option is not None and not info.enabled_by(options.get(info.option)):
                continue
            chosen.append(info)
        return chosen


def check_enabled() -> bool:
    return os.environ.get("FXFORGE_CHECK", "") not in ("", "0")


def run_pipeline(graph: Graph, pipeline: list[PassInfo], options: dict | None = None,
                 check: bool | None = None, dump=None, reporter=None) -> tuple[Graph, list[PassStats]]:
    """Run passes in order. `dump(index, name, graph)` is called after each pass;
    `reporter` (fxforge.log.Reporter: progress bar, FXFORGE_LOG lines) hears each pass start and end."""
    with paused_gc():
        return _run_passes(graph, pipeline, options, check, dump, reporter)


def _run_passes(graph, pipeline, options, check, dump, reporter=None):
    check = check_enabled() if check is None else check
    options = dict(options or {})
    stats: list[PassStats] = []
    if check:
        typecheck(graph)
    if dump is not None:
        dump(0, "capture", graph)
    for i, info in enumerate(pipeline, start=1):
        if reporter is not None:
            reporter.pass_started(i, len(pipeline), info.name)
        ctx = PassContext(options=options, status=reporter.status if reporter is not None else _quiet)
        before = len(graph.nodes)
        start = time.perf_counter()
        out = info.fn(graph, ctx) if info.wants_ctx() else info.fn(graph)
        seconds = time.perf_counter() - start
        if not isinstance(out, Graph):
            raise TypeError(f"pass {info.name!r} returned {type(out).__name__}, not a Graph")
        if check:
            try:
                typecheck(out)
            except IRCheckError as e:
                raise IRCheckError(f"after pass {info.name!r}: {e}") from None
        graph = out
        stats.append(PassStats(info.name, seconds, before, len(graph.nodes), ctx.rules, ctx.notes, ctx.details))
        if reporter is not None:
            reporter.pass_finished(i, len(pipeline), stats[-1])
        if dump is not None:
            dump(i, info.name, graph)
    return graph, stats


def format_report(stats: list[PassStats], capture_seconds: float | None = None) -> str:
    lines = [f"{'pass':<20} {'time':>9} {'nodes':>13}  rules fired"]
    if capture_seconds is not None:
        lines.append(f"{'capture':<20} {capture_seconds * 1000:>7.1f}ms")
    for s in stats:
        fired = ", ".join(f"{k}={v}" for k, v in sorted(s.rules.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"
        lines.append(f"{s.name:<20} {s.seconds * 1000:>7.1f}ms {s.nodes_before:>5} -> {s.nodes_after:<5}  {fired}")
        for note in s.notes:
            lines.append(f"{'':<20}   note: {note}")
    return "\n".join(lines)
