"""The paged reads of the prefill and decode attention kernels (K/V gathered through a
block table from each row's start), run through Triton's interpreter on CPU, against the
torch reference paged_attention_reference (a dense gather, then attention_reference)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels.attention import paged_attention_triton  # noqa: E402
from fxforge.codegen.kernels.decode_attention import paged_decode_attention_triton  # noqa: E402
from fxforge.ir.ops import gather_paged, paged_attention_reference  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def paged_case(starts, keys, tq, h=4, hkv=2, d=32, page=4, dtype=torch.float32, seed=0):
    """Rows with left padding `starts` over `keys` keys; each row's blocks are scattered
    over the pool (shuffled ids), the table wider than any row needs."""
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the case is built on the CPU, then moved
    b = len(starts)
    per_row = [-(-(keys - s) // page) for s in starts]
    width = max(per_row) + 1
    pool = sum(per_row) + 3
    ids = torch.randperm(pool, generator=gen, device="cpu")
    table = torch.zeros(b, width, dtype=torch.int32, device="cpu")
    at = 0
    for i, n in enumerate(per_row):
        table[i, :n] = ids[at:at + n].int()
        at += n
    kc = torch.randn(pool, page, hkv, d, generator=gen, device="cpu").to(dtype)
    vc = torch.randn(pool, page, hkv, d, generator=gen, device="cpu").to(dtype)
    q = torch.randn(b, h, tq, d, generator=gen, device="cpu").to(dtype)
    row_start = torch.tensor(starts, dtype=torch.int32, device="cpu")
    bias = torch.zeros(b, 1, 1, keys, device="cpu")
    for i, s in enumerate(starts):
        bias[i, ..., :s] = torch.finfo(torch.float32).min
    # where the kernels run: the default device (CUDA under FXFORGE_TEST_DEVICE=cuda)
    return tuple(t.to(torch.get_default_device()) for t in (q, kc, vc, table, row_start, bias))


def check(kernel, q, kc, vc, table, row_start, bias, slopes=None, **variant):
    attrs = {"causal": True, "scale": 0.2, **variant}
    args = (q, kc, vc, table, row_start, bias) + ((slopes,) if slopes is not None else ())
    out = kernel(*args, **attrs)
    ref = paged_attention_reference(*args, **attrs)
    tol = TOL[q.dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("starts, keys", [([0], 4), ([0], 37), ([3, 0, 9], 23), ([5, 17], 40)],
                         ids=["one-block", "several-blocks", "unaligned-starts", "long-padding"])
@pytest.mark.parametrize("h, hkv", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_decode_reads_through_the_table(starts, keys, h, hkv):
    check(paged_decode_attention_triton, *paged_case(starts, keys, 1, h, hkv))


@pytest.mark.parametrize("starts, keys, tq", [([0], 37, 37), ([3, 0, 9], 23, 5), ([2, 6], 30, 30)],
                         ids=["whole-prompt", "chunk-after-cache", "padded-prefill"])
@pytest.mark.parametrize("h, hkv", [(4, 2), (6, 1)], ids=["gqa", "mqa"])
def test_prefill_reads_through_the_table(starts, keys, tq, h, hkv):
    check(paged_attention_triton, *paged_case(starts, keys, tq, h, hkv))


@pytest.mark.parametrize("tq", [1, 6])
@pytest.mark.parametrize("variant", ["softcap", "window", "alibi"])
def test_variants(tq, variant):
    q, kc, vc, table, start, bias = paged_case([3, 0], 29, tq, h=4, hkv=2)
    slopes = None
    attrs = {}
    if variant == "softcap":
        attrs["softcap"] = 2.0
    elif variant == "window":
        attrs["window"] = 7
    else:
        slopes, attrs["alibi"] = torch.tensor([0.5, 0.25, 0.125, 0.0625]), True
    kernel = paged_decode_attention_triton if tq == 1 else paged_attention_triton
    check(kernel, q, kc, vc, table, start, bias, slopes, **attrs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    for tq, kernel in ((1, paged_decode_attention_triton), (5, paged_attention_triton)):
        check(kernel, *paged_case([1, 4], 21, tq, dtype=dtype))


def test_a_narrower_cache_is_cast_to_the_queries_dtype():
    q, kc, vc, table, start, bias = paged_case([2], 19, 1)
    check(paged_decode_attention_triton, q, kc.half(), vc.half(), table, start, bias)


def test_the_gather_places_each_rows_tokens_from_its_start():
    """Row b's key j is its token j - start[b]: block table[b, t // page], offset t % page."""
    cache = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2, 1, 1)  # slot s holds s
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    dense = gather_paged(cache, table, torch.tensor([1, 0]), 5)[:, 0, :, 0]
    assert dense.tolist() == [[0, 8, 9, 2, 3], [4, 5, 10, 11, 6]]  # row 0: padding, then blocks 4, 1


@pytest.mark.parametrize("tq", [1, 6])
def test_a_row_whose_every_key_has_finfo_min_averages_them_as_the_reference(tq):
    # the reference (eager's softmax) averages a row masked throughout with finfo.min over
    # every key, its padding read as 0 included; the kernels' scaled bias must stay finite
    q, kc, vc, table, start, bias = paged_case([3, 0], 21, tq, h=4, hkv=2)
    bias[0] = torch.finfo(torch.float32).min
    check(paged_decode_attention_triton if tq == 1 else paged_attention_triton, q, kc, vc, table, start, bias,
          causal=False)


def test_clear_errors():
    q, kc, vc, table, start, bias = paged_case([0], 8, 1)
    with pytest.raises(ValueError, match="block_table must be"):
        paged_decode_attention_triton(q, kc, vc, table[0], start, bias, causal=True, scale=0.1)
    with pytest.raises(ValueError, match="needs the key bias"):
        paged_attention_triton(q, kc, vc, table, start, None, causal=True, scale=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, hkv", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("programs, launches", [(1, 1), (64, 2)], ids=["one-split", "splits"])
def test_decode_one_split_writes_the_output_itself(dtype, h, hkv, programs, launches, monkeypatch):
    """One split (one program per KV head): the split kernel normalises and writes the
    output, no combine launch; every variant at once, through the table."""
    from fxforge.codegen.kernels import decode_attention
    from fxforge.runtime.launch_count import LaunchCounter

    monkeypatch.setattr(decode_attention, "_programs", lambda device: programs)
    # 150 keys, a window of 100: several splits also with a GPU's 64-key blocks
    q, kc, vc, table, start, bias = paged_case([3, 0], 150, 1, h=h, hkv=hkv, dtype=dtype)
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)])
    with LaunchCounter() as c:
        check(paged_decode_attention_triton, q, kc, vc, table, start, bias, slopes, softcap=2.0, window=100,
              alibi=True)
    assert c.triton == launches and (c.by_name["triton._decode_combine_kernel"] == 1) == (launches == 2)


@pytest.mark.parametrize("tq, programs", [(1, 1), (1, 64), (6, 8)],
                         ids=["decode-one-split", "decode-splits", "prefill"])
def test_wide_offsets_specialization_gives_the_same_result(tq, programs, monkeypatch):
    """Past 2**31 elements (a big paged pool) the kernels index in 64 bits (WIDE), the slots
    too; forced on small tensors here, they must compute exactly what the 32-bit kernels do."""
    from launch_spy import LaunchSpy

    from fxforge.codegen.kernels import attention, decode_attention

    monkeypatch.setattr(decode_attention, "_programs", lambda device: programs)
    module, name = (decode_attention, "_decode_split_kernel") if tq == 1 else (attention, "_attention_kernel")
    spy = LaunchSpy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    q, kc, vc, table, start, bias = paged_case([3, 0], 29, tq, h=4, hkv=2)
    kernel = paged_decode_attention_triton if tq == 1 else paged_attention_triton
    args = (q, kc, vc, table, start, bias, torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    kw = dict(causal=True, scale=0.2, softcap=2.0, window=11, alibi=True)
    narrow = kernel(*args, **kw)
    monkeypatch.setattr(attention, "INDEX_32_LIMIT", 1)
    wide = kernel(*args, **kw)
    assert [launch["WIDE"] for _, launch in spy.launches] == [False, True]
    if q.is_cuda and tq > 1:  # WIDE is in the prefill autotuner's key: each may pick other tiles
        torch.testing.assert_close(wide, narrow, atol=2e-5, rtol=0)
    else:
        assert torch.equal(wide, narrow)
