"""Triton quantized-matmul kernels and the torch fast path vs quant_formats' reference.

Runs the Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported); with TRITON_INTERPRET=0 on a CUDA machine they run on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels import quant_matmul as qm  # noqa: E402
from w8a8_inputs import plant_batch_outliers  # noqa: E402
from kernel_device import kernel_device  # noqa: E402
from fxforge.runtime.torch_kernels import quant_linear_torch  # noqa: E402
from fxforge.ir import quant_formats as qf  # noqa: E402

DEVICE = kernel_device(qm.INTERPRET, "quant_matmul")

# max |y - ref| / max |ref|: output rounding of the dtype (fp16/bf16 also round the
# dequantized weight tile to the input dtype before tl.dot)
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def _assert_matches(y, ref, dtype):
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    denom = ref.float().abs().max().clamp_min(1e-6)
    rel = ((y.float() - ref.float()).abs().max() / denom).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3g} > {REL_TOL[dtype]}"


# (scheme, options, [(M, N, K), ...]); K respects each scheme's group size
WEIGHT_ONLY_CASES = [
    ("int8", {}, [(1, 40, 64), (3, 72, 128), (33, 40, 256), (3, 40, 100)]),  # K=100: masked K tail
    ("int4", {"group_size": 32}, [(1, 72, 64), (33, 40, 128), (3, 40, 256)]),
    ("int4", {"group_size": 128}, [(1, 40, 128), (3, 72, 256), (33, 72, 128)]),
    ("int4", {"group_size": 64, "zero_point": "float"}, [(1, 40, 64), (33, 72, 128)]),
    ("nf4", {"group_size": 64}, [(1, 40, 64), (3, 72, 256), (33, 40, 128)]),
    ("nf4", {"group_size": 32, "double_quant": True}, [(3, 40, 128), (33, 72, 64)]),
]
PARAMS = [
    pytest.param(scheme, opts, m, n, k, dtype, (i + j) % 2 == 0,
                 id=f"{scheme}-{'-'.join(f'{v}' for v in opts.values())}-{m}x{n}x{k}-{str(dtype)[6:]}")
    for scheme, opts, shapes in WEIGHT_ONLY_CASES
    for i, (m, n, k) in enumerate(shapes)
    for j, dtype in enumerate(DTYPES)
]


@pytest.mark.parametrize("scheme,opts,m,n,k,dtype,with_bias", PARAMS)
def test_weight_only_kernel_matches_reference(scheme, opts, m, n, k, dtype, with_bias):
    packed = qf.quantize_weight(_rand(n, k, seed=n + k), scheme, **opts)
    x = _rand(m, k, seed=m).to(dtype)
    bias = _rand(n, seed=5).to(dtype) if with_bias else None
    ref = qf.quant_linear_reference(x, packed, bias)
    _assert_matches(qm.quant_linear_triton(x, packed, bias), ref, dtype)
    # the reference is not trivially equal to the unquantized product (the test can fail)
    if scheme != "int8":
        assert not torch.allclose(ref.float(), (x.float() @ _rand(n, k, seed=n + k).T), rtol=1e-3, atol=1e-3)


def test_direct_wrappers_and_leading_dims():
    n, k = 40, 128
    w = _rand(n, k, seed=1)
    x = _rand(2, 3, k, seed=2)
    bias = _rand(n, seed=3)
    p8 = qf.quantize_weight(w, "int8")
    y = qm.int8_linear_triton(x, p8.qweight, p8.scale, bias)
    assert y.shape == (2, 3, n)
    _assert_matches(y, qm.int8_linear_reference(x, p8.qweight, p8.scale, bias), torch.float32)
    p4 = qf.quantize_weight(w, "int4", group_size=64)
    y = qm.int4_linear_triton(x, p4.qweight, p4.scales, p4.zeros, 64)
    _assert_matches(y, qm.int4_linear_reference(x, p4.qweight, p4.scales, p4.zeros, 64), torch.float32)
    # zeros given as float (integer-valued) give the same result
    y_fz = qm.int4_linear_triton(x, p4.qweight, p4.scales, p4.zeros.float(), 64)
    torch.testing.assert_close(y_fz, y)
    # scales in the compute dtype work too
    xh, sh = x.half(), p4.scales.half()
    _assert_matches(qm.int4_linear_triton(xh, p4.qweight, sh, p4.zeros, 64),
                    qm.int4_linear_reference(xh, p4.qweight, sh, p4.zeros, 64), torch.float16)
    pn = qf.quantize_weight(w, "nf4", group_size=32, double_quant=True)
    absmax = pn.group_absmax()
    y = qm.nf4_linear_triton(x, pn.qweight, absmax, 32, bias)
    _assert_matches(y, qm.nf4_linear_reference(x, pn.qweight, absmax, 32, bias), torch.float32)
    _assert_matches(y, qf.quant_linear_reference(x, pn, bias), torch.float32)


def test_non_contiguous_input_and_empty_batch():
    n, k = 72, 128
    p = qf.quantize_weight(_rand(n, k), "int4", group_size=32)
    x = _rand(k, 5, seed=9).T  # [5, K] with stride (1, 5)
    assert not x.is_contiguous()
    _assert_matches(qm.quant_linear_triton(x, p), qf.quant_linear_reference(x, p), torch.float32)
    empty = qm.quant_linear_triton(torch.zeros(0, k, device=DEVICE), p)
    assert empty.shape == (0, n)


def test_wrapper_errors():
    p = qf.quantize_weight(_rand(8, 64), "int4", group_size=32)
    with pytest.raises(ValueError, match="input features"):
        qm.quant_linear_triton(_rand(2, 32), p)
    with pytest.raises(ValueError, match="group"):
        qm.int4_linear_triton(_rand(2, 64), p.qweight, p.scales, p.zeros, 64)
    with pytest.raises(ValueError, match="bias"):
        qm.quant_linear_triton(_rand(2, 64), p, _rand(9))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        qm.quant_linear_triton(_rand(2, 64).double(), p)


@pytest.mark.parametrize("m,n,k,dtype,outliers,with_bias", [
    (1, 40, 64, torch.float32, False, True),
    (3, 72, 128, torch.float16, True, False),
    (33, 40, 256, torch.bfloat16, True, True),
    (33, 72, 128, torch.float32, True, False),
    (3, 40, 256, torch.float32, False, False),
    (5, 72, 100, torch.float16, True, True),  # K not a multiple of BLOCK_K
])
def test_w8a8_kernel_matches_reference(m, n, k, dtype, outliers, with_bias):
    packed = qf.quantize_weight(_rand(n, k, seed=k), "w8a8")
    x = _rand(m, k, seed=m)
    if outliers:
        x[0, 3] = 40.0
        x[-1, k - 1] = -9.0
    x = x.to(dtype)
    has_outliers = qf.w8a8_split_activations(x.reshape(-1, k), 6.0)[2] is not None
    assert has_outliers == outliers
    bias = _rand(n, seed=4).to(dtype) if with_bias else None
    ref = qf.quant_linear_reference(x, packed, bias)
    _assert_matches(qm.quant_linear_triton(x, packed, bias), ref, dtype)
    _assert_matches(qm.w8a8_linear_triton(x, packed.qweight, packed.scale, bias, threshold=6.0), ref, dtype)
    if outliers:  # the decomposition matters: without it row 0 is much less accurate
        exact = x.float().reshape(-1, k) @ qf.dequantize_weight(packed).T
        exact = exact + (bias.float() if bias is not None else 0.0)
        no_dec = qm.w8a8_linear_triton(x, packed.qweight, packed.scale, bias, threshold=None)
        err_dec = (ref.float().reshape(-1, n)[0] - exact[0]).abs().max()
        err_no_dec = (no_dec.float().reshape(-1, n)[0] - exact[0]).abs().max()
        assert err_no_dec > 3 * err_dec


@pytest.mark.parametrize("scheme,opts", [("int8", {}), ("int4", {"group_size": 64}), ("nf4", {}),
                                         ("nf4", {"double_quant": True}), ("w8a8", {})])
@pytest.mark.parametrize("m", [1, 2, 7])
def test_torch_backend_matches_reference(scheme, opts, m):
    n, k = 48, 128
    w = _rand(n, k, seed=11)
    packed = qf.quantize_weight(w, scheme, **opts)
    for i, dtype in enumerate(DTYPES):
        x = _rand(m, k, seed=i)
        if scheme == "w8a8" and i == 0:
            x[0, 1] = 12.0
        x = x.to(dtype)
        bias = _rand(n, seed=6).to(dtype) if i != 1 else None
        ref = qf.quant_linear_reference(x, packed, bias)
        _assert_matches(quant_linear_torch(x, packed, bias), ref, dtype)
        deq = qf.dequantize_weight(packed)
        _assert_matches(quant_linear_torch(x, packed, bias, weight=deq), ref, dtype)
    x3 = _rand(2, m, k, seed=3)
    y3 = quant_linear_torch(x3, packed)
    assert y3.shape == (2, m, n)
    torch.testing.assert_close(y3, qf.quant_linear_reference(x3, packed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
@pytest.mark.parametrize("n,k", [(40, 100), (7, 48), (33, 256)])
def test_torch_backend_int8_odd_shapes(scheme, n, k):
    # torch._weight_int8pack_mm's bf16 CPU path is wrong for K % 16 != 0: must not be used there
    p = qf.quantize_weight(_rand(n, k, seed=k), scheme)
    for dtype in DTYPES:
        for m in (1, 3):
            x = _rand(m, k, seed=m).to(dtype)
            _assert_matches(quant_linear_torch(x, p), qf.quant_linear_reference(x, p), dtype)


def test_torch_backend_uses_weight_argument():
    # a caller-supplied dequantized weight is really what gets multiplied
    p = qf.quantize_weight(_rand(16, 64), "int4", group_size=32)
    x = _rand(2, 64)
    other = _rand(16, 64, seed=99)
    torch.testing.assert_close(quant_linear_torch(x, p, weight=other), x @ other.T)


ALL_CONFIGS = sorted(set((bm, bn, bk) for bm, bn, bk, _, _ in qm._SMALL_M_CONFIGS + qm._LARGE_M_CONFIGS))


@pytest.mark.skipif(not qm.INTERPRET, reason="forces block sizes through the interpreter's fixed config")
@pytest.mark.parametrize("blocks", ALL_CONFIGS, ids=lambda b: "x".join(map(str, b)))
def test_every_autotune_block_shape_is_correct(blocks, monkeypatch):
    """The GPU autotuner picks among these block shapes: check each one's tiling/masking here
    (group smaller and larger than BLOCK_K, N and M not multiples of the blocks, K tail)."""
    bm, bn, bk = blocks
    monkeypatch.setitem(qm._INTERPRET_BLOCKS, "BLOCK_M", bm)
    monkeypatch.setitem(qm._INTERPRET_BLOCKS, "BLOCK_N", bn)
    monkeypatch.setitem(qm._INTERPRET_BLOCKS, "BLOCK_K", bk)
    m, n = (3 if bm == 16 else 33), 72
    w = _rand(n, 192, seed=bk)
    x = _rand(m, 192, seed=bn)
    x[0, 7] = 30.0
    x16 = x.half()
    for packed in (qf.quantize_weight(w, "int8"), qf.quantize_weight(w, "int4", group_size=64),
                   qf.quantize_weight(w, "nf4", group_size=32), qf.quantize_weight(w, "w8a8")):
        _assert_matches(qm.quant_linear_triton(x16, packed), qf.quant_linear_reference(x16, packed), torch.float16)


def _w8a8_batch(m, k, seed=0):
    """x [m, k] with outliers that tell a per-token split from a batch one (w8a8_inputs)."""
    return plant_batch_outliers(_rand(m, k, seed=seed).cpu()).to(DEVICE)


@pytest.mark.parametrize("m,path", [(3, "gemv"), (5, "split"), (20, "gemm")])
def test_w8a8_row_result_does_not_depend_on_the_batch(m, path, monkeypatch):
    """Outliers are per token on every kernel path (the split-K GEMV, the GEMM splitting x
    itself, the GEMM after w8a8_split_on_device): each row of a batch is that row's
    reference result alone (which is bitwise the same in any batch), its int8 part exactly;
    only the float outlier sum may be summed in another order."""
    if path == "split":
        monkeypatch.setattr(qm, "_gemv_plan", lambda *a: None)
    k, n = 128, 40
    packed = qf.quantize_weight(_rand(n, k, seed=9), "w8a8")
    x = _w8a8_batch(m, k)
    y = qm.quant_linear_triton(x, packed)
    alone = torch.cat([qf.quant_linear_reference(x[i:i + 1], packed) for i in range(m)])
    torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-5)
    for i in (0, 1):  # the kernel's own call on one row (m = 1: the GEMV, or GEMM with SPLIT)
        torch.testing.assert_close(y[i:i + 1], qm.quant_linear_triton(x[i:i + 1], packed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,threshold", [(1, 64, 6.0), (3, 300, 6.0), (2, 64, None), (20, 128, 6.0)])
def test_w8a8_split_on_device_equals_the_reference_split(m, k, threshold):
    """The sync-free split (for more than 16 rows) quantizes x bitwise as the reference
    does, and keeps in float exactly each row's outliers (per token), in the columns the
    reference lists."""
    x = _rand(m, k, seed=k)
    x[0, 3], x[-1, k - 1] = 40.0, -9.0
    x[m // 2, 5] = 2.5 * (x[m // 2].abs().max() / 127)  # ... a value on a rounding tie is fine too
    ref_q, ref_s, idx = qf.w8a8_split_activations(x, threshold)
    x_q, x_s, x_out, cols = qm.w8a8_split_on_device(x, threshold)
    assert torch.equal(x_q, ref_q) and torch.equal(x_s, ref_s)
    if threshold is None:
        assert x_out is None and cols is None
        return
    assert torch.equal(cols.nonzero().squeeze(1), idx)
    assert torch.equal(x_out, torch.where(x.abs() > threshold, x, 0.0))
    assert x_out[m // 2, 5] == 0 and x_q[0, 3] == 0 and (m == 1 or x_q[1, 3] != 0)


@pytest.mark.parametrize("scheme,opts", [("w8a8", {}), ("nf4", {}), ("int4", {"group_size": 32})])
def test_quantized_linears_never_wait_for_the_device(scheme, opts):
    """No .item(), nonzero or device->host copy per call (launch_count counts what would
    sync on a GPU): the outlier columns and the NF4 codes stay on the device."""
    from fxforge.runtime.launch_count import LaunchCounter

    packed = qf.quantize_weight(_rand(40, 64), scheme, **opts)
    x = _rand(1, 64)
    x[0, 3] = 40.0
    qm.quant_linear_triton(x, packed)  # compiled and autotuned: on a GPU the tuning launches it many times
    with LaunchCounter() as c:
        y = qm.quant_linear_triton(x, packed)
    assert c.syncs == 0, c.sync_names
    assert c.triton == 1  # w8a8 too: a decode-sized x is split and quantized inside the GEMM
    _assert_matches(y, qf.quant_linear_reference(x, packed), torch.float32)


@pytest.mark.skipif(not qm.INTERPRET, reason="forces the 64-bit specialization by lowering its threshold")
@pytest.mark.parametrize("scheme,opts", [("int8", {}), ("nf4", {"group_size": 32}), ("w8a8", {})])
def test_wide_offsets_specialization_gives_the_same_result(scheme, opts, monkeypatch):
    """Past 2**31 elements the kernels index in 64 bits (WIDE); forced on small tensors here,
    it must compute exactly what the 32-bit kernel does."""
    packed = qf.quantize_weight(_rand(72, 128, seed=2), scheme, **opts)
    x = _rand(33, 128, seed=3)
    narrow = qm.quant_linear_triton(x, packed)
    monkeypatch.setattr(qm, "INDEX_32_LIMIT", 1)
    assert torch.equal(qm.quant_linear_triton(x, packed), narrow)


@pytest.mark.parametrize("m,k", [(1, 64), (5, 300), (16, 128), (17, 128)])
def test_w8a8_in_kernel_split_quantizes_x_bitwise_as_the_reference(m, k):
    """Without outliers the W8A8 output is int32 products times the two scales, in the
    reference's order: equal bits mean the kernel's x_q and x_scale (split inside the GEMM
    up to 16 rows, by torch ops above) are the reference's, rounding ties included."""
    packed = qf.quantize_weight(_rand(40, k, seed=1), "w8a8")
    x = _rand(m, k, seed=k)
    x[0, 5] = 2.5 * (x[0].abs().max() / 127)  # a rounding tie
    ref_q, ref_s, idx = qf.w8a8_split_activations(x, 6.0)
    assert idx is None
    want = (ref_q.double() @ packed.qweight.T.double()).float() * ref_s[:, None] * packed.scale[None, :]
    for threshold in (6.0, None):
        assert torch.equal(qm.w8a8_linear_triton(x, packed.qweight, packed.scale, threshold=threshold), want)
