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
is meant to be reused).

`make test` runs the files on parallel workers (pytest-xdist, `--dist loadfile`: a file's
tests share one process, so its module fixtures are built once). Each worker gets an equal
share of the CPU's threads for torch (and for the processes its tests start), so that two
workers on two cores do not each start two threads; and the controller prints a line per
test file as its last test ends (xdist alone prints only dots)."""
import fcntl
import os
import time
from collections import Counter, defaultdict

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

if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    # and the same for the processes a test starts (an example, a reload, torchrun ranks): a
    # float32 product's rounding can depend on how many threads split it, and some tests
    # compare a subprocess's numbers with their own bit for bit
    os.environ["OMP_NUM_THREADS"] = str(_threads)


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

    # One copy for all the workers of a parallel run: their base folders share a parent,
    # and the first to take the lock writes the copy while the others wait for it.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder, done = shared / "smollm2_converted", shared / "smollm2_converted.done"
    with open(shared / "smollm2_converted.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            model, tok = zoo.smollm2()
            save_converted(str(folder), model, tok)
            done.touch()
    return {**os.environ, CONVERTED_ENV: str(folder)}


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
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        config.pluginmanager.register(FileProgress(config), "fxforge-file-progress")
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


class FileProgress:
    """On the controller of a parallel run: a line per test file when its last test ends,
    with its outcomes and the seconds its tests took on their worker."""

    def __init__(self, config):
        self.config = config
        self.left: Counter = Counter()
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.seconds: Counter = Counter()
        self.started = time.perf_counter()

    def pytest_xdist_node_collection_finished(self, node, ids):
        if not self.left:  # every worker collects the same ids
            self.left.update(nodeid.split("::")[0] for nodeid in ids)

    def pytest_runtest_logreport(self, report):
        path = report.nodeid.split("::")[0]
        self.seconds[path] += report.duration
        if report.failed or (report.when == "call" and report.passed) or (report.skipped and report.when != "teardown"):
            self.outcomes[path][("failed" if report.when == "call" else "error") if report.failed
                                else report.outcome] += 1
        if report.when == "teardown":
            self.left[path] -= 1
            if self.left[path] == 0:
                counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes[path].items()))
                worker = getattr(report, "node", None)  # (set by xdist on the controller's copy of a report)
                reporter = self.config.pluginmanager.get_plugin("terminalreporter")
                reporter.write(f"\n{path}: {counts} ({self.seconds[path]:.1f} s on "
                               f"{worker.gateway.id if worker is not None else 'a worker'}, "
                               f"{time.perf_counter() - self.started:.0f} s into the run)\n")
