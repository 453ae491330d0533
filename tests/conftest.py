"""Test-wide settings. Triton decides at import whether kernels are interpreted, so the
variable is set before anything imports a kernel module; FXFORGE_CHECK=1 typechecks the
IR after every pass in every test. cpu_linear's measured choices go to a temporary folder
for the session, never into the user's cache (only that subfolder is redirected: the
trained GPT-2 in $FXFORGE_CACHE takes minutes to train and is meant to be reused)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXFORGE_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _cpu_linear_cache(tmp_path_factory):
    from fxforge.runtime.cpu_linear_cache import FOLDER_VARIABLE

    if os.environ.get(FOLDER_VARIABLE):
        yield
        return
    os.environ[FOLDER_VARIABLE] = str(tmp_path_factory.mktemp("cpu_linear_cache"))
    yield
    del os.environ[FOLDER_VARIABLE]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2); they run in CI too")
