"""Weights edited the nn.Module way: in place through fast.state_dict()'s tensors (a LoRA
merge, pruning) or with fast.load_state_dict(). Every path a call can take (one row, a few
rows, a prompt; packed, column-major, dequantized) computes from the edited weights, so the
answer is the edited eager model's whatever the call's shape, and fast.save() saves what
the model computes (runtime/derived.py, runtime/state_dict.py)."""
import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.ir.quant_formats import dequantize_weight, quantize_weight
from fxforge.runtime import cpu_dequant, cpu_int4, cpu_int8_digits, cpu_linear
from fxforge.runtime.backends.torch_backend import TorchBackend
from fxforge.runtime.cpu_linear import PACKED, ROW_BUCKETS, onednn_available
from fxforge.runtime.cpu_linear_cache import Decision

import zoo
from helpers import assert_close_to_eager

QKV = "model.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
# (batch, length): one row, each row bucket, and a prompt longer than all of them
SIZES = [(1, 1), (1, 5), (1, 12), (1, 24), (2, 20)]


@pytest.fixture
def copies_everywhere(monkeypatch, tmp_path):
    """Every float32 linear weight planned, read at one row through a column-major copy, at
    2-8 rows through the row-major original, at 9-15 rows (and 16-32) through a oneDNN-packed
    copy where oneDNN is there: each kind of copy the plan can make, whatever this machine's
    timing would choose."""
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(cpu_linear, "measure_choices", lambda shapes, candidates, budget_s=None: {
        s: Decision("aten", "column", 2.0, {}, 9) for s in shapes})
    bucket_choice = {ROW_BUCKETS[0]: ("aten", "row")}
    packed = PACKED if onednn_available() else ("aten", "row")
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates, budget_s=None: {
        s: Decision(*bucket_choice.get(bucket, packed), 2.0, {}, 9) for s in shapes})
    return TorchBackend("cpu", cpu_linear="measure", few_rows_packed_mb=64)


def _llama(seed=0):
    torch.manual_seed(seed)
    model, vocab = zoo.llama("sdpa", n_layer=1, kv_heads=4, hidden=64, heads=4)
    return model, vocab


def _assert_answers_as(model, fast, vocab, sizes=SIZES):
    gen = torch.Generator().manual_seed(1)
    for b, t in sizes:
        ids = torch.randint(0, vocab, (b, t), generator=gen)
        with torch.no_grad():
            assert_close_to_eager(model(ids), fast(ids), rel=1e-5)


def _halve_attention(model):
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            proj.weight.mul_(0.5)


def test_the_plan_holds_each_kind_of_copy(copies_everywhere):
    """(what the tests below edit through)"""
    model, vocab = _llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), backend=copies_everywhere)
    plan = fast.op_implementations["linear"].__self__
    stored = fast.graph.params[QKV]
    assert not stored.is_contiguous() and stored is not fast.state_dict()[QKV]._base
    assert plan.originals and id(stored) in plan.copied
    if onednn_available():
        assert plan.packed


def test_in_place_edits_through_state_dict_reach_every_path(copies_everywhere, tmp_path):
    model, vocab = _llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), backend=copies_everywhere)
    _assert_answers_as(model, fast, vocab)
    with torch.no_grad():
        sd = fast.state_dict()
        sd[QKV].mul_(0.5)
        sd[O_PROJ].mul_(0.5)
    _halve_attention(model)
    _assert_answers_as(model, fast, vocab)
    # what save() writes is what the edited model computes
    fast.save(str(tmp_path / "saved"))
    _assert_answers_as(model, fxforge.load(str(tmp_path / "saved")), vocab)
    # and a second edit is seen too
    with torch.no_grad():
        sd[QKV].mul_(0.5)
        sd[O_PROJ].mul_(0.5)
    _halve_attention(model)
    _assert_answers_as(model, fast, vocab)


def test_load_state_dict_takes_another_models_weights(copies_everywhere):
    model, vocab = _llama(0)
    other, _ = _llama(1)
    example = (torch.randint(0, vocab, (2, 7)),)
    fast = fxforge.optimize(model, example, backend=copies_everywhere)
    fast_other = fxforge.optimize(other, example)
    result = fast.load_state_dict(fast_other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_answers_as(other, fast, vocab)
    assert set(fast.state_dict()) == set(fast_other.state_dict())
    # the values are copied, not shared: the other model keeps its own
    assert all(fast.state_dict()[k].data_ptr() != t.data_ptr() for k, t in fast_other.state_dict().items())


def test_load_state_dict_checks_everything_before_writing_anything():
    model, vocab = _llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),))
    sd = {k: v.clone() for k, v in fast.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}

    def unchanged():
        return all(torch.equal(fast.state_dict()[k], v) for k, v in before.items())

    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\) \(1\).*o_proj.*Unexpected key\(s\) \(1\): 'extra'"):
        fast.load_state_dict({**{k: v.mul(2) for k, v in sd.items() if k != O_PROJ}, "extra": torch.ones(1)})
    assert unchanged()
    bad_shape = {**sd, O_PROJ: torch.zeros(3, 3)}
    for strict in (True, False):  # a shape mismatch is an error either way, as in nn.Module
        with pytest.raises(RuntimeError, match=r"size mismatch for model\.layers\.0\.self_attn\.o_proj\.weight.*\(3, 3\)"):
            fast.load_state_dict({k: v.mul(2) if k != O_PROJ else v for k, v in bad_shape.items()}, strict=strict)
        assert unchanged()
    with pytest.raises(RuntimeError, match="dtype mismatch.*int64"):
        fast.load_state_dict({**sd, O_PROJ: sd[O_PROJ].long()})
    with pytest.raises(TypeError, match="mapping"):
        fast.load_state_dict([1, 2])
    with pytest.raises(NotImplementedError, match="assign"):
        fast.load_state_dict(sd, assign=True)
    # the source model's state dict: its names are not the graph's, and the error says why
    with pytest.raises(RuntimeError, match=r"fuses and renames weights"):
        fast.load_state_dict(model.state_dict())
    assert unchanged()
    # strict=False: the names that match load, the rest come back
    result = fast.load_state_dict({O_PROJ: sd[O_PROJ].double() * 0.5, "extra": torch.ones(1)}, strict=False)
    assert result.unexpected_keys == ["extra"] and O_PROJ not in result.missing_keys and QKV in result.missing_keys
    assert fast.state_dict()[O_PROJ].dtype == torch.float32  # floating values cast, as nn.Module does
    torch.testing.assert_close(fast.state_dict()[O_PROJ], before[O_PROJ] * 0.5)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(0.5)
    _assert_answers_as(model, fast, vocab, [(1, 1), (2, 9)])


def test_tied_names_take_one_value():
    """Two names of one tensor (a tied embedding): one value for both, or an error."""
    from fxforge.runtime.state_dict import load_state_dict

    shared = torch.zeros(3, 2)
    params = {"embed.weight": shared, "lm_head.weight": shared}
    with pytest.raises(RuntimeError, match="one tied tensor"):
        load_state_dict(params, {"embed.weight": torch.ones(3, 2), "lm_head.weight": torch.full((3, 2), 2.0)})
    assert not shared.any()
    load_state_dict(params, {"embed.weight": torch.ones(3, 2), "lm_head.weight": torch.ones(3, 2)})
    assert torch.equal(shared, torch.ones(3, 2))


def test_int4_edits_reach_the_packed_copy(tmp_path):
    """Halving o_proj's scales: a 1-token call (packed int4 kernel) and the same token in an
    8-token call (dequantize + GEMM) agree, and agree with the model saved after the edit."""
    if not cpu_int4.int4pack_available():
        pytest.skip("no packed int4 CPU kernel in this torch build")
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa", n_layer=1, kv_heads=4, hidden=64, heads=4)
    ids = torch.randint(0, vocab, (1, 8))
    fast = fxforge.optimize(model, (ids,), quantize=fxforge.QuantConfig("int4", group_size=32))
    assert any(s.name == "cpu_int4" and s.rules for s in fast.runtime_stats)
    scales = O_PROJ + ".scales"
    before = fast(ids[:, :1]).logits
    with torch.no_grad():
        fast.state_dict()[scales].mul_(0.5)
    one = fast(ids[:, :1]).logits
    assert not torch.equal(one, before)
    torch.testing.assert_close(one, fast(ids).logits[:, :1], rtol=1e-5, atol=1e-5)
    fast.save(str(tmp_path / "int4"))
    loaded = fxforge.load(str(tmp_path / "int4"))
    torch.testing.assert_close(one, loaded(ids[:, :1]).logits, rtol=1e-5, atol=1e-5)
    # load_state_dict alike
    sd = {k: v.clone() for k, v in fast.state_dict().items()}
    sd[scales].mul_(3.0)
    fast.load_state_dict(sd)
    torch.testing.assert_close(fast(ids[:, :1]).logits, fast(ids).logits[:, :1], rtol=1e-5, atol=1e-5)


def test_an_int4_copy_follows_its_weight_and_leaves_the_kernel_when_its_scales_cannot_be_held():
    if not cpu_int4.int4pack_available():
        pytest.skip("no packed int4 CPU kernel in this torch build")
    gen = torch.Generator().manual_seed(0)
    packed = quantize_weight(torch.randn(32, 64, generator=gen), "int4", group_size=32)
    weight = cpu_int4.prepare_int4(packed, torch.float32)
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        packed.scales.mul_(0.25)
        packed.zeros[0].fill_(3)
    torch.testing.assert_close(cpu_int4.int4pack_linear(x, weight), x @ dequantize_weight(packed).t(),
                               rtol=1e-4, atol=1e-4)
    # float16 activations: scales below float16's normal range cannot be the kernel's table
    half = cpu_int4.prepare_int4(packed, torch.float16)
    with torch.no_grad():
        packed.scales.fill_(1e-6)
    y = cpu_int4.int4pack_linear(x.half(), half)
    assert half.dequantize
    torch.testing.assert_close(y, (x.half().float() @ dequantize_weight(packed).t()).half(), rtol=1e-3, atol=0)


@pytest.mark.skipif(not cpu_int8_digits.digits_available(), reason="no oneDNN quantized linear here")
def test_an_int8_digits_copy_follows_its_weight():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8)
    s = torch.rand(32, generator=gen) + 0.5
    weight = cpu_int8_digits.prepack(q, s)
    with torch.no_grad():
        q[:4].neg_()
        s.mul_(2)
    for rows in (3, cpu_int8_digits.FEW_ROWS + 1):  # both kernels
        x = torch.randn(rows, 64, generator=gen)
        ref = x.double() @ (q.double() * s.double()[:, None]).t()
        torch.testing.assert_close(cpu_int8_digits.digit_linear(x, weight).double(), ref, rtol=1e-5, atol=1e-5)


def test_a_kept_dequantized_weight_follows_its_weight():
    gen = torch.Generator().manual_seed(0)
    packed = quantize_weight(torch.randn(32, 64, generator=gen), "int8")
    kept = cpu_dequant.DequantizedWeights(1 << 20)
    first = kept.weight(packed, torch.float32)
    assert kept.get(packed.qweight, torch.float32) is first
    with torch.no_grad():
        packed.scale.mul_(2)
    assert kept.get(packed.qweight, torch.float32) is None and kept.used_bytes == 0
    torch.testing.assert_close(kept.weight(packed, torch.float32), dequantize_weight(packed, torch.float32))
    assert len(kept) == 1


def test_a_model_optimized_under_inference_mode_loads_too(copies_everywhere):
    """Its weights are inference tensors, with no version counter: load_state_dict writes
    them (inside inference_mode) and refreshes their copies all the same."""
    model, vocab = _llama(0)
    other, _ = _llama(1)
    with torch.inference_mode():
        fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), backend=copies_everywhere)
    assert fast.state_dict()[QKV].is_inference()
    _assert_answers_as(model, fast, vocab, [(1, 1), (1, 12)])
    fast.load_state_dict(fxforge.optimize(other, (torch.randint(0, vocab, (2, 7)),)).state_dict())
    _assert_answers_as(other, fast, vocab)


def test_the_one_row_product_still_reads_the_copy(copies_everywhere, monkeypatch):
    """(no edit: nothing is made again, and the copy is what the kernel reads)"""
    model, vocab = _llama()
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), backend=copies_everywhere)
    stored = fast.graph.params[QKV]
    read = []
    monkeypatch.setitem(cpu_linear.KERNELS, "aten", lambda x, w, b=None: read.append(w) or F.linear(x, w, b))
    renewed = []
    plan = fast.op_implementations["linear"].__self__
    monkeypatch.setattr(plan, "_renew", lambda copied: renewed.append(copied))
    fast(torch.randint(0, vocab, (1, 1)))
    assert any(w is stored for w in read) and renewed == []


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_versions_see_an_in_place_edit_of_any_source_through_a_view(count):
    from fxforge.runtime.derived import Versions

    for edited in range(count):
        sources = [torch.zeros(4) for _ in range(count)]
        versions = Versions(*sources)
        assert not versions.changed()
        with torch.no_grad():
            sources[edited].detach()[1:].add_(1)  # (a detached view shares the version counter)
        assert versions.changed()
        versions.renew()
        assert not versions.changed()
