"""cpu_linear's measured choices, kept per machine in a small JSON file, so that every
optimize() on a machine after the first builds the same program without timing anything.

Timing is noisy (other processes, frequency scaling, a cold primitive cache), so two
measurements may disagree on a near tie; the first one on a machine is written down and
reused. A file holds the choices of one *fingerprint*: the CPU model, core and thread
counts, torch's version and the timing method (its candidates and constants); any change
of these is another file, so a new torch or a new method measures again.

    <cache>/cpu_linear/choices-<hash of the fingerprint>.json

where <cache> is $FXFORGE_CACHE or ~/.cache/fxforge (fxforge/cache_dir.py), and
$FXFORGE_CPU_LINEAR_CACHE, if set, replaces the whole folder (the tests point it at a
temporary folder so that they never write into the user's cache). Writes go to a temporary
file that replaces the old one atomically, so concurrent writers never leave a torn file
(the last writer wins; a shape it lost is measured again later). A file that cannot be read
or parsed is ignored with a warning; a folder that cannot be written means no caching.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass

import torch

from ..cache_dir import cache_dir

FORMAT = 1
FOLDER_VARIABLE = "FXFORGE_CPU_LINEAR_CACHE"


class CpuLinearCacheWarning(UserWarning):
    """A cache file was unreadable or malformed and is ignored (it is measured again)."""


@dataclass(frozen=True)
class Decision:
    """The choice for one weight shape, with the medians it was made from (for the record)."""
    kernel: str
    layout: str
    speedup: float  # over F.linear on the row-major weight (a row bucket's choice: over the one-row choice), 1.0 when that is the choice
    median_us: dict[str, float]
    rounds: int  # timing rounds behind it; under MIN_ROUNDS means time ran out (F.linear kept)

    @property
    def choice(self) -> tuple[str, str]:
        return self.kernel, self.layout


def cache_folder() -> str:
    return os.environ.get(FOLDER_VARIABLE) or cache_dir("cpu_linear")


def machine_fingerprint(method: dict) -> dict:
    """What a measured choice depends on besides the shape: the machine, the libraries
    (torch's version pins its MKL and oneDNN) and how it was measured."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "method": method}


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) Processor"), or the best
    that the platform says where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_file(fingerprint: dict) -> str:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_folder(), f"choices-{digest}.json")


def shape_key(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> str:
    return f"{str(dtype).removeprefix('torch.')} {shape[0]}x{shape[1]}"


def rows_key(shape: tuple[int, int], rows: str, dtype: torch.dtype = torch.float32, packed: bool = False) -> str:
    """The key of a shape's choice for a bucket of activation row counts (`rows`, its name
    such as "2-8": cpu_linear.ROW_BUCKETS), made with oneDNN-packed copies among the
    candidates or without."""
    return f"{shape_key(shape, dtype)} rows {rows}{' packed' if packed else ''}"


def read_decisions(path: str, fingerprint: dict, candidates, warn: bool = True) -> dict[str, Decision]:
    """The decisions stored at `path` for this fingerprint; {} when there is no file, and
    {} with a warning when it cannot be read or does not make sense."""
    try:
        with open(path) as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError):  # nothing cached yet, or no folder to cache in
        return {}
    except OSError as e:
        return _ignored(path, e, warn)
    try:
        return _parse(text, fingerprint, {tuple(c) for c in candidates})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return _ignored(path, e, warn)


def write_decisions(path: str, fingerprint: dict, candidates, decisions: dict[str, Decision]) -> str | None:
    """Add `decisions` to the file at `path`, atomically. None when written, else why not."""
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # Re-read just before writing: another process may have added shapes meanwhile.
        merged = {**read_decisions(path, fingerprint, candidates, warn=False), **decisions}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".choices-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(_document(fingerprint, merged), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return None
    except OSError as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return f"{type(e).__name__}: {e}"


def decisions_document(fingerprint: dict, decisions: dict[str, Decision]) -> dict:
    """Decisions and the fingerprint they were made under as JSON (the cache file's format;
    a saved model's meta.json holds its program's: runtime/saving.py)."""
    return _document(fingerprint, decisions)


def decisions_from_document(doc: dict) -> tuple[dict, dict[str, Decision]]:
    """(fingerprint, decisions) of a decisions_document; ValueError (or KeyError,
    TypeError) where it is malformed."""
    return doc["fingerprint"], _parse(json.dumps(doc), doc["fingerprint"], _known_choices())


def _known_choices() -> set:
    from .cpu_linear import PACKED, timing_candidates

    return {tuple(c) for c in timing_candidates() + [PACKED]}


def _document(fingerprint: dict, decisions: dict[str, Decision]) -> dict:
    return {"format": FORMAT, "fingerprint": fingerprint,
            "choices": {key: {"kernel": d.kernel, "layout": d.layout, "speedup": round(d.speedup, 4),
                              "median_us": {c: round(t, 3) for c, t in d.median_us.items()},
                              "rounds": d.rounds}
                        for key, d in sorted(decisions.items())}}


def _parse(text: str, fingerprint: dict, candidates: set) -> dict[str, Decision]:
    doc = json.loads(text)
    if doc.get("format") != FORMAT:
        raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
    # The name is a hash of the fingerprint; comparing the whole guards against a file
    # copied from elsewhere under the same name.
    if doc["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise ValueError("written for another machine, torch or timing method")
    out = {}
    for key, entry in doc["choices"].items():
        choice = (entry["kernel"], entry["layout"])
        if choice not in candidates:
            raise ValueError(f"{key}: unknown kernel and layout {choice}")
        out[key] = Decision(entry["kernel"], entry["layout"], float(entry["speedup"]),
                            {str(c): float(t) for c, t in entry.get("median_us", {}).items()}, int(entry["rounds"]))
    return out


def _ignored(path: str, error: Exception, warn: bool) -> dict:
    if warn:
        warnings.warn(f"fxforge: ignoring the cpu_linear cache file {path} ({type(error).__name__}: {error}); "
                      f"measuring again", CpuLinearCacheWarning, stacklevel=3)
    return {}
