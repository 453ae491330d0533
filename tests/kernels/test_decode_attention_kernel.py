"""The split-context decode attention kernel (one query per sequence), run through
Triton's interpreter on CPU, against the plain-torch reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels import decode_attention  # noqa: E402
from fxforge.codegen.kernels.decode_attention import (attention_reference, combine_block,  # noqa: E402
                                                      decode_attention_triton, num_splits, split_launch)

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def check(q, k, v, bias=None, scale=0.125):
    out = decode_attention_triton(q, k, v, bias, causal=True, scale=scale)
    ref = attention_reference(q, k, v, bias, causal=True, scale=scale)
    tol = TOL[q.dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    assert out.dtype == q.dtype and out.shape == q.shape


@pytest.mark.parametrize("tk", [1, 15, 16, 37, 130, 515])
@pytest.mark.parametrize("h, hkv", [(4, 4), (9, 3), (4, 1)])
def test_lengths_and_groups(tk, h, hkv):
    # 515 keys: many splits of 16-key chunks in interpreter mode, the last one partial
    q = torch.randn(2, h, 1, 64)
    k, v = torch.randn(2, hkv, tk, 64), torch.randn(2, hkv, tk, 64)
    check(q, k, v)


@pytest.mark.parametrize("d", [16, 48, 80, 128])
def test_head_dims(d):
    q, k, v = torch.randn(1, 2, 1, d), torch.randn(1, 2, 70, d), torch.randn(1, 2, 70, d)
    check(q, k, v, scale=d ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions(dtype):
    q = torch.randn(3, 8, 1, 64, dtype=dtype)
    k, v = torch.randn(3, 2, 100, 64, dtype=dtype), torch.randn(3, 2, 100, 64, dtype=dtype)
    check(q, k, v)


def test_strided_cache_views_and_padding_bias():
    # the runtime hands the kernel a prefix view of a bigger cache buffer, and a per-row
    # key bias with very negative values on left-padding keys
    cache_k, cache_v = torch.randn(2, 3, 256, 64), torch.randn(2, 3, 256, 64)
    k, v = cache_k[:, :, :90], cache_v[:, :, :90]
    q = torch.randn(2, 9, 1, 64)
    bias = torch.zeros(2, 1, 1, 90)
    bias[1, ..., :40] = torch.finfo(torch.float32).min
    check(q, k, v, bias)
    # row 1 equals attention over its unpadded keys only
    alone = decode_attention_triton(q[1:], k[1:, :, 40:], v[1:, :, 40:], causal=True, scale=0.125)
    full = decode_attention_triton(q, k, v, bias, causal=True, scale=0.125)
    torch.testing.assert_close(full[1:], alone, atol=1e-5, rtol=0)


def test_splits_cover_the_context():
    for bkv, tk, programs in [(1, 1000, 528), (96, 100, 528), (3, 5, 8), (2, 8192, 528)]:
        chunk, splits = num_splits(bkv, tk, 64, programs)
        assert chunk % 64 == 0 and chunk * splits >= tk and chunk * (splits - 1) < tk
    assert num_splits(1, 4096, 64, 528)[1] > 1  # a single sequence still spreads out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_256(dtype):
    # Gemma's head dim: the GPU launch takes fewer keys per block here (split_launch)
    q = torch.randn(1, 4, 1, 256, dtype=dtype)
    k, v = torch.randn(1, 2, 75, 256, dtype=dtype), torch.randn(1, 2, 75, 256, dtype=dtype)
    check(q, k, v, scale=256 ** -0.5)


def test_wide_heads_take_smaller_key_blocks():
    # the split kernel is launched without autotuning: its one config must fit every GPU
    # (docs/gpu-compile.md); 64 keys wherever K and V tiles stay within 16 KB each
    assert split_launch(torch.float16, 128)["BLOCK_N"] == 64 and split_launch(torch.float32, 64)["BLOCK_N"] == 64
    assert split_launch(torch.float32, 256)["BLOCK_N"] == 16 and split_launch(torch.bfloat16, 256)["BLOCK_N"] == 32
    assert combine_block(3) == 4 and combine_block(500) == 32


def test_many_splits_combine_in_several_passes(monkeypatch):
    # a GPU with many multiprocessors splits a long context into more chunks than one
    # combine block holds: the combine kernel loops over them
    monkeypatch.setattr(decode_attention, "_programs", lambda device: 512)
    q, k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 1, 1000, 32), torch.randn(1, 1, 1000, 32)
    assert num_splits(1, 1000, 16, 512)[1] > combine_block(10 ** 6)
    check(q, k, v)


def test_bad_shapes():
    with pytest.raises(ValueError, match="one query"):
        decode_attention_triton(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16),
                                causal=True, scale=1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention_triton(torch.randn(1, 3, 1, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16),
                                causal=True, scale=1.0)


# -- variants: soft-cap, sliding window, ALiBi slopes ------------------------------------------
from eager_attention import alibi_slopes, check_variant_kernel, narrow_then_wide  # noqa: E402


def check_variant(q, k, v, bias=None, *, scale=0.125, softcap=None, window=None, slopes=None):
    out = check_variant_kernel(decode_attention_triton, attention_reference, TOL[q.dtype], q, k, v, bias,
                               slopes=slopes, causal=True, scale=scale, softcap=softcap, window=window)
    assert out.shape == q.shape


@pytest.mark.parametrize("tk", [1, 37, 130])
@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 1)])
def test_softcap(tk, h, hkv):
    q, k, v = torch.randn(2, h, 1, 32) * 4, torch.randn(2, hkv, tk, 32) * 4, torch.randn(2, hkv, tk, 32)
    check_variant(q, k, v, softcap=5.0)


@pytest.mark.parametrize("tk", [3, 37, 130])
@pytest.mark.parametrize("window", [1, 16, 40])
def test_sliding_window(tk, window):
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, tk, 32), torch.randn(2, 2, tk, 32)
    pad = torch.zeros(2, 1, 1, tk)
    pad[1, ..., :2] = float("-inf")
    check_variant(q, k, v, pad, window=window)


def test_sliding_window_reads_only_the_window():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    k[:, :, :40], v[:, :, :40] = float("nan"), float("nan")  # before the window of 10
    out = decode_attention_triton(q, k, v, causal=True, scale=0.3, window=10)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_reference(q, k[:, :, 40:], v[:, :, 40:], causal=True, scale=0.3),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("tk", [1, 37, 130])
@pytest.mark.parametrize("h, hkv", [(4, 4), (8, 2)])
def test_alibi_slopes(tk, h, hkv):
    q, k, v = torch.randn(2, h, 1, 32), torch.randn(2, hkv, tk, 32), torch.randn(2, hkv, tk, 32)
    check_variant(q, k, v, slopes=alibi_slopes(h))


def test_all_variants_together_in_bf16():
    q, k, v = (torch.randn(2, 4, 1, 64, dtype=torch.bfloat16), torch.randn(2, 2, 70, 64, dtype=torch.bfloat16),
               torch.randn(2, 2, 70, 64, dtype=torch.bfloat16))
    check_variant(q, k, v, softcap=2.0, window=33, slopes=alibi_slopes(4))


# -- one split: the split kernel writes the output, no combine launch -------------------------
from fxforge.runtime.launch_count import LaunchCounter  # noqa: E402


def launches(fn, *args, **kwargs):
    """(fn's result, its Triton launches by kernel name)."""
    with LaunchCounter() as c:
        out = fn(*args, **kwargs)
    return out, {name.split(".", 1)[1]: n for name, n in c.by_name.items() if name.startswith("triton.")}


def test_a_short_context_is_one_launch_a_long_one_two():
    q = torch.randn(1, 4, 1, 32)
    short = torch.randn(1, 2, 15, 32)  # one 16-key chunk: one split
    long = torch.randn(1, 2, 515, 32)  # spread over the interpreter's 8 programs
    _, n = launches(decode_attention_triton, q, short, short, causal=True, scale=0.2)
    assert n == {"_decode_split_kernel": 1}
    _, n = launches(decode_attention_triton, q, long, long, causal=True, scale=0.2)
    assert n == {"_decode_split_kernel": 1, "_decode_combine_kernel": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("variant", ["plain", "all"])
def test_one_split_writes_what_several_splits_combine(dtype, h, hkv, variant, monkeypatch):
    # one program per KV head forces a single split over all 150 keys; 64 programs split
    # them, also within the window (100 keys) and with a GPU's 64-key blocks
    q, k, v = (torch.randn(2, h, 1, 32, dtype=dtype), torch.randn(2, hkv, 150, 32, dtype=dtype),
               torch.randn(2, hkv, 150, 32, dtype=dtype))
    bias = torch.zeros(2, 1, 1, 150)
    bias[1, ..., :9] = torch.finfo(torch.float32).min  # left padding
    kw = dict(causal=True, scale=0.2)
    if variant == "all":
        kw.update(softcap=3.0, window=100, alibi=True)
        args = (q, k, v, bias, alibi_slopes(h))
    else:
        args = (q, k, v, bias)
    outs = {}
    for programs, expected in ((1, 1), (64, 2)):
        monkeypatch.setattr(decode_attention, "_programs", lambda device, p=programs: p)
        outs[programs], n = launches(decode_attention_triton, *args, **kw)
        assert sum(n.values()) == expected, n
    ref = attention_reference(*args, **kw)
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    for out in outs.values():
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)


def test_one_split_rows_that_see_no_key_give_zeros(monkeypatch):
    # every key masked: the split kernel's normalisation must not divide by a zero sum
    monkeypatch.setattr(decode_attention, "_programs", lambda device: 1)
    q, k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    bias = torch.zeros(2, 1, 1, 20)
    bias[0] = float("-inf")
    out = decode_attention_triton(q, k, v, bias, causal=True, scale=0.3)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], attention_reference(q[1:], k[1:], v[1:], causal=True, scale=0.3),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("programs", [1, 8], ids=["one-split", "splits"])
def test_rows_whose_every_key_has_finfo_min_average_them_as_eager(programs, monkeypatch):
    # eager's softmax(scores + finfo.min) over a row masked throughout is the uniform
    # average (every score rounds to finfo.min); the scaled bias must stay finite, in the
    # splits and in their combination
    monkeypatch.setattr(decode_attention, "_programs", lambda device: programs)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    bias = torch.zeros(3, 1, 1, 40)
    bias[0] = torch.finfo(torch.float32).min
    bias[1, ..., :25] = torch.finfo(torch.float32).min
    bias[2] = float("-inf")  # sees no key: zeros, as before
    out = decode_attention_triton(q, k, v, bias, causal=True, scale=0.3)
    torch.testing.assert_close(out[0], v[0].repeat_interleave(2, 0).mean(1, keepdim=True), atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1:2], attention_reference(q[1:2], k[1:2], v[1:2], bias[1:2], causal=True,
                                                             scale=0.3), atol=2e-5, rtol=0)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


# -- CUDA's grid limits: axes 1 and 2 stop at 65535 programs -----------------------------------
from launch_spy import LaunchSpy, over_cuda_limits, small_and_huge_caches  # noqa: E402

from fxforge.codegen.kernels.decode_attention import decode_grids  # noqa: E402


def test_splits_stay_within_grid_axis_1():
    # a very long context on a (hypothetical) huge GPU: the splits are axis 1 of the grid
    chunk, splits = num_splits(1, 10 ** 8, 16, 10 ** 9)
    assert splits <= 65535 and chunk * splits >= 10 ** 8 and chunk % 16 == 0
    for bkv, tk, programs in [(1, 10 ** 8, 10 ** 9), (2 ** 20, 4096, 528), (7, 3 * 10 ** 6, 10 ** 7)]:
        _, splits = num_splits(bkv, tk, 16, programs)
        for grid in decode_grids(bkv, 8, 1, splits):
            assert not over_cuda_limits(grid), grid


def test_grids_of_a_huge_batch_times_heads_stay_in_cuda_limits():
    split_grid, combine_grid = decode_grids(70_000, 32, 8, 40)
    assert split_grid == (70_000 * 8, 40) and combine_grid == (70_000 * 32,)
    assert not over_cuda_limits(split_grid) and not over_cuda_limits(combine_grid)


def test_the_wrapper_launches_a_huge_batch_within_the_limits(monkeypatch):
    split, combine = LaunchSpy(), LaunchSpy()  # record the grids, run nothing
    monkeypatch.setattr(decode_attention, "_decode_split_kernel", split)
    monkeypatch.setattr(decode_attention, "_decode_combine_kernel", combine)
    monkeypatch.setattr(decode_attention, "_programs", lambda device: 10 ** 6)
    q = torch.empty(70_000, 2, 1, 16, dtype=torch.float16)  # nothing runs: values do not matter
    k = torch.empty(70_000, 1, 130, 16, dtype=torch.float16)  # several splits, also of a GPU's 64 keys
    decode_attention_triton(q, k, k, causal=True, scale=0.1)
    grids = [g for spy in (split, combine) for gs, _ in spy.launches for g in gs]
    assert len(grids) == 2 and not any(over_cuda_limits(g) for g in grids), grids


# -- 64-bit offsets (WIDE) for tensors of 2**31 elements or more -------------------------------
from fxforge.codegen.kernels import attention as attention_module  # noqa: E402


def test_the_wrapper_widens_only_past_2_31_elements(monkeypatch):
    split, combine = LaunchSpy(), LaunchSpy()  # meta tensors: record the launches, run nothing
    monkeypatch.setattr(decode_attention, "_decode_split_kernel", split)
    monkeypatch.setattr(decode_attention, "_decode_combine_kernel", combine)
    monkeypatch.setattr(decode_attention, "_programs", lambda device: 64)  # several splits: both kernels
    q, caches = small_and_huge_caches(1)
    for k in caches:
        decode_attention_triton(q, k, k, causal=True, scale=0.1)
    assert [kw["WIDE"] for _, kw in split.launches] == [False, True]
    assert [kw["WIDE"] for _, kw in combine.launches] == [False, True]


@pytest.mark.parametrize("programs", [1, 64], ids=["one-split", "splits"])
@pytest.mark.parametrize("variant", ["plain", "all"])
def test_wide_offsets_specialization_gives_the_same_result(programs, variant, monkeypatch):
    """Past 2**31 elements the kernels index in 64 bits (WIDE); forced on small tensors
    here, they must compute exactly what the 32-bit kernels do."""
    monkeypatch.setattr(decode_attention, "_programs", lambda device: programs)
    split = LaunchSpy(decode_attention._decode_split_kernel)
    combine = LaunchSpy(decode_attention._decode_combine_kernel)
    monkeypatch.setattr(decode_attention, "_decode_split_kernel", split)
    monkeypatch.setattr(decode_attention, "_decode_combine_kernel", combine)
    # 150 keys, a window of 100: several splits also with a GPU's 64-key blocks
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 150, 32), torch.randn(2, 2, 150, 32)
    narrow, wide = narrow_then_wide(decode_attention_triton, q, k, v, torch.randn(2, 1, 1, 150), variant, 100,
                                    attention_module, monkeypatch)
    assert [launch["WIDE"] for _, launch in split.launches] == [False, True]
    assert [launch["WIDE"] for _, launch in combine.launches] == ([] if programs == 1 else [False, True])
    assert torch.equal(wide, narrow)


def test_a_head_dim_strided_past_2_31_is_refused():
    k = torch.empty(2 ** 32, device="meta").as_strided((1, 2, 5, 64), (1, 1, 64, 2 ** 26))
    q = torch.empty(1, 2, 1, 64, device="meta")
    with pytest.raises(ValueError, match="head-dim stride"):
        decode_attention_triton(q, k, k, causal=True, scale=0.1)
