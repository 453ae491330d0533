"""The Triton FlashAttention kernel, run through Triton's interpreter on CPU, against the
plain-torch reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels.attention import attention_reference, attention_triton  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make(b, h, hkv, tq, tk, d, dtype=torch.float32):
    return (torch.randn(b, h, tq, d, dtype=dtype), torch.randn(b, hkv, tk, d, dtype=dtype),
            torch.randn(b, hkv, tk, d, dtype=dtype))


def check(q, k, v, bias=None, causal=False, scale=0.17):
    out = attention_triton(q, k, v, bias, causal=causal, scale=scale)
    ref = attention_reference(q, k, v, bias, causal=causal, scale=scale)
    tol = TOL[q.dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],)


@pytest.mark.parametrize("d", [16, 64, 80, 128])
@pytest.mark.parametrize("h, hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grid_fp32(d, h, hkv, causal, with_bias):
    q, k, v = make(2, h, hkv, 19, 19, d)  # 19: not a multiple of the 16-wide blocks
    bias = torch.randn(2, h, 19, 19) if with_bias else None
    check(q, k, v, bias, causal)


@pytest.mark.parametrize("tq, tk", [(1, 37), (5, 37), (16, 16), (33, 40), (7, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_tq_differs_from_tk(tq, tk, causal):
    # causal is bottom-right aligned: the tq queries are the last tq positions of tk keys
    q, k, v = make(1, 4, 2, tq, tk, 64)
    check(q, k, v, None, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precisions(dtype, causal):
    q, k, v = make(2, 4, 2, 21, 21, 64, dtype)
    check(q, k, v, None, causal)


@pytest.mark.parametrize("d", [96, 256])
def test_more_head_dims(d):
    q, k, v = make(1, 2, 1, 9, 9, d)
    check(q, k, v, None, True)


def test_broadcast_padding_bias_with_minus_inf():
    q, k, v = make(2, 4, 4, 12, 12, 32)
    pad = torch.zeros(2, 1, 1, 12)
    pad[0, ..., :5] = float("-inf")  # left padding of sequence 0
    check(q, k, v, pad, causal=True)


def test_rows_that_see_no_key_give_zeros_not_nan():
    q, k, v = make(1, 2, 2, 4, 6, 16)
    bias = torch.zeros(1, 1, 4, 6)
    bias[..., 1, :] = float("-inf")
    out = attention_triton(q, k, v, bias, causal=False, scale=0.3)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()


def eager_softmax_attention(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v as a model spells it (float32, no GQA)."""
    return ((q.float() @ k.float().transpose(-2, -1)) * scale + bias).softmax(-1) @ v.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_whose_every_key_has_finfo_min_average_them_as_eager(dtype):
    # HF's mask fill: every masked score rounds to finfo.min, so eager's softmax of a row
    # masked throughout is the uniform average; bias * log2 e must not overflow to -inf
    # (that gave zeros); a -inf row still gives zeros, as before
    q, k, v = make(2, 2, 2, 5, 21, 16, dtype)
    bias = torch.zeros(2, 2, 5, 21)
    bias[..., :3] = torch.finfo(dtype).min  # visible keys: these get exactly no weight
    bias[0, :, 1] = torch.finfo(dtype).min  # rows with every key masked
    bias[1, 0, 4] = torch.finfo(dtype).min
    bias[1, 1, 2] = float("-inf")
    bias = bias.to(dtype)
    out = attention_triton(q, k, v, bias, causal=False, scale=0.3)
    want = eager_softmax_attention(q, k, v, bias.float(), 0.3)
    want[1, 1, 2] = 0.0
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(out[0, :, 1].float(), v[0].float().mean(1), atol=TOL[dtype], rtol=0)


def test_non_contiguous_inputs():
    # q/k/v as transposes of [B, T, H, D]: strided, no copy
    x = torch.randn(2, 13, 4, 3 * 32)
    q, k, v = (t.transpose(1, 2) for t in x.split(32, dim=-1))
    assert not q.is_contiguous()
    check(q, k, v, None, True)


def test_clear_errors():
    q, k, v = make(1, 3, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="3 query heads is not a multiple of 2 kv heads"):
        attention_triton(q, k, v, causal=False, scale=1.0)
    q, k, v = make(1, 2, 2, 4, 4, 16)
    with pytest.raises(ValueError, match=r"q must be \[B, H, T, D\]"):
        attention_triton(q[0], k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_triton(q, k, v, torch.zeros(3, 1, 1, 4), causal=False, scale=1.0)


# -- variants: soft-cap, sliding window, ALiBi slopes (each against the reference and an eager
# spelling that shares no code with either) ---------------------------------------------------
from eager_attention import alibi_slopes, check_variant_kernel, narrow_then_wide  # noqa: E402


def check_variant(q, k, v, bias=None, *, causal=True, scale=0.17, softcap=None, window=None, slopes=None):
    check_variant_kernel(attention_triton, attention_reference, TOL[q.dtype], q, k, v, bias, slopes=slopes,
                         causal=causal, scale=scale, softcap=softcap, window=window)


@pytest.mark.parametrize("tq, tk", [(19, 19), (5, 37), (1, 40)])
@pytest.mark.parametrize("h, hkv", [(4, 2), (2, 2)])
def test_softcap(tq, tk, h, hkv):
    q, k, v = make(2, h, hkv, tq, tk, 32)
    check_variant(q * 4, k * 4, v, softcap=5.0)  # large scores: the cap matters


@pytest.mark.parametrize("tq, tk", [(40, 40), (7, 40), (1, 37), (33, 33)])
@pytest.mark.parametrize("window", [1, 4, 17, 64])
def test_sliding_window(tq, tk, window):
    q, k, v = make(1, 4, 2, tq, tk, 32)
    check_variant(q, k, v, window=window)


def test_sliding_window_skips_key_blocks_before_it():
    # 64 keys in 16-wide blocks: the last query block's window starts in block 2; poison the
    # keys of blocks 0-1 that the window excludes with NaN: read, they would spread NaN
    q, k, v = make(1, 2, 2, 64, 64, 16)
    k[:, :, :32], v[:, :, :32] = float("nan"), float("nan")
    out = attention_triton(q[:, :, 48:], k, v, causal=True, scale=0.2, window=8)
    ref = attention_reference(q[:, :, 48:], k[:, :, 32:], v[:, :, 32:], causal=True, scale=0.2, window=8)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("tq, tk", [(19, 19), (5, 37), (1, 23)])
@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 1)])
def test_alibi_slopes(tq, tk, h, hkv):
    q, k, v = make(2, h, hkv, tq, tk, 32)
    check_variant(q, k, v, slopes=alibi_slopes(h))


def test_all_variants_together_with_a_padding_bias_in_half_precision():
    q, k, v = make(2, 4, 2, 21, 30, 64, torch.float16)
    pad = torch.zeros(2, 1, 1, 30, dtype=torch.float16)
    pad[1, ..., :6] = float("-inf")
    check_variant(q, k, v, pad, softcap=3.0, window=9, slopes=alibi_slopes(4))


def test_variant_errors():
    q, k, v = make(1, 4, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="slopes must be"):
        attention_triton(q, k, v, torch.ones(3), causal=True, scale=1.0, alibi=True)
    with pytest.raises(ValueError, match="window must be"):
        attention_triton(q, k, v, causal=True, scale=1.0, window=0)


# -- CUDA's grid limits: axes 1 and 2 stop at 65535 programs -----------------------------------
import math  # noqa: E402

import triton  # noqa: E402
from launch_spy import LaunchSpy, over_cuda_limits, small_and_huge_caches  # noqa: E402

from fxforge.codegen.kernels import attention as attention_module  # noqa: E402
from fxforge.codegen.kernels.attention import attention_grid  # noqa: E402


@pytest.mark.parametrize("tq, batch_heads, block_m", [(1, 70_000, 16), (4096, 2 ** 20, 128), (37, 65_536 * 64, 16),
                                                      (3_000_000, 64, 32), (5, 1, 16)])
def test_grid_of_a_huge_batch_times_heads_stays_in_cuda_limits(tq, batch_heads, block_m):
    grid = attention_grid(tq, batch_heads, block_m)
    assert not over_cuda_limits(grid), grid
    assert math.prod(grid) == triton.cdiv(tq, block_m) * batch_heads  # one program per (query block, b, h)


def test_a_grid_past_every_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="axis 0"):
        attention_grid(2 ** 20, 2 ** 20, 16)


def test_the_wrapper_launches_more_than_65535_batch_heads_within_the_limits(monkeypatch):
    spy = LaunchSpy()  # records the grid instead of running 140000 programs in the interpreter
    monkeypatch.setattr(attention_module, "_attention_kernel", spy)
    q, k, v = make(70_000, 2, 1, 3, 5, 16, torch.float16)
    attention_triton(q, k, v, causal=True, scale=0.1)
    (grids, _), = spy.launches
    assert grids and not any(over_cuda_limits(g) for g in grids), grids


@pytest.mark.parametrize("tq, tk, h, hkv", [(40, 40, 3, 1), (1, 23, 2, 2), (17, 50, 4, 2)])
def test_every_query_block_of_every_head_is_computed(tq, tk, h, hkv):
    # the folded grid: query blocks vary fastest, then batch x head; a wrong fold would leave
    # some (block, head) unwritten or write one twice
    q, k, v = make(3, h, hkv, tq, tk, 32)
    check(q, k, v, causal=True)


# -- 64-bit offsets (WIDE) for tensors of 2**31 elements or more -------------------------------
from fxforge.codegen.kernels.attention import needs_wide, span  # noqa: E402


def test_span_is_what_offsets_reach():
    cache = torch.empty(8, 8, 2 ** 23, 64, device="meta")  # 2**35 elements, never allocated
    prefix = cache[:, :, :100]  # few elements, but its rows are a whole cache apart
    assert prefix.numel() < 2 ** 31 <= span(prefix) and needs_wide(prefix)
    assert span(torch.empty(3, 5)) == 15 and span(torch.empty(3, 0)) == 0
    assert span(torch.empty(1, 1, 1, 7).expand(2 ** 20, 64, 1, 7)) == 7  # broadcast dims add nothing
    assert not needs_wide(torch.empty(2 ** 31 - 1, device="meta"), None)
    assert needs_wide(torch.empty(2 ** 31, device="meta"))


def test_a_head_dim_strided_past_2_31_is_refused():
    # head-dim offsets stay 32-bit in every specialization: such a layout would read the
    # wrong memory, so the wrapper refuses it
    q = torch.empty(2 ** 32, device="meta").as_strided((1, 2, 1, 64), (1, 1, 1, 2 ** 26))
    k = torch.empty(1, 2, 5, 64, device="meta")
    with pytest.raises(ValueError, match="head-dim stride"):
        attention_triton(q, k, k, causal=True, scale=0.1)


def test_the_wrapper_widens_only_past_2_31_elements(monkeypatch):
    spy = LaunchSpy()  # meta tensors: record the launch, run nothing
    monkeypatch.setattr(attention_module, "_attention_kernel", spy)
    q, caches = small_and_huge_caches(7)
    for k in caches:
        attention_triton(q, k, k, causal=True, scale=0.1)
    assert [kw["WIDE"] for _, kw in spy.launches] == [False, True]


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_wide_offsets_specialization_gives_the_same_result(variant, monkeypatch):
    """Past 2**31 elements the kernel indexes in 64 bits (WIDE); forced on small tensors
    here, it must compute exactly what the 32-bit kernel does."""
    spy = LaunchSpy(attention_module._attention_kernel)
    monkeypatch.setattr(attention_module, "_attention_kernel", spy)
    q, k, v = make(2, 4, 2, 37, 45, 32)
    narrow, wide = narrow_then_wide(attention_triton, q, k, v, torch.randn(2, 1, 37, 45), variant, 20,
                                    attention_module, monkeypatch)
    assert [launch["WIDE"] for _, launch in spy.launches] == [False, True]
    if q.is_cuda:  # WIDE is part of the autotuner's key: each may pick other tiles (another summation order)
        torch.testing.assert_close(wide, narrow, atol=TOL[q.dtype], rtol=0)
    else:
        assert torch.equal(wide, narrow)


# -- what the kernels do not take, and inputs with no rows, through the backends --------------
import torch.nn.functional as F  # noqa: E402

import fxforge  # noqa: E402
from fxforge.runtime.backends.triton_backend import attention_dispatch  # noqa: E402
from fxforge.runtime.torch_kernels import attention_sdpa  # noqa: E402


@pytest.mark.parametrize("b, h, hkv, tq", [(0, 4, 2, 5), (2, 0, 0, 5), (2, 4, 2, 0), (0, 4, 2, 1), (1, 0, 0, 1)],
                         ids=["no-batch", "no-heads", "no-queries", "decode-no-batch", "decode-no-heads"])
@pytest.mark.parametrize("kernel", [attention_dispatch, attention_sdpa], ids=["triton", "sdpa"])
def test_no_query_rows_give_the_empty_result(b, h, hkv, tq, kernel):
    # heads folded with an empty batch ([1, B*H, T, D] with B = 0) leave 0 KV heads: the
    # head ratio must not divide by them
    q, k, v = torch.randn(b, h, tq, 16), torch.randn(b, hkv, 7, 16), torch.randn(b, hkv, 7, 8)
    out = kernel(q, k, v, None, causal=True, scale=0.3)
    assert out.shape == (b, h, tq, 8) and out.dtype == q.dtype


@pytest.mark.parametrize("tq, bias", [(5, False), (5, True), (1, False), (1, True)])
@pytest.mark.parametrize("kernel", [attention_dispatch, attention_sdpa], ids=["triton", "sdpa"])
def test_values_of_another_head_dim_than_the_queries(tq, bias, kernel):
    # DeepSeek's MLA: q and k of head dim 192, v of 128 (here 24 and 16), GQA; the
    # kernels take one head dim, so the backend runs SDPA for these
    q, k, v = torch.randn(2, 4, tq, 24), torch.randn(2, 2, 9, 24), torch.randn(2, 2, 9, 16)
    mask = torch.randn(2, 1, tq, 9) if bias else None
    out = kernel(q, k, v, mask, causal=True, scale=0.2)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, causal=True, scale=0.2), atol=2e-5, rtol=0)


class _FoldedEmptyBatch(torch.nn.Module):
    def forward(self, x):
        return (x @ x.transpose(1, 2)).softmax(-1) @ x


class _ValueHeadDim(torch.nn.Module):
    def forward(self, x):
        b, t, _ = x.shape
        q = x.view(b, t, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q.flip(-1), q[..., :4], is_causal=True).transpose(1, 2).reshape(b, t, 8)


# the kernels run where the suite compiled them: the interpreter on the CPU, "triton" under
# FXFORGE_TEST_DEVICE=cuda (an "interpret" backend needs TRITON_INTERPRET=1 at import)
@pytest.mark.parametrize("backend", ["torch", "triton" if os.environ.get("FXFORGE_TEST_DEVICE") == "cuda" else "interpret"])
def test_an_empty_batch_is_refused_and_a_value_head_dim_of_its_own_runs_as_eager(backend):
    fast = fxforge.optimize(_FoldedEmptyBatch().eval(), (torch.randn(2, 6, 8),), backend=backend, verbose=False)
    # an empty batch is refused by name (capture proves sizes >= 1; a model may branch on 0),
    # not a crash inside the kernel
    with pytest.raises(ValueError, match=r"has size 0 in dim 0 .*: the optimized graph serves sizes of at least 1"):
        fast(torch.randn(0, 3, 8))
    model, x = _ValueHeadDim().eval(), torch.randn(2, 6, 16)
    fast = fxforge.optimize(model, (x,), backend=backend, verbose=False)
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
