"""python -m fxforge's errors: a mistake in the arguments (or MODEL) is one line on stderr and
exit status 2, found before optimizing; fxforge refusing the model is one line and exit
status 3; an error inside fxforge is one line and exit status 1; --traceback adds the
traceback."""
import os
import subprocess
import sys

import pytest

import fxforge
from fxforge.cli import main

FACTORIES = '''
import os
import torch

MARK = os.path.join(os.path.dirname(__file__), "factory_called")
TESTS = {tests!r}


def mlp():
    open(MARK, "w").close()  # the test asks whether the factory ran
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval(), (torch.randn(2, 3, 8),)


def llama():
    import sys
    sys.path.insert(0, TESTS)
    import zoo

    torch.manual_seed(0)
    return zoo.llama("sdpa", n_layer=1)


def broken():
    raise RuntimeError("factory broke: no weights at /nowhere")
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "facts.py"
    path.write_text(FACTORIES.replace("{tests!r}", repr(os.path.dirname(os.path.abspath(__file__)))))
    return str(path)


def _one_error_line(capsys, command="inspect") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f"python -m fxforge {command}: error: "), err
    assert not any(ln.startswith("python -m fxforge") for ln in lines[:-1]), err
    return lines[-1]


def _factory_ran(factories) -> bool:
    return os.path.exists(os.path.join(os.path.dirname(factories), "factory_called"))


def test_dump_into_a_file_is_refused_before_optimizing(factories, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["inspect", f"{factories}:mlp", "--dump", str(afile)]) == 2
    line = _one_error_line(capsys)
    assert "--dump" in line and "is a file" in line
    assert not _factory_ran(factories)
    assert main(["inspect", f"{factories}:mlp", "--save", str(afile / "sub")]) == 2
    line = _one_error_line(capsys)
    assert "--save" in line and "cannot write a folder there" in line
    assert not _factory_ran(factories)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_save_where_no_folder_can_be_made_is_refused(factories, capsys):
    assert main(["inspect", f"{factories}:mlp", "--save", "/proc/fxforge_nope"]) == 2
    assert "--save /proc/fxforge_nope: cannot write a folder there" in _one_error_line(capsys)
    assert not _factory_ran(factories)


def test_probing_the_output_folder_leaves_nothing_behind(factories, tmp_path, capsys):
    target = tmp_path / "new" / "deeper" / "save"
    assert main(["inspect", f"{factories}:broken", "--save", str(target), "--dump", str(tmp_path / "d")]) == 2
    _one_error_line(capsys)
    assert not (tmp_path / "new").exists() and not (tmp_path / "d").exists()
    # and a good run writes them
    assert main(["inspect", f"{factories}:mlp", "--save", str(target), "--ir-lines", "0"]) == 0
    assert fxforge.load(str(target)) is not None


def test_a_factory_that_raises_is_one_line_naming_it(factories, capsys):
    assert main(["inspect", f"{factories}:broken"]) == 2
    line = _one_error_line(capsys)
    assert f"error in the factory {factories}:broken" in line and "factory broke: no weights at /nowhere" in line
    assert main(["inspect", f"{factories}:broken", "--traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("factory broke' in err
    assert err.strip().splitlines()[-1].startswith("python -m fxforge inspect: error: error in the factory")


def test_a_module_that_fails_to_import_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_package_fxforge_test\n")
    assert main(["inspect", f"{bad}:f"]) == 2
    line = _one_error_line(capsys)
    assert f"error in the module {bad}" in line and "no_such_package_fxforge_test" in line
    bad.write_text("def f(:\n")
    assert main(["generate", f"{bad}:f", "--prompt", "1"]) == 2
    assert "SyntaxError" in _one_error_line(capsys, "generate")


def test_kv_cache_on_a_model_without_attention_is_a_refusal(factories, capsys):
    assert main(["inspect", f"{factories}:mlp", "--kv-cache"]) == 3
    line = _one_error_line(capsys)
    assert "KVCacheError" in line and "no attention" in line and "leave out --kv-cache" in line
    assert main(["generate", f"{factories}:mlp", "--prompt", "1 2"]) == 3
    line = _one_error_line(capsys, "generate")
    assert "no attention" in line and "add --no-kv-cache" in line
    # without the cache, the model still is no language model: said so, not as a dtype error
    assert main(["generate", f"{factories}:mlp", "--prompt", "1 2", "--no-kv-cache"]) == 3
    assert "generate is for language models" in _one_error_line(capsys, "generate")


def test_kv_cache_refusal_with_traceback(factories, capsys):
    assert main(["inspect", f"{factories}:mlp", "--kv-cache", "--traceback"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "KVCacheError" in err


def test_an_error_inside_fxforge_is_one_line_exit_1(factories, capsys, monkeypatch):
    from fxforge.passes.manager import PassError

    def broken_optimize(*args, **kwargs):
        raise PassError("pass 'cleanup' raised KeyError: 'x'", "cleanup")

    monkeypatch.setattr(fxforge, "optimize", broken_optimize)
    assert main(["inspect", f"{factories}:mlp"]) == 1
    line = _one_error_line(capsys)
    assert "PassError: pass 'cleanup' raised KeyError" in line and "please report it" in line


def test_an_error_from_elsewhere_keeps_its_traceback(factories, monkeypatch):
    def broken_optimize(*args, **kwargs):
        raise ZeroDivisionError("not fxforge's")

    monkeypatch.setattr(fxforge, "optimize", broken_optimize)
    with pytest.raises(ZeroDivisionError):
        main(["inspect", f"{factories}:mlp"])


def test_backend_interpret_sets_triton_interpret_itself(factories, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    # a llama: capturing its attention imports triton (compiled, were TRITON_INTERPRET not set first)
    done = subprocess.run([sys.executable, "-m", "fxforge", "inspect", f"{factories}:llama", "--backend", "interpret",
                           "--ir-lines", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_backend_interpret_after_triton_was_imported_is_one_line(factories, capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" in sys.modules
    assert main(["inspect", f"{factories}:mlp", "--backend", "interpret"]) == 2
    assert "TRITON_INTERPRET=1 python -m fxforge" in _one_error_line(capsys)
    assert "TRITON_INTERPRET" not in os.environ
