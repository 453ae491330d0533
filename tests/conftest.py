"""Test-wide settings. Triton decides at import whether kernels are interpreted, so the
variable is set before anything imports a kernel module; FXFORGE_CHECK=1 typechecks the
IR after every pass in every test."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXFORGE_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2); they run in CI too")
