"""What optimize() tells the user while it works: a progress bar over the passes, and the
debug log topics named in FXFORGE_LOG.

    FXFORGE_LOG=passes   print each pass as it starts and what it did when it ends
    FXFORGE_LOG=all      every topic ("capture", "passes", "dynamo")

One `Reporter` is made per optimize() call (the environment is read then, not at import,
so a test or a notebook may change it between calls). Everything goes to stderr: stdout
belongs to the user's program. tqdm draws the bar when it is installed (it comes with
transformers); without it, plain lines.
"""
from __future__ import annotations

import os
import sys
import time

TOPICS = ("capture", "passes", "dynamo")


def log_topics(value: str | None = None) -> frozenset[str]:
    """The topics asked for in FXFORGE_LOG (comma- or space-separated; "all" for every one).
    An unknown topic is an error, so a typo does not silently log nothing."""
    value = os.environ.get("FXFORGE_LOG", "") if value is None else value
    names = {n.strip().lower() for n in value.replace(",", " ").split() if n.strip()}
    if "all" in names:
        return frozenset(TOPICS)
    unknown = names - set(TOPICS)
    if unknown:
        raise ValueError(f"FXFORGE_LOG names unknown topic(s) {sorted(unknown)}; known: {', '.join(TOPICS)}, all")
    return frozenset(names)


def progress_wanted(verbose: bool | None) -> bool:
    """verbose=None: show progress only to a person watching a terminal (not in CI logs,
    pipes or captured test output)."""
    if verbose is not None:
        return bool(verbose)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Reporter:
    """Progress and log lines of one optimize() call. run_pipeline calls pass_started and
    pass_finished around each pass."""

    def __init__(self, verbose: bool | None = None, topics: frozenset[str] | None = None):
        self.progress = progress_wanted(verbose)
        self.topics = log_topics() if topics is None else topics
        self._bar = None
        self._started = 0.0

    def enabled(self, topic: str) -> bool:
        return topic in self.topics

    def log(self, topic: str, message: str):
        if topic in self.topics:
            self._write(f"[fxforge {topic}] {message}")

    def status(self, message: str):
        """A one-off progress line (e.g. "capturing ..."), for a step with no count to show."""
        if self.progress:
            self._write(f"fxforge: {message}")

    # -- the pass manager's hook --------------------------------------------------------
    def pass_started(self, index: int, total: int, name: str):
        self._started = time.perf_counter()
        self.log("passes", f"[{index}/{total}] {name} ...")
        if not self.progress:
            return
        if self._bar is None:
            self._bar = _make_bar(total)
        if self._bar is not None:
            self._bar.set_description_str(f"fxforge {name}")
        else:
            self._write(f"fxforge: pass {index}/{total} {name}")

    def pass_finished(self, index: int, total: int, stats):
        fired = ", ".join(f"{k}={v}" for k, v in sorted(stats.rules.items())) or "no rules fired"
        self.log("passes", f"[{index}/{total}] {stats.name}: {stats.seconds * 1000:.1f} ms, "
                           f"{stats.nodes_before} -> {stats.nodes_after} nodes, {fired}")
        if self._bar is not None:
            self._bar.update(1)
            if index == total:
                self.close()

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _write(self, line: str):
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)  # keeps the bar below the line
        else:
            print(line, file=sys.stderr, flush=True)


def _make_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # optional: plain lines instead
        return None
    return tqdm(total=total, unit="pass", file=sys.stderr, leave=False, dynamic_ncols=True)

