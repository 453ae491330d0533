"""python -m fxforge inspect | generate, on the tiny models of tests/zoo.py."""
import os
import subprocess
import sys

import pytest
import torch

import fxforge
from fxforge.cli import main

ZOO = os.path.join(os.path.dirname(__file__), "zoo.py")


def test_inspect_prints_the_report_and_the_ir_and_saves(tmp_path, capsys):
    assert main(["inspect", f"{ZOO}:llama", "--kv-cache", "--save", str(tmp_path / "saved")]) == 0
    out = capsys.readouterr().out
    assert "fxforge report for LlamaForCausalLM" in out and "kv_cache" in out
    assert 'signature {outputs=("logits",)' in out  # the IR, whole
    assert fxforge.load(str(tmp_path / "saved")).kv_layout is not None
    # a saved model inspects too, without its factory
    assert main(["inspect", str(tmp_path / "saved"), "--ir-lines", "3"]) == 0
    out = capsys.readouterr().out
    assert "# loaded in" in out and "(first 3 of" in out


def _generated(capsys, *args) -> list[int]:
    assert main(["generate", f"{ZOO}:llama", "--prompt", "1 2 3", "--max-new-tokens", "6", *args]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("output: "))
    return [int(t) for t in line[len("output: "):].strip("'").split()]


def test_generate_with_and_without_the_kv_cache_agree(capsys):
    torch.manual_seed(0)
    cached = _generated(capsys)
    torch.manual_seed(0)  # the factory makes the same random model again
    recomputed = _generated(capsys, "--no-kv-cache")
    assert len(cached) == 6 and cached == recomputed
    torch.manual_seed(0)
    assert len(_generated(capsys, "--quantize", "int8")) == 6


def test_python_dash_m_runs_and_bad_models_are_clear_errors():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run([sys.executable, "-m", "fxforge", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "inspect" in ok.stdout and "generate" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fxforge", "inspect", "no_such_thing"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "neither a saved model's directory nor module:factory" in bad.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small Llama saved with and without a KV cache (float32)."""
    import zoo

    folder = tmp_path_factory.mktemp("saved")
    model, vocab = zoo.llama("sdpa")
    ids = torch.randint(0, vocab, (2, 6))
    fxforge.optimize(model, (ids,), kv_cache=True).save(str(folder / "kv"))
    fxforge.optimize(model, (ids,)).save(str(folder / "plain"))
    return folder


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_generate_banner_says_what_runs_for_a_saved_model(saved, capsys):
    code, out, _ = _run(capsys, "generate", str(saved / "kv"), "--prompt", "1 5 7", "--max-new-tokens", "2",
                        "--quantize", "int8")
    banner = next(line for line in out.splitlines() if "loaded in" in line)
    assert code == 0 and "--quantize does not apply" in out and banner.endswith("(KV cache)")  # was "(KV cache, int8)"
    code, out, _ = _run(capsys, "generate", str(saved / "kv"), "--prompt", "1 5 7", "--max-new-tokens", "2",
                        "--no-kv-cache")
    assert code == 0 and "(KV cache not used: every step recomputes the sequence)" in out
    assert "do not apply" not in out and "does not apply" not in out
    # saved without a cache: a clear error, not "(KV cache)" and a traceback
    code, out, err = _run(capsys, "generate", str(saved / "plain"), "--prompt", "1 5 7", "--max-new-tokens", "2")
    assert code == 2 and "saved without a KV cache" in err and "--no-kv-cache" in err and "(KV cache)" not in out
    code, out, _ = _run(capsys, "generate", str(saved / "plain"), "--prompt", "1 5 7", "--max-new-tokens", "2",
                        "--no-kv-cache")
    assert code == 0 and "(no KV cache)" in out


def test_inspect_of_a_saved_model_says_kv_cache_does_not_apply(saved, capsys):
    code, out, _ = _run(capsys, "inspect", str(saved / "plain"), "--kv-cache", "--ir-lines", "1")
    assert code == 0 and "--kv-cache does not apply" in out
    code, out, _ = _run(capsys, "inspect", str(saved / "plain"), "--ir-lines", "1")
    assert code == 0 and "apply" not in out  # nothing was given that a saved model ignores


@pytest.mark.parametrize("argv, says", [
    (["generate", "{kv}", "--prompt", "1 5 999", "--max-new-tokens", "2"],
     "prompt token id 999 is outside this model's vocabulary (0 to 127)"),
    (["inspect", "no_such_file.py:llama"], "no such file: no_such_file.py"),
    (["inspect", "no_such_module_xyz:llama"], "no module named 'no_such_module_xyz'"),
    (["inspect", "{kv}", "--backend", "bogus"], "unknown backend 'bogus'; choose one of: auto, torch"),
])
def test_mistakes_are_one_line_errors_with_exit_status_2(saved, capsys, argv, says):
    code, _, err = _run(capsys, *[a.format(kv=saved / "kv") for a in argv])
    assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, says", [
    (["inspect", "x:y", "--ir-lines", "-5"], "--ir-lines: must be >= 0, got -5"),
    (["generate", "x:y", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0 (max_new_tokens=0"),
])
def test_counts_are_checked_as_generate_checks_them(capsys, argv, says):
    with pytest.raises(SystemExit) as info:  # argparse's usage error: exit status 2
        main(argv)
    assert info.value.code == 2 and says in capsys.readouterr().err


def test_a_factory_that_needs_arguments_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "factories.py").write_text("def needs_arg(x):\n    raise AssertionError('not called')\n")
    code, _, err = _run(capsys, "inspect", f"{tmp_path / 'factories.py'}:needs_arg")
    assert code == 2 and "needs arguments (missing a required argument: 'x')" in err and "Traceback" not in err


def test_generate_takes_as_many_new_tokens_as_the_api_does(capsys):
    """The last new token is never fed: a 3-token prompt on 128 positions takes 126 new
    tokens, as fast.generate() and transformers do (the command line refused 126)."""
    import zoo

    limit = zoo.gpt2()[0].config.n_positions
    new = limit - 3 + 1
    code, out, _ = _run(capsys, "generate", f"{ZOO}:gpt2", "--prompt", "1 5 7", "--max-new-tokens", str(new))
    assert code == 0 and f"# {new} tokens" in out
    code, _, err = _run(capsys, "generate", f"{ZOO}:gpt2", "--prompt", "1 5 7", "--max-new-tokens", str(new + 1))
    assert code == 2 and f"ask for at most {new} new tokens" in err
