"""Test-wide settings.

Where the Triton kernels run: FXFORGE_TEST_DEVICE=cpu (the default) runs them through
Triton's interpreter on CPU tensors; FXFORGE_TEST_DEVICE=cuda compiles them for the GPU
(`make test-gpu`: the kernel tests and the end-to-end GPU tests). Triton decides at import
whether kernels are interpreted, and one process cannot do both, so the choice is made
here, before anything imports a kernel module. The default stays the interpreter even on
a GPU machine, because the rest of the suite tests the `interpret` backend by name; the
header of every run says which it was.

FXFORGE_CHECK=1 typechecks the IR after every pass in every test. cpu_linear's measured
choices go to a temporary folder for the session, never into the user's cache (only that
subfolder is redirected: the trained GPT-2 in $FXFORGE_CACHE takes minutes to train and
is meant to be reused)."""
import os

TEST_DEVICE = os.environ.get("FXFORGE_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FXFORGE_TEST_DEVICE={TEST_DEVICE!r}: use cpu (Triton's interpreter) or cuda (compiled)")
if TEST_DEVICE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"  # the explicit choice wins over an inherited TRITON_INTERPRET=1
else:
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


@pytest.fixture(scope="session")
def smollm2_env(tmp_path_factory) -> dict:
    """The environment for a subprocess that loads SmolLM2 (an example, a torchrun worker):
    FXFORGE_SMOLLM2_DIR names a converted copy written once per session, which loads in a
    second or two where the GGUF file takes 8-25 s to convert in every process."""
    import zoo
    from fxforge.demo_model import CONVERTED_ENV, save_converted

    model, tok = zoo.smollm2()
    folder = save_converted(str(tmp_path_factory.mktemp("smollm2_converted")), model, tok)
    return {**os.environ, CONVERTED_ENV: folder}


@pytest.fixture(scope="session")
def smollm2_captures():
    """One fxforge.CaptureCache for the SmolLM2 tests: each capture (torch.export, 4-7 s)
    happens once per example-input shape in the session, not once per optimize()."""
    import fxforge

    return fxforge.CaptureCache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2); they run in CI too")
    config.addinivalue_line("markers", "gpu: needs FXFORGE_TEST_DEVICE=cuda and a CUDA GPU (make test-gpu)")
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("FXFORGE_TEST_DEVICE=cuda, but torch sees no CUDA GPU "
                                f"(torch {torch.__version__}); run without it to test the kernels in the interpreter")


def pytest_report_header(config):
    if TEST_DEVICE == "cuda":
        return "fxforge: Triton kernels compiled for the GPU (FXFORGE_TEST_DEVICE=cuda)"
    gpu = " (a CUDA GPU is present: `make test-gpu` runs the kernels on it)" if torch.cuda.is_available() else ""
    return f"fxforge: Triton kernels run in the interpreter on CPU{gpu}"


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cuda" and torch.cuda.is_available():
        return
    why = ("needs a CUDA GPU" if TEST_DEVICE == "cuda"
           else "runs with FXFORGE_TEST_DEVICE=cuda on a GPU (make test-gpu)")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords hold the names of the folders
        # above the test too, so a checkout in a folder named gpu skipped every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(params=["gpu_blocks", "interpreter_blocks"])
def blocks(request, monkeypatch):
    """The decode GEMV kernels' two block choices (codegen/kernels/decode_gemv.py): the GPU's
    narrow column tiles and K chunks (masks on every edge; for the decode MLP several programs
    and groups, so both combine levels) and the interpreter's wide ones."""
    from fxforge.codegen.kernels import decode_gemv

    if request.param == "gpu_blocks":
        monkeypatch.setattr(decode_gemv, "interpreted", lambda: False)
    return request.param
