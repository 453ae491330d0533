"""Weight quantization formats: round-trip bounds, packing layout, sizes, errors."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxforge.ir import quant_formats as qf
from w8a8_inputs import plant_batch_outliers

RUNS_NO_KERNEL = True  # the formats' plain-torch packing and references, on CPU everywhere

TINY = torch.finfo(torch.float32).tiny


def _w(n, k, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale


def _slack(bound):
    """Float rounding slack on top of an analytic bound."""
    return bound * (1 + 1e-4) + 1e-30  # w/scale and q*scale each round once in float32


# --------------------------------------------------------------------------- round trips
def test_int8_roundtrip_within_half_scale():
    w = _w(40, 96)
    w[3] = 0.0  # zero row must not produce nan/inf
    p = qf.quantize_weight(w, "int8")
    assert p.qweight.dtype == torch.int8 and p.qweight.shape == (40, 96)
    assert p.scale.dtype == torch.float32 and p.scale.shape == (40,)
    assert int(p.qweight.abs().max()) <= 127
    torch.testing.assert_close(p.scale, w.abs().amax(1).clamp_min(TINY) / 127)
    deq = qf.dequantize_weight(p)
    assert torch.isfinite(deq).all() and (deq[3] == 0).all()
    err = (w - deq).abs()
    assert (err <= _slack(p.scale[:, None] / 2)).all()
    # the row absmax itself is represented (almost) exactly
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_roundtrip_within_half_group_scale(group_size):
    n, k = 24, 256
    w = _w(n, k, seed=group_size)
    w[0, :group_size] = torch.linspace(0.5, 2.0, group_size)  # all-positive group
    w[1, :group_size] = -torch.linspace(0.5, 2.0, group_size)  # all-negative group
    w[2] = 0.0
    p = qf.quantize_weight(w, "int4", group_size=group_size)
    ng = k // group_size
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (n, k // 2)
    assert p.scales.shape == (n, ng) and p.scales.dtype == torch.float32
    assert p.zeros.shape == (n, ng) and p.zeros.dtype == torch.uint8 and int(p.zeros.max()) <= 15
    deq = qf.dequantize_weight(p)
    assert torch.isfinite(deq).all() and (deq[2] == 0).all()
    bound = (p.scales / 2).repeat_interleave(group_size, dim=1)
    assert ((w - deq).abs() <= _slack(bound)).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_float_zero_point(group_size):
    n, k = 24, 256
    w = _w(n, k, seed=group_size)
    w[0, :group_size] = torch.linspace(0.5, 2.0, group_size)  # an offset group: 0 is outside its range
    p = qf.quantize_weight(w, "int4", group_size=group_size, zero_point="float")
    assert p.zeros.dtype == torch.float32 and p.zeros.shape == (n, k // group_size)
    deq = qf.dequantize_weight(p)
    bound = (p.scales / 2).repeat_interleave(group_size, dim=1)
    assert ((w - deq).abs() <= _slack(bound)).all()
    # the offset group uses all 16 levels of its own range (the int zero point wastes some)
    assert len(torch.unique(deq[0, :group_size])) == 16
    # a weight that already lies on a uniform 4-bit grid per group (GGUF Q4_1) comes back exactly
    d, m = torch.rand(n, k // group_size) * 0.01 + 1e-3, torch.randn(n, k // group_size) * 0.05
    q = torch.randint(0, 16, (n, k // group_size, group_size)).float()
    q[..., 0], q[..., 1] = 0, 15  # each group spans its whole range
    grid = (q * d[..., None] + m[..., None]).reshape(n, k)
    back = qf.dequantize_weight(qf.quantize_weight(grid, "int4", group_size=group_size, zero_point="float"))
    torch.testing.assert_close(back, grid, atol=1e-6, rtol=0)
    int_zero = qf.dequantize_weight(qf.quantize_weight(grid, "int4", group_size=group_size))
    assert (int_zero - grid).abs().max() > 1e-4  # the integer zero point cannot


def test_int4_default_group_size_is_128():
    p = qf.quantize_weight(_w(4, 256), "int4")
    assert p.group_size == 128 and p.scales.shape == (4, 2)


def _nf4_half_gap():
    code = torch.tensor(qf.NF4_CODE)
    return float((code[1:] - code[:-1]).max()) / 2


def test_nf4_table_is_the_qlora_normal_map():
    # bitsandbytes create_normal_map(offset=0.9677083): 8 positive and 7 negative normal
    # quantiles, plus 0, normalized to [-1, 1]; recomputed here with ndtri.
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    vals = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    vals = vals / vals.max()
    code = torch.tensor(qf.NF4_CODE, dtype=torch.float64)
    assert code.shape == (16,) and code[7] == 0 and code[0] == -1 and code[15] == 1
    torch.testing.assert_close(code, vals, rtol=0, atol=1e-6)
    assert qf.nf4_code_table().dtype == torch.float32


@pytest.mark.parametrize("group_size", [32, 64])
def test_nf4_roundtrip_within_half_largest_gap(group_size):
    n, k = 16, 128
    w = _w(n, k, seed=3)
    w[5] = 0.0
    p = qf.quantize_weight(w, "nf4", group_size=group_size)
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (n, k // 2)
    assert p.absmax.shape == (n, k // group_size) and p.absmax_q is None
    deq = qf.dequantize_weight(p)
    assert torch.isfinite(deq).all() and (deq[5] == 0).all()
    absmax = w.abs().reshape(n, -1, group_size).amax(-1).repeat_interleave(group_size, 1)
    assert ((w - deq).abs() <= _slack(_nf4_half_gap() * absmax)).all()
    # codes are the nearest ones: the group maximum maps to exactly +-absmax
    assert torch.allclose(deq.abs().reshape(n, -1, group_size).amax(-1),
                          w.abs().reshape(n, -1, group_size).amax(-1))


def test_nf4_default_group_size_is_64():
    assert qf.quantize_weight(_w(2, 128), "nf4").group_size == 64


def test_nf4_double_quant_adds_bounded_error():
    n, k, g = 96, 256, 32  # 96 * 8 = 768 group scales -> 3 blocks of 256
    w = _w(n, k, seed=4) * torch.linspace(0.1, 3.0, n)[:, None]
    plain = qf.quantize_weight(w, "nf4", group_size=g)
    dq = qf.quantize_weight(w, "nf4", group_size=g, double_quant=True)
    assert dq.absmax is None and dq.absmax_q.dtype == torch.int8 and dq.absmax_q.numel() == n * k // g
    assert dq.absmax_scale.shape == (3,) and dq.absmax_offset.shape == (1,)
    torch.testing.assert_close(dq.absmax_offset, plain.absmax.mean().reshape(1))
    # the scales themselves: within half an int8 step of their block
    blk = torch.arange(n * k // g) // qf.DOUBLE_QUANT_BLOCK
    a_err = (dq.group_absmax().flatten() - plain.absmax.flatten()).abs()
    assert (a_err <= _slack(dq.absmax_scale[blk] / 2) + 1e-7).all()
    # the weights: nf4 bound with the true absmax, plus |code| <= 1 times the scale error
    a_true = plain.absmax.repeat_interleave(g, 1)
    a_errw = (dq.group_absmax() - plain.absmax).abs().repeat_interleave(g, 1)
    deq = qf.dequantize_weight(dq)
    assert ((w - deq).abs() <= _slack(_nf4_half_gap() * a_true + a_errw) + 1e-6).all()
    # and the memory is smaller than with float32 scales
    assert qf.packed_nbytes(dq) < qf.packed_nbytes(plain)


def test_w8a8_weight_is_int8_per_channel():
    w = _w(8, 64)
    p = qf.quantize_weight(w, "w8a8", threshold=4.0)
    p8 = qf.quantize_weight(w, "int8")
    assert torch.equal(p.qweight, p8.qweight) and torch.equal(p.scale, p8.scale)
    assert p.threshold == 4.0
    assert qf.packed_nbytes(p) == qf.packed_nbytes(p8)  # no float copy kept for outliers


def test_low_precision_weights_are_accepted():
    w = _w(8, 128).to(torch.bfloat16)
    for scheme in qf.SCHEMES:
        p = qf.quantize_weight(w, scheme)
        assert p.attrs()["orig_dtype"] == "bfloat16"
        deq = qf.dequantize_weight(p, torch.bfloat16)
        assert deq.dtype == torch.bfloat16 and deq.shape == w.shape
        assert (deq.float() - w.float()).abs().max() < 0.6


# --------------------------------------------------------------------------- layout
def test_nibble_order_low_is_even():
    q = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = qf.pack_nibbles(q)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(qf.unpack_nibbles(packed), q)


def test_decode_nibbles_is_a_lookup_of_the_unpacked_codes():
    packed = torch.randint(0, 256, (5, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for values in (torch.arange(16, dtype=torch.float32), qf.nf4_code_table()):
        assert torch.equal(qf.decode_nibbles(packed, values), values[qf.unpack_nibbles(packed).long()])


def _int4_by_definition(packed):
    """(q - z) * scale from the unpacked codes, in float32: the format's definition, written
    apart from dequantize_weight's byte split and int8 subtraction."""
    n, k = packed.shape
    g = packed.group_size
    q = qf.unpack_nibbles(packed.qweight).float().reshape(n, k // g, g)
    return q.sub_(packed.zeros.float()[..., None]).mul_(packed.scales.float()[..., None]).reshape(n, k)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_int4_dequantization_is_the_definition_bit_for_bit(group_size, zero_point):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(group_size))
    packed = qf.quantize_weight(w, "int4", group_size=group_size, zero_point=zero_point)
    assert torch.equal(qf.dequantize_weight(packed), _int4_by_definition(packed))


def test_int4_dequantization_covers_every_code_and_zero_point():
    # every byte (both nibbles 0-15) against every zero point 0-15, so that q - z spans
    # [-15, 15] in the int8 step; the quantizer's own weights need not reach the ends
    gen = torch.Generator().manual_seed(0)
    qweight = torch.arange(256, dtype=torch.uint8).repeat(16, 1)  # [16, 256] -> K = 512
    zeros = torch.arange(16, dtype=torch.uint8)[:, None].expand(16, 8).contiguous()  # group 64
    scales = torch.rand(16, 8, generator=gen) + 0.5
    packed = qf.Int4Packed(qweight, scales, zeros, (16, 512), group_size=64)
    w = qf.dequantize_weight(packed)
    assert torch.equal(w, _int4_by_definition(packed))
    assert w.view(16, 8, 64).div(scales[..., None]).round().amin() == -15
    assert w.view(16, 8, 64).div(scales[..., None]).round().amax() == 15


def test_int4_packed_bytes_match_layout():
    # one group of 32 with min 0 and max 15: scale 1, zero 0, so q == w
    vals = (torch.arange(32) % 16).float()
    p = qf.quantize_weight(vals[None, :].repeat(3, 1), "int4", group_size=32)
    assert torch.allclose(p.scales, torch.ones(3, 1)) and (p.zeros == 0).all()
    expected = [(2 * j) % 16 | (((2 * j + 1) % 16) << 4) for j in range(16)]
    assert p.qweight[0].tolist() == expected


def test_nf4_packed_bytes_match_layout():
    idx = torch.tensor([0, 15, 7, 8, 3, 12] * 6)[:32]
    w = torch.tensor(qf.NF4_CODE)[idx][None, :] * 2.5
    p = qf.quantize_weight(w, "nf4", group_size=32)
    assert torch.allclose(p.absmax, torch.full((1, 1), 2.5))
    assert torch.equal(qf.unpack_nibbles(p.qweight)[0], idx.to(torch.uint8))
    assert p.qweight[0, 0].item() == (0 | (15 << 4))
    torch.testing.assert_close(qf.dequantize_weight(p), w)


# --------------------------------------------------------------------------- sizes
def test_nbytes_ratios():
    n, k = 256, 1024
    fp32 = n * k * 4
    int8 = qf.quantize_weight(_w(n, k), "int8")
    assert qf.packed_nbytes(int8) == n * k + 4 * n
    assert abs(qf.packed_nbytes(int8) / fp32 - 0.25) < 0.002
    int4 = qf.quantize_weight(_w(n, k), "int4", group_size=128)
    ng = k // 128
    assert qf.packed_nbytes(int4) == n * k // 2 + n * ng * 4 + n * ng
    assert 0.125 < qf.packed_nbytes(int4) / fp32 < 0.125 + 5 / (4 * 128) + 1e-9
    nf4 = qf.quantize_weight(_w(n, k), "nf4", group_size=64)
    assert qf.packed_nbytes(nf4) == n * k // 2 + n * (k // 64) * 4
    nf4dq = qf.quantize_weight(_w(n, k), "nf4", group_size=64, double_quant=True)
    n_sc = n * k // 64
    assert qf.packed_nbytes(nf4dq) == n * k // 2 + n_sc + 4 * (-(-n_sc // 256)) + 4
    assert qf.packed_nbytes(nf4dq) == nf4dq.nbytes()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_indivisible_k_is_rejected_with_reason(scheme):
    reason = qf.check_quantizable(scheme, (16, 100), group_size=32)
    assert reason is not None and "100" in reason and "divisible" in reason
    with pytest.raises(ValueError, match="divisible"):
        qf.quantize_weight(_w(16, 100), scheme, group_size=32)
    assert qf.check_quantizable(scheme, (16, 128), group_size=32) is None
    assert "group_size" in qf.check_quantizable(scheme, (16, 96), group_size=48)


def test_bad_shapes_and_values_are_rejected():
    assert "2-D" in qf.check_quantizable("int8", (16,))
    assert "empty" in qf.check_quantizable("int8", (0, 16))
    assert qf.check_quantizable("int8", (3, 7)) is None  # int8 takes any 2-D shape
    with pytest.raises(ValueError, match="2-D"):
        qf.quantize_weight(torch.randn(4, 4, 4), "int8")
    with pytest.raises(ValueError, match="floating"):
        qf.quantize_weight(torch.ones(4, 4, dtype=torch.int32), "int8")
    w = _w(4, 64)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        qf.quantize_weight(w, "int4", group_size=32)
    assert "threshold" in qf.check_quantizable("w8a8", (4, 4), threshold=-1.0)


def test_unknown_scheme_lists_known_schemes():
    with pytest.raises(ValueError) as ei:
        qf.quantize_weight(_w(4, 64), "fp3")
    msg = str(ei.value)
    assert "fp3" in msg and all(s in msg for s in qf.SCHEMES)
    with pytest.raises(ValueError, match="int8"):
        qf.check_quantizable("bogus", (4, 4))
    with pytest.raises(ValueError, match="int4"):
        qf.unpack_parts({}, {"scheme": "bogus"})


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        qf.quantize_weight(_w(4, 64), "int8", group_size=32)


# --------------------------------------------------------------------------- parts
@pytest.mark.parametrize("scheme,opts", [("int8", {}), ("int4", {"group_size": 32}),
                                         ("int4", {"group_size": 64, "zero_point": "float"}), ("nf4", {}),
                                         ("nf4", {"double_quant": True}), ("w8a8", {"threshold": 5.0})])
def test_tensors_attrs_round_trip(scheme, opts):
    p = qf.quantize_weight(_w(12, 128), scheme, **opts)
    tensors, attrs = p.tensors(), p.attrs()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert attrs["scheme"] == scheme and attrs["shape"] == (12, 128)
    json.dumps(attrs)  # plain values only
    rebuilt = qf.unpack_parts({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(attrs)))
    assert type(rebuilt) is type(p) and rebuilt.attrs() == attrs
    assert torch.equal(qf.dequantize_weight(rebuilt), qf.dequantize_weight(p))
    assert type(p).from_parts(tensors, attrs).shape == (12, 128)
    assert isinstance(p, qf.Packed) and type(qf.Packed.from_parts(tensors, attrs)) is type(p)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == qf.packed_nbytes(p)


def test_from_parts_rejects_wrong_scheme_and_missing_tensors():
    p = qf.quantize_weight(_w(4, 64), "int8")
    with pytest.raises(ValueError, match="scheme"):
        qf.Int4Packed.from_parts(p.tensors(), p.attrs())
    with pytest.raises(ValueError, match="scale"):
        qf.unpack_parts({"qweight": p.qweight}, p.attrs())


# --------------------------------------------------------------------------- references
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_reference_linear_is_dequant_matmul(scheme):
    w, x, b = _w(20, 128), _w(6, 128, seed=1).reshape(2, 3, 128), _w(1, 20, seed=2)[0]
    p = qf.quantize_weight(w, scheme, **({"group_size": 64} if scheme != "int8" else {}))
    y = qf.quant_linear_reference(x, p, b)
    assert y.shape == (2, 3, 20) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ qf.dequantize_weight(p).T + b)
    yh = qf.quant_linear_reference(x.half(), p)
    assert yh.dtype == torch.float16
    with pytest.raises(ValueError, match="input features"):
        qf.quant_linear_reference(torch.randn(2, 64), p)


def test_activation_quantization_per_token():
    x = _w(5, 64).reshape(5, 64)
    x[2] = 0.0
    x_q, s = qf.quantize_activations_per_token(x.reshape(5, 1, 64))
    assert x_q.dtype == torch.int8 and x_q.shape == (5, 1, 64) and s.shape == (5, 1) and s.dtype == torch.float32
    x_q, s = x_q.reshape(5, 64), s.reshape(5)
    torch.testing.assert_close(s[[0, 1, 3, 4]], x.abs().amax(1)[[0, 1, 3, 4]] / 127)
    assert (x_q[2] == 0).all()
    assert ((x - x_q.float() * s[:, None]).abs() <= _slack(s[:, None] / 2)).all()


def test_w8a8_outlier_decomposition():
    w, x = _w(32, 128), _w(4, 128, seed=7)
    x[:, 5] = torch.tensor([40.0, -3.0, 0.5, 1.0])  # column 5 is an outlier column (row 0)
    p = qf.quantize_weight(w, "w8a8")
    exact = x @ qf.dequantize_weight(p).T
    y = qf.quant_linear_reference(x, p)
    y_none = qf.w8a8_linear_reference(x, p, threshold=None)
    err, err_none = (y - exact).abs().amax(1), (y_none - exact).abs().amax(1)
    # the outlier would blow up row 0's activation scale without the decomposition
    assert err.max() < 0.3 and err_none[0] > 10 * err[0]
    x_q, x_scale, idx = qf.w8a8_split_activations(x, 6.0)
    # per token: only row 0's entry is an outlier, the other rows quantize column 5
    assert idx.tolist() == [5] and x_q[0, 5] == 0 and (x_q[1:, 5] != 0).all()
    assert x_scale[0] < 40.0 / 127  # scale of row 0 ignores the outlier
    # no outliers at all: a plain per-token int8 product
    x_small = x.clone()
    x_small[:, 5] = 0.1
    assert qf.w8a8_split_activations(x_small, 6.0)[2] is None
    xq, xs = qf.quantize_activations_per_token(x_small)
    manual = (xq.float() @ p.qweight.float().T) * xs[:, None] * p.scale[None, :]
    torch.testing.assert_close(qf.quant_linear_reference(x_small, p), manual)


def _w8a8_batch(m, k, seed=0):
    """x [m, k] with outliers that tell a per-token split from a batch one (w8a8_inputs)."""
    return plant_batch_outliers(_w(m, k, seed=seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_row_result_does_not_depend_on_the_batch(dtype):
    """Outliers are per token: a row's w8a8 result alone is bitwise its result in a batch,
    in the reference and on the torch backend (the float outlier sum runs column by column,
    so another row's outlier column adds an exact zero)."""
    from fxforge.runtime.torch_kernels import quant_linear_torch

    m, k, n = 4, 128, 24
    p = qf.quantize_weight(_w(n, k, seed=3), "w8a8")
    x = _w8a8_batch(m, k).to(dtype)
    # outlier features every token has (one float product per feature, in one pass), and
    # those plus a row's own (per-row ranks, some columns shared by all rows, some not)
    common = _w(m, k, seed=8)
    common[:, [10, 20, 70]] = torch.tensor([9.0, -30.0, 7.0])
    mixed = common.clone()
    mixed[2, [15, 90]] = -12.0
    dense = _w(m, k, seed=11, scale=3.0)  # about 6 outliers a row, 20 columns: a matmul over them
    # would group row m's sums differently in the batch (zeros between them) and alone
    bias = _w(1, n, seed=5).reshape(n).to(dtype)
    for fn in (qf.quant_linear_reference, quant_linear_torch):
        for xs in (x, common.to(dtype), mixed.to(dtype), dense.to(dtype)):
            batch = fn(xs, p, bias)
            alone = torch.cat([fn(xs[i:i + 1], p, bias) for i in range(m)])
            assert torch.equal(batch, alone), fn.__name__
            assert torch.equal(fn(xs.reshape(2, 2, k), p, bias).reshape(m, n), batch)
    exact = x.float() @ qf.dequantize_weight(p).T + bias.float()
    assert (qf.quant_linear_reference(x.float(), p, bias.float()) - exact).abs().max() < 0.01 * exact.abs().max()
    x_q, x_scale, idx = qf.w8a8_split_activations(x, 6.0)
    assert x_q[1, 3] != 0 and x_q[0, 3] == 0  # row 0's outlier column: row 1 still quantizes it
    for i in range(m):
        q1, s1, _ = qf.w8a8_split_activations(x[i:i + 1], 6.0)
        assert torch.equal(q1[0], x_q[i]) and torch.equal(s1[0], x_scale[i])


# --------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 6),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([32, 64]),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**16),
    zero_frac=st.floats(0, 1),
)
def test_roundtrip_bounds_property(n, groups, group_size, log_scale, seed, zero_frac):
    k = groups * group_size
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (2.0 ** log_scale)
    w[torch.rand(n, k, generator=g) < zero_frac * 0.5] = 0.0
    w = w + torch.rand(n, 1, generator=g) * (2.0 ** log_scale)  # shifted rows: asymmetric ranges

    p8 = qf.quantize_weight(w, "int8")
    assert ((w - qf.dequantize_weight(p8)).abs() <= _slack(p8.scale[:, None] / 2)).all()

    p4 = qf.quantize_weight(w, "int4", group_size=group_size)
    bound4 = (p4.scales / 2).repeat_interleave(group_size, 1)
    assert ((w - qf.dequantize_weight(p4)).abs() <= _slack(bound4)).all()

    pn = qf.quantize_weight(w, "nf4", group_size=group_size)
    absmax = w.abs().reshape(n, groups, group_size).amax(-1).repeat_interleave(group_size, 1)
    assert ((w - qf.dequantize_weight(pn)).abs() <= _slack(_nf4_half_gap() * absmax)).all()

    pd = qf.quantize_weight(w, "nf4", group_size=group_size, double_quant=True)
    a_err = (pd.group_absmax() - pn.absmax).abs().repeat_interleave(group_size, 1)
    assert ((w - qf.dequantize_weight(pd)).abs() <= _slack(_nf4_half_gap() * absmax + a_err) * (1 + 1e-5)).all()


def test_fitting_group_size_is_the_largest_supported_divisor_not_above_the_request():
    assert qf.fitting_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert qf.fitting_group_size(1536, 128) == 128
    assert qf.fitting_group_size(576, 256) == 64 and qf.fitting_group_size(4096, 256) == 256
    assert qf.fitting_group_size(96, 128) == 32  # 96 itself is no supported size (the CPU int4 kernel's)
    assert qf.fitting_group_size(48, 128) is None and qf.fitting_group_size(576, 32) == 32
