"""A fixed sample of the coverage sweep (benchmarks/coverage.py), one architecture per
family: each is built tiny from its config, captured, optimized and compared with eager
(batch 1 and 3, two lengths), its attention fused, and where the sweep says so, its
kv_cache generate equals transformers' greedy generate (batch 1 and a left-padded batch).
The whole sweep is `python benchmarks/coverage.py` (docs/coverage.md)."""
import importlib.util
import os

import pytest

# loaded by path under its own name: `coverage` is also the name of coverage.py (pytest-cov)
_spec = importlib.util.spec_from_file_location(
    "fxforge_coverage_sweep", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "coverage.py"))
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

pytestmark = pytest.mark.slow

# model type -> (attention implementation, does kv_cache generate equal transformers?)
SAMPLE = {
    "llama": ("sdpa", True),
    "gpt2": ("eager", True),
    "gpt_neox": ("sdpa", True),
    "opt": ("eager", True),  # positions: a cumsum over a ones mask built from (B, T), recognised per row
    "phi": ("sdpa", True),
    "mixtral": ("sdpa", True),  # mixture of experts: the router scatters in place and counts B*T tokens
    "granitemoe": ("sdpa", True),  # forward takes use_cache only through **kwargs: capture turns it off
}


@pytest.mark.parametrize("arch", SAMPLE)
def test_architecture(arch):
    attn, generates = SAMPLE[arch]
    row = coverage.run_arch(arch, attn, generate=generates)
    assert row["status"] == "run", row["status"]
    assert row["captured"], row["reasons"]
    assert row["optimize"], row["reasons"]
    assert not row.get("wrong"), row["reasons"]
    assert row["equal"], row["reasons"]
    assert row["attention"], row["reasons"]
    if generates:
        assert row["generate"], row["reasons"]
