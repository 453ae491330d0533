"""Edges of fast.save / fxforge.load: custom operators a new process cannot import (the
saving script's own, torch.library.Library's), dtypes beyond the common ones, and save
directories that are not what save() writes. Each gives a clear error (or warning) that
names what is wrong, never a raw AttributeError / FileExistsError / TypeError."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fxforge
from fxforge.cli import main
from fxforge.ir.custom_ops import CustomOpMissing
from fxforge.ir.parser import parse_type
from fxforge.ir.types import DTYPE_NAMES, TensorType, dtype_name
from fxforge.runtime.saving import IR_FILE, META_FILE, WEIGHTS_FILE, IncompatibleSaveError


# -- custom operators whose module a new process cannot import ------------------------------
def _script_op(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_script_op.__module__ = "__main__"  # as a custom op defined in the user's script is
torch.library.custom_op("fxforge_edges::twice", mutates_args=())(_script_op).register_fake(
    lambda x: torch.empty_like(x))

_LIB = torch.library.Library("fxforge_edges_lib", "DEF")  # the older API: no Python function to trace
_LIB.define("thrice(Tensor x) -> Tensor")
_LIB.impl("thrice", lambda x: x * 3, "CPU")
_LIB.impl("thrice", lambda x: torch.empty_like(x), "Meta")


class _Calls(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.op = op

    def forward(self, x):
        return self.op(self.lin(x))


def _saved_with(op, tmp_path, name="saved"):
    torch.manual_seed(0)
    model, x = _Calls(op).eval(), torch.randn(2, 8)
    fast = fxforge.optimize(model, (x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.save(str(tmp_path / name))
    return tmp_path / name, [str(w.message) for w in caught], fast, x


def _unregister(saved, old: str, new: str):
    """The save as a new process sees it: its op renamed to one nobody registered."""
    text = (saved / IR_FILE).read_text()
    assert old in text
    (saved / IR_FILE).write_text(text.replace(old, new))
    meta = json.loads((saved / META_FILE).read_text())
    meta["op_modules"] = {k.replace(old, new): v for k, v in meta["op_modules"].items()}
    (saved / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("op, target, recorded, why", [
    (lambda x: torch.ops.fxforge_edges.twice(x), "fxforge_edges.twice", "__main__", "module __main__"),
    (lambda x: torch.ops.fxforge_edges_lib.thrice(x), "fxforge_edges_lib.thrice", None,
     "cannot trace to a module"),
], ids=["script_custom_op", "library_api"])
def test_an_op_a_new_process_cannot_import_warns_at_save_and_fails_clearly_at_load(tmp_path, op, target, recorded,
                                                                                   why):
    saved, messages, fast, x = _saved_with(op, tmp_path)
    assert json.loads((saved / META_FILE).read_text())["op_modules"] == {f"{target}.default": recorded}
    warned = [m for m in messages if f"'{target}.default'" in m]
    assert len(warned) == 1 and why in warned[0] and "fxforge.load() in a new process fails" in warned[0], messages
    # in this process the op is registered: the save loads and runs as saved
    assert torch.equal(fxforge.load(str(saved))(x), fast(x))
    # a new process does not have it: load says so, naming the op and where it came from,
    # rather than loading and failing at the first call with an AttributeError
    gone = target.replace("fxforge_edges", "fxforge_edges_gone")
    _unregister(saved, target, gone)
    with pytest.raises(CustomOpMissing, match=f"'{gone}.default', which is not registered in this process: .*"
                                              f"{why}.*before fxforge.load"):
        fxforge.load(str(saved))


def test_a_script_op_fails_at_load_in_a_new_process(tmp_path):
    # end to end, as a user meets it: a new process (whose own __main__ is not the saving
    # script) never registered the op
    saved, _, _, _ = _saved_with(lambda x: torch.ops.fxforge_edges.twice(x), tmp_path)
    loader = f"""
import fxforge
try:
    fxforge.load({str(saved)!r})
except fxforge.ir.custom_ops.CustomOpMissing as e:
    print("refused:", e)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: the program calls the operator 'fxforge_edges.twice.default'" in result.stdout
    assert "module __main__" in result.stdout and "'fxforge_edges::twice'" in result.stdout


def test_an_unregistered_op_fails_when_the_program_is_built_not_when_called(tmp_path):
    # load_ir has no op_modules: the program itself checks every op it calls
    torch.manual_seed(0)
    fast = fxforge.optimize(_Calls(lambda x: torch.ops.fxforge_edges.twice(x)).eval(), (torch.randn(2, 8),))
    text = fast.ir.replace("fxforge_edges.twice", "fxforge_edges_nowhere.twice")
    with pytest.raises(CustomOpMissing, match="'fxforge_edges_nowhere.twice.default', which is not registered "
                                              "in this process: import the library that defines the "
                                              "'fxforge_edges_nowhere' operators"):
        fxforge.load_ir(text, fast.graph.params)


def test_cli_inspect_of_a_save_whose_op_module_is_gone_is_a_one_line_error(tmp_path, capsys):
    saved, _, _, _ = _saved_with(lambda x: torch.ops.fxforge_edges.twice(x), tmp_path)
    _unregister(saved, "fxforge_edges.twice", "fxforge_edges_cli.twice")
    meta = json.loads((saved / META_FILE).read_text())
    meta["op_modules"] = {"fxforge_edges_cli.twice.default": "no_such_module_xyz"}
    (saved / META_FILE).write_text(json.dumps(meta))
    assert main(["inspect", str(saved)]) != 0
    err = capsys.readouterr().err
    assert "cannot load the saved model" in err and "CustomOpMissing" in err and "no_such_module_xyz" in err
    assert "Traceback" not in err


# -- dtypes -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=str)
def test_every_named_dtype_prints_and_parses_back(dtype):
    t = TensorType((2, 3), dtype)
    assert parse_type(str(t)) == t


@pytest.mark.parametrize("name", ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                  "float8_e5m2fnuz", "float8_e8m0fnu", "complex32", "complex128"])
def test_the_plain_dtypes_of_torch_have_ir_names(name):
    if not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    assert parse_type(f"{dtype_name(getattr(torch, name))}[4]").dtype is getattr(torch, name)


def test_a_dtype_without_a_name_is_a_clear_error():
    with pytest.raises(TypeError, match="no name for dtype torch.qint8: it holds tensors of the plain dtypes"):
        dtype_name(torch.qint8)


class _HoldsBuffer(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("b", torch.arange(1, 4).to(dtype))

    def forward(self, x):
        return self.lin(x) + self.b[:1].real.to(torch.float32).sum() if self.b.is_complex() else \
            self.lin(x) + self.b[:1].to(torch.float32).sum()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint64, torch.float8_e4m3fn], ids=str)
def test_a_model_holding_a_newer_dtype_optimizes_saves_and_loads(tmp_path, dtype):
    torch.manual_seed(0)
    model, x = _HoldsBuffer(dtype).eval(), torch.randn(2, 8)
    fast = fxforge.optimize(model, (x,))
    assert torch.equal(fast(x), model(x))
    fast.save(str(tmp_path / "saved"))
    loaded = fxforge.load(str(tmp_path / "saved"))
    assert torch.equal(loaded(x), model(x))
    assert loaded.graph.params["b"].dtype == dtype


def test_a_weight_safetensors_cannot_store_is_refused_by_name_before_writing(tmp_path):
    torch.manual_seed(0)
    model, x = _HoldsBuffer(torch.complex128).eval(), torch.randn(2, 8)
    fast = fxforge.optimize(model, (x,))
    with pytest.raises(TypeError, match=r"the weight 'b' is a torch.complex128 tensor, which weights.safetensors "
                                        r"\(safetensors\) cannot store"):
        fast.save(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()


# -- save directories ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model, x = _Calls(torch.relu).eval(), torch.randn(2, 8)
    return fxforge.optimize(model, (x,)), x


def test_save_to_an_existing_file_says_it_takes_a_directory(small, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="it is a file, and fast.save\\(path\\) writes a directory"):
        small[0].save(str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match="fast.save\\(path\\) writes a directory"):
        small[0].save(str(tmp_path / "file" / "sub"))
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("gone", [IR_FILE, WEIGHTS_FILE])
def test_a_save_missing_a_file_is_an_incompatible_save_naming_it(small, tmp_path, gone):
    small[0].save(str(tmp_path / "saved"))
    os.remove(tmp_path / "saved" / gone)
    with pytest.raises(IncompatibleSaveError, match=f"{gone} is missing: a save is a directory with"):
        fxforge.load(str(tmp_path / "saved"))


@pytest.mark.parametrize("key, value", [("max_new_tokens", -3), ("max_new_tokens", 0), ("max_new_tokens", "5"),
                                        ("num_beams", 0), ("top_k", -1), ("min_length", -2)])
def test_a_generation_default_out_of_range_is_refused_at_load(small, tmp_path, key, value):
    small[0].save(str(tmp_path / "saved"))
    meta = json.loads((tmp_path / "saved" / META_FILE).read_text())
    meta["generation_defaults"][key] = value
    (tmp_path / "saved" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(IncompatibleSaveError, match=f"'generation_defaults'.*{key}={json.dumps(value)} is not "
                                                    "an integer"):
        fxforge.load(str(tmp_path / "saved"))


def test_in_range_generation_defaults_still_load(small, tmp_path):
    fast, x = small
    fast.save(str(tmp_path / "saved"))
    meta = json.loads((tmp_path / "saved" / META_FILE).read_text())
    meta["generation_defaults"].update({"max_new_tokens": 5, "top_k": 0, "num_beams": 1, "max_length": None})
    (tmp_path / "saved" / META_FILE).write_text(json.dumps(meta))
    loaded = fxforge.load(str(tmp_path / "saved"))
    assert loaded.generation_defaults["max_new_tokens"] == 5
    assert torch.equal(loaded(x), fast(x))
