"""Every code block marked `runnable` in docs/ runs, in order, one namespace per page, so
the documentation cannot drift from the code."""
import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
FENCE = re.compile(r"^```python runnable\n(.*?)^```", re.S | re.M)


def runnable_blocks(path):
    return FENCE.findall(open(path).read())


PAGES = sorted(f for f in os.listdir(DOCS) if f.endswith(".md") and runnable_blocks(os.path.join(DOCS, f)))


def test_pages_with_runnable_blocks_exist():
    assert {"index.md", "writing-passes.md", "ir.md", "passes.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_runnable_blocks(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page}"}
    for i, block in enumerate(runnable_blocks(os.path.join(DOCS, page))):
        try:
            exec(compile(block, f"{page} block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page}, runnable block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
