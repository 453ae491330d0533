"""Edges of the IR's text form and of what is built from it: names the printer must not
reuse, truncated or hand-edited text, passes that break the graph's contract, dumps into a
used folder, the CLI's argument errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.ir.parser import ParseError, parse, structurally_equal
from fxforge.ir.typecheck import IRCheckError
from fxforge.runtime.build import model_from_ir

import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ArgNamedP0(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 50)

    def forward(self, p0):
        return self.lin(self.emb(p0))


def _ids(vocab=50, shape=(2, 6)):
    torch.manual_seed(0)
    return torch.randint(0, vocab, shape)


@pytest.fixture(scope="module")
def tiny_llama():
    model, vocab = zoo.llama("sdpa", n_layer=1)
    ids = _ids(vocab, (2, 7))
    return model, ids, fxforge.optimize(model, (ids,), passes=["cleanup", "fuse_attention"])


def test_an_input_named_like_a_parameter_keeps_names_unique(tmp_path):
    torch.manual_seed(0)
    model, ids = _ArgNamedP0().eval(), _ids()
    fast = fxforge.optimize(model, (ids,))
    head = fast.ir.splitlines()[0]
    assert head.count("%p0:") == 1
    assert structurally_equal(parse(fast.ir), fast.graph)
    fast.save(str(tmp_path / "m"))
    assert torch.equal(fxforge.load(str(tmp_path / "m"))(ids), fast(ids))


def test_truncated_text_is_refused_as_truncated(tiny_llama):
    _, _, fast = tiny_llama
    lines = fast.ir.splitlines()
    for cut in (len(lines) // 2, len(lines) - 1):
        with pytest.raises(ParseError, match="truncated"):
            parse("\n".join(lines[:cut]) + "\n")


def test_text_after_the_graph_is_refused(tiny_llama):
    _, _, fast = tiny_llama
    with pytest.raises(ParseError, match="after the graph"):
        parse(fast.ir + "\n  %999: f32[3] = bogus(\n")
    with pytest.raises(ParseError, match="closing"):
        parse(fast.ir.replace("  return", "  %999: f32[] = const() {value=1.0, dtype=f32}\n  return", 1)
              .replace("\n}", "\n  %998: f32[] = const() {value=1.0, dtype=f32}\n}"))


def test_an_unclosed_argument_list_is_named_as_such(tiny_llama):
    """It read as "%p is used before it is defined"."""
    _, _, fast = tiny_llama
    line = next(l for l in fast.ir.splitlines() if "= linear(" in l)
    with pytest.raises(ParseError, match=r"unbalanced parentheses: linear\( is not closed"):
        parse(fast.ir.replace(line, line.rstrip(")")))


def test_a_duplicated_attribute_key_is_refused(tiny_llama):
    _, _, fast = tiny_llama
    with pytest.raises(ParseError, match="'causal' is given twice"):
        parse(fast.ir.replace("causal=true", "causal=true, causal=false", 1))


def test_guard_true_is_dropped_and_guard_false_refused(tiny_llama):
    _, _, fast = tiny_llama
    head, *rest = fast.ir.splitlines()
    g = parse("\n".join([head, "  guard True"] + rest))
    assert structurally_equal(g, parse(fast.ir))
    with pytest.raises(ParseError, match="holds for no sizes"):
        parse("\n".join([head, "  guard False"] + rest))


def test_comment_lines_anywhere_and_hashes_inside_names():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.register_buffer("scale  #1", torch.randn(16))

        def forward(self, ids):
            return self.emb(ids) * getattr(self, "scale  #1")

    torch.manual_seed(0)
    model, ids = M().eval(), _ids()
    fast = fxforge.optimize(model, (ids,))
    assert torch.equal(fxforge.load_ir(fast.ir, fast.graph.params)(ids), fast(ids))
    head, *rest = fast.ir.splitlines()
    text = "\n".join(["# written by hand", head, "  # a note", *rest[:-1], "# the end", "}  # closed"])
    assert structurally_equal(parse(text), parse(fast.ir))


def _registry_with(name, fn, **where):
    reg = fxforge.passes.default_registry()
    fxforge.register_pass(name, registry=reg, **where)(fn)
    return reg


def test_a_pass_that_drops_the_outputs_is_named(tiny_llama):
    model, ids, _ = tiny_llama
    reg = _registry_with("drop_outputs", lambda g: g.with_nodes(g.nodes, outputs=[]), after="cleanup")
    with pytest.raises(IRCheckError, match="after pass 'drop_outputs'.*returns 0"):
        fxforge.optimize(model, (ids,), registry=reg, passes=["cleanup", "drop_outputs"])


def test_a_save_whose_return_lost_its_values_is_refused_at_load(tiny_llama, tmp_path):
    _, ids, fast = tiny_llama
    d = str(tmp_path / "m")
    fast.save(d)
    text = open(os.path.join(d, "model.ir")).read()
    head, _, tail = text.rpartition("  return (")
    open(os.path.join(d, "model.ir"), "w").write(head + "  return ()\n}\n")
    with pytest.raises(ValueError, match="returns nothing.*truncated"):
        fxforge.load(d)
    # load_ir of an extra output against a model's call spec: refused where it is built
    with pytest.raises(ValueError, match="returns 2 value"):
        model_from_ir(text.replace("return (", "return (%1, "), fast.graph.params, spec=fast.spec)


def test_a_dump_replaces_an_earlier_dump_and_keeps_other_files(tiny_llama, tmp_path):
    _, _, fast = tiny_llama
    d = tmp_path / "dump"
    d.mkdir()
    stale = ["42_quantize.ir", "kernel_old.py", "report.txt", "program.py"]
    for name in stale + ["notes.txt", "mine.ir", "kernel.txt"]:
        (d / name).write_text("older run")
    fast.dump(str(d))
    names = set(os.listdir(d))
    assert not {"42_quantize.ir", "kernel_old.py"} & names
    assert {"notes.txt", "mine.ir", "kernel.txt"} <= names
    assert (d / "report.txt").read_text() != "older run"
    last = sorted(n for n in names if n[:2].isdigit() and n.endswith(".ir"))[-1]
    assert (d / last).read_text() == fast.ir


def test_a_pass_that_loses_the_weights_is_named(tiny_llama):
    model, ids, _ = tiny_llama

    def lose_weights(g):
        h = g.with_nodes(g.nodes)
        h.params = {}
        return h

    reg = _registry_with("lose_weights", lose_weights, after="cleanup")
    with pytest.raises(IRCheckError, match="after pass 'lose_weights'.*no tensor in graph.params"):
        fxforge.optimize(model, (ids,), registry=reg, passes=["cleanup", "lose_weights"])


@pytest.mark.parametrize("passes, options, match", [
    (["cleanup", "shard"], {}, "lists 'shard', which needs the option tensor_parallel="),
    (["cleanup", "quantize"], {}, "lists 'quantize', which needs the option quantize="),
    (["cleanup", "fuse_attention", "kv_cache", "gqa"], {"kv_cache": True, "gqa": 1},
     "runs 'gqa' after 'kv_cache', but 'gqa' must run before it"),
])
def test_passes_listed_without_their_option_or_out_of_order_are_refused(passes, options, match):
    reg = fxforge.passes.default_registry()
    with pytest.raises(ValueError, match=match):
        reg.pipeline(reg.parse_options(options), passes)
    reg.pipeline(reg.parse_options({"kv_cache": True}), ["cleanup", "fuse_attention", "kv_cache"])  # runs on


@pytest.mark.parametrize("name, option, match", [
    ("mine/v2", None, "pass name 'mine/v2'"),
    ("..", None, "not '..'"),
    ("p_backend", "backend", "optimize\\(\\)'s own keywords"),
    ("my_quant", "quantize", "option of fxforge's own pass 'quantize'"),
])
def test_register_pass_refuses_bad_names_and_options(name, option, match):
    reg = fxforge.passes.default_registry()
    with pytest.raises(ValueError, match=match):
        fxforge.register_pass(name, option=option, registry=reg)(lambda g: g)
    assert name not in reg.passes
    fxforge.register_pass("mine-v2.1", option="my_option", registry=reg)(lambda g: g)


def test_reserved_options_cover_optimizes_keywords():
    import inspect

    from fxforge.api import optimize_captured
    from fxforge.passes.manager import RESERVED_OPTIONS

    for fn in (fxforge.optimize, optimize_captured):
        params = inspect.signature(fn).parameters.values()
        assert {p.name for p in params if p.kind != p.VAR_KEYWORD} <= RESERVED_OPTIONS


# -- fast.save's meta.json, edited ------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_llama(tiny_llama, tmp_path_factory):
    _, ids, fast = tiny_llama
    d = str(tmp_path_factory.mktemp("saved") / "m")
    fast.save(d)
    return d


@pytest.mark.parametrize("key, value, says", [
    ("format_version", "1", "'format_version'.*the JSON string \"1\", expected a number"),
    ("op_modules", ["a"], "'op_modules'.*JSON array"),
    ("op_modules", {"x::y": "no_such_module"}, "'x::y' is not an operator name"),
    ("op_modules", {"x.y": "no such"}, "is not a Python module name"),
    ("generation_defaults", {"eos_token_id": "two"}, "eos_token_id=\"two\" is not a token id"),
    ("generation_defaults", {"do_sample": 1}, "do_sample=1 is not true or false"),
])
def test_edited_meta_fields_are_clear_errors(saved_llama, tmp_path, key, value, says):
    import shutil

    from fxforge.runtime.saving import IncompatibleSaveError

    d = str(tmp_path / "m")
    shutil.copytree(saved_llama, d)
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta[key] = value
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    with pytest.raises(IncompatibleSaveError, match=says):
        fxforge.load(d)


# -- the CLI: argument mistakes are one line on stderr, exit status 2 ---------------------------
FACTORIES = '''
import sys
sys.path.insert(0, {tests!r})
import zoo
def three():
    m, v = zoo.llama("sdpa", n_layer=1)
    return m, v, 1
def notmodel():
    return 42
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "factories.py"
    path.write_text(FACTORIES.format(tests=os.path.dirname(os.path.abspath(__file__))))
    return str(path)


def _cli_error(capsys, argv) -> str:
    from fxforge.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_cli_refuses_factories_that_return_no_model(factories, capsys):
    assert "returned a tuple of 3" in _cli_error(capsys, ["inspect", f"{factories}:three"])
    assert "returned int 42, not a torch.nn.Module" in _cli_error(capsys, ["inspect", f"{factories}:notmodel"])


@pytest.mark.parametrize("prompt", ["", "   "])
def test_cli_refuses_an_empty_prompt(factories, capsys, prompt):
    assert "is empty" in _cli_error(capsys, ["generate", f"{factories}:notmodel", "--prompt", prompt])


def test_cli_refuses_ids_past_int64_and_tokens_past_the_positions(saved_llama, capsys):
    err = _cli_error(capsys, ["generate", saved_llama, "--no-kv-cache", "--prompt", "5 99999999999999999999"])
    assert "99999999999999999999" in err and "int64" in err
    err = _cli_error(capsys, ["generate", saved_llama, "--no-kv-cache", "--prompt", "5", "--max-new-tokens", "100000"])
    assert "positions to the model (all but the last new token), more than this model's" in err


def test_cli_inspect_of_a_damaged_save_is_an_argument_error(saved_llama, tmp_path, capsys):
    import shutil

    d = str(tmp_path / "m")
    shutil.copytree(saved_llama, d)
    text = open(os.path.join(d, "model.ir")).read()
    open(os.path.join(d, "model.ir"), "w").write(text[: len(text) // 2])
    assert "cannot load the saved model" in _cli_error(capsys, ["inspect", d])
    meta = json.load(open(os.path.join(d, "meta.json")))
    json.dump({**meta, "format_version": 99}, open(os.path.join(d, "meta.json"), "w"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path])}
    run = subprocess.run([sys.executable, "-m", "fxforge", "inspect", d], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "save format 99" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_a_loaded_models_report_says_it_was_loaded(saved_llama, tiny_llama):
    _, _, fast = tiny_llama
    assert "loaded from IR text" not in fast.report()
    report = fxforge.load(saved_llama).report()
    assert "loaded from IR text" in report and "0.0ms" not in report.splitlines()[2]


@pytest.mark.parametrize("fn", [
    lambda x: ((x > 0) & (x.shape[1] != 7)).float(),  # Ne(T, 7) among an op's arguments
    lambda x: x * ((x.shape[1] > 2) and (x.shape[0] < 5)),
    # a condition as full's value, and one on a float size expression: the IR ran but its
    # text failed the typecheck ("attribute 'value' of full must be a number, got T >= 9")
    lambda x: x * (x.shape[1] / 2 > 3) + torch.full((1,), x.shape[1] >= 7),
])
def test_conditions_on_sizes_among_the_arguments_parse_back(fn):
    # the model ran right, but its IR (and so a save) did not parse back: "Ne(T, 7) is a Unequality"
    from helpers import FunctionModule

    model = FunctionModule(fn)
    fast = fxforge.optimize(model, (torch.randn(2, 8),))
    again = fxforge.load_ir(fast.ir, fast.graph.params)
    for x in (torch.randn(3, 7), torch.randn(2, 5)):
        assert torch.equal(again(x), model(x))
