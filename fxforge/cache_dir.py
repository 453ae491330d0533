"""Where fxforge keeps what it computes once per machine (measured kernel choices, and
the tests' trained models): `$FXFORGE_CACHE` if set, else `~/.cache/fxforge`. Only a
path is computed here; nothing is created or read until a caller needs it."""
from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """The cache folder, or a subfolder of it (e.g. `cache_dir("cpu_linear")`)."""
    root = os.environ.get("FXFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fxforge")
    return os.path.join(root, *parts)
