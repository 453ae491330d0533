"""Progress and FXFORGE_LOG: optimize() says what it does when asked, and nothing otherwise."""
import sys

import pytest
import torch

import fxforge
from fxforge.log import Reporter, log_topics

import zoo


def _optimize(**kwargs):
    model, vocab = zoo.llama("sdpa", n_layer=1)
    return fxforge.optimize(model, (torch.randint(0, vocab, (2, 5)),), cpu_linear=False, **kwargs)


def test_fxforge_log_passes_prints_each_pass(capsys, monkeypatch):
    monkeypatch.setenv("FXFORGE_LOG", "passes")
    fast = _optimize(verbose=False)
    err = capsys.readouterr().err
    for i, stats in enumerate(fast.stats, start=1):
        assert f"[fxforge passes] [{i}/{len(fast.stats)}] {stats.name} ..." in err
        assert f"[fxforge passes] [{i}/{len(fast.stats)}] {stats.name}: " in err
    assert "fuse_attention" in err and "nodes" in err


def test_verbose_false_is_silent(capsys, monkeypatch):
    monkeypatch.delenv("FXFORGE_LOG", raising=False)
    _optimize(verbose=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_default_is_silent_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("FXFORGE_LOG", raising=False)
    _optimize()  # pytest's captured stderr is no terminal
    assert capsys.readouterr().err == ""


def test_verbose_true_shows_progress_without_tqdm(capsys, monkeypatch):
    monkeypatch.delenv("FXFORGE_LOG", raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm is optional: plain lines instead
    fast = _optimize(verbose=True)
    err = capsys.readouterr().err
    assert "fxforge: capturing LlamaForCausalLM" in err
    assert f"fxforge: pass {len(fast.stats)}/{len(fast.stats)} {fast.stats[-1].name}" in err


def test_long_steps_inside_passes_report_progress(capsys, monkeypatch):
    """Calibration (gqa) and weight packing (quantize) say what they do, when progress is on."""
    monkeypatch.delenv("FXFORGE_LOG", raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    model, vocab = zoo.llama("sdpa", n_layer=1, kv_heads=4)
    ids = torch.randint(0, vocab, (2, 5))
    gqa = fxforge.GQAConfig(2, "aligned", calibration=torch.randint(0, vocab, (1, 16)))
    fxforge.optimize(model, (ids,), cpu_linear=False, verbose=True, gqa=gqa, quantize="int8")
    err = capsys.readouterr().err
    assert "fxforge: gqa: calibrating 1 attention layers on inputs of shape (1, 16)" in err
    assert "fxforge: quantize: packing linear weights as int8" in err
    fxforge.optimize(model, (ids,), cpu_linear=False, verbose=False, gqa=gqa, quantize="int8")
    assert capsys.readouterr().err == ""


def test_verbose_true_draws_a_tqdm_bar(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.delenv("FXFORGE_LOG", raising=False)
    _optimize(verbose=True)
    assert "fxforge cleanup" in capsys.readouterr().err  # the bar names the pass it runs


def test_log_topics_are_checked():
    assert log_topics("passes, capture") == {"passes", "capture"}
    assert log_topics("all") == {"capture", "passes", "dynamo"}
    assert log_topics("") == frozenset()
    with pytest.raises(ValueError, match="unknown topic"):
        log_topics("pases")


def test_a_bad_fxforge_log_fails_before_capture(monkeypatch):
    monkeypatch.setenv("FXFORGE_LOG", "pases")
    with pytest.raises(ValueError, match="FXFORGE_LOG"):
        _optimize()


def test_reporter_reads_the_environment_when_made(monkeypatch):
    monkeypatch.setenv("FXFORGE_LOG", "capture")
    assert Reporter(verbose=False).enabled("capture")
    monkeypatch.setenv("FXFORGE_LOG", "")
    assert not Reporter(verbose=False).enabled("capture")
