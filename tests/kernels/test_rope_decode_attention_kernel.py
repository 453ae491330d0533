"""The rope decode attention kernel (codegen/kernels/rope_decode_attention.py) against the
unfused composition (rope_attention_reference: rotary, kv_append, attention) in float32,
and against a float64 reference written here in bfloat16: one split and several, GQA,
a left-padded batch of 2, a few query positions, the cache length as an int and as a 0-d
device tensor (the static decode step). The caches must get exactly the rotated K and V."""
import pytest
import torch

from fxforge.codegen.kernels.rope_decode_attention import rope_attention_reference, rope_decode_attention_triton
from fxforge.runtime.backends.triton_backend import TritonBackend


def _problem(b=2, h=4, hkv=2, t=1, d=16, start=21, capacity=40, dtype=torch.float32, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)  # a CPU generator: the case is built on the CPU, then moved
    dev = torch.get_default_device()  # where the kernels run (CUDA under FXFORGE_TEST_DEVICE=cuda)

    def draw(*shape):
        return torch.randn(*shape, generator=g, device="cpu").to(dev)

    q = draw(b, t, h, d).to(dtype).transpose(1, 2)  # a strided view, as the projection gives
    k = draw(b, t, hkv, d).to(dtype).transpose(1, 2)
    v = draw(b, t, hkv, d).to(dtype).transpose(1, 2)
    angles = draw(b, t, d // 2) * 3
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype).unsqueeze(1) for f in (torch.cos, torch.sin))
    caches = [draw(b + 1, hkv, capacity, d).to(dtype) for _ in range(2)]
    bias = torch.zeros(b, 1, 1, start + t, device=dev)
    if padded:  # row 1 is left-padded by 3 tokens
        bias[1, ..., :3] = torch.finfo(torch.float32).min
    return q, k, v, cos, sin, caches, bias


def _static_bias(bias, start, t, capacity):
    """The static step's bias: every slot of the buffer, those past the new keys hidden."""
    full = torch.full((bias.shape[0], 1, 1, capacity), torch.finfo(torch.float32).min)
    full[..., :start + t] = bias
    return full


@pytest.mark.parametrize("programs", [1, 64], ids=["one_split", "splits"])
@pytest.mark.parametrize("h,hkv,t", [(4, 2, 1), (3, 1, 1), (4, 2, 3)], ids=["gqa", "mqa_groups3", "three_queries"])
@pytest.mark.parametrize("device_start", [False, True], ids=["int_start", "tensor_start"])
def test_fused_equals_the_composition_fp32(programs, h, hkv, t, device_start):
    start, capacity = 21, 40
    q, k, v, cos, sin, caches, bias = _problem(h=h, hkv=hkv, t=t, start=start, capacity=capacity)
    if device_start and t > 1:
        pytest.skip("the static step feeds one token")
    want_caches = [c.clone() for c in caches]
    if device_start:
        bias = _static_bias(bias, start, t, capacity)
        at = torch.tensor(start)
    else:
        at = start
    want = rope_attention_reference(q, k, v, cos, sin, *want_caches, bias, causal=True, scale=0.25, start=at)
    got = rope_decode_attention_triton(q, k, v, cos, sin, *caches, bias, causal=True, scale=0.25, start=at,
                                       programs=programs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the new K (rotated) and V, computed as the rotary kernel computes them, and nothing else
    for c, w in zip(caches, want_caches):
        torch.testing.assert_close(c, w, rtol=1e-6, atol=1e-6)
    assert torch.equal(caches[1][:2, :, start:start + t], v)


@pytest.mark.parametrize("programs", [1, 64], ids=["one_split", "splits"])
def test_a_row_whose_every_key_has_finfo_min_averages_them_as_the_composition(programs):
    # eager's softmax(scores + finfo.min) over a row masked throughout is the uniform
    # average over its keys, the new ones included (the kernel adds their bias separately)
    start, capacity = 21, 40
    q, k, v, cos, sin, caches, bias = _problem(t=3, start=start, capacity=capacity)
    bias[0] = torch.finfo(torch.float32).min
    want_caches = [c.clone() for c in caches]
    want = rope_attention_reference(q, k, v, cos, sin, *want_caches, bias, causal=False, scale=0.25, start=start)
    got = rope_decode_attention_triton(q, k, v, cos, sin, *caches, bias, causal=False, scale=0.25, start=start,
                                       programs=programs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _rope(x, cos, sin):
    """The rotary written here, not with the IR's ops: in float32, rounded once to the
    dtype (what the generated kernels compute)."""
    x32, half = x.float(), x.shape[-1] // 2
    rot = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos.float() + rot * sin.float()).to(x.dtype)


def test_bf16_against_a_float64_reference():
    start, t = 21, 2
    q, k, v, cos, sin, caches, bias = _problem(h=4, hkv=2, t=t, start=start, dtype=torch.bfloat16)
    k_cache, v_cache = caches
    old = [c.clone() for c in caches]
    got = rope_decode_attention_triton(q, k, v, cos, sin, k_cache, v_cache, bias, causal=True, scale=0.25,
                                       start=start, programs=64)
    q_rot, k_rot = _rope(q, cos, sin), _rope(k, cos, sin)
    keys = torch.cat([old[0][:2, :, :start], k_rot], 2).double().repeat_interleave(2, 1)
    vals = torch.cat([old[1][:2, :, :start], v], 2).double().repeat_interleave(2, 1)
    s = q_rot.double() @ keys.transpose(-1, -2) * 0.25 + bias.double()
    s[..., start:] = s[..., start:].masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = (s.softmax(-1) @ vals).to(torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    # one rounding to bfloat16 (the interpreter's conversion may round differently from torch's: one ulp)
    torch.testing.assert_close(k_cache[:2, :, start:start + t].float(), k_rot.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(v_cache[:2, :, start:start + t], v)
    assert torch.equal(k_cache[:, :, :start], old[0][:, :, :start]) and torch.equal(k_cache[2], old[0][2])


def test_the_backend_composes_the_old_kernels_for_many_query_positions():
    # 2 groups x 40 positions = 80 rows per program: past MAX_ROWS, the generated rotary
    # kernel stores K/V and the prefill attention kernel runs
    q, k, v, cos, sin, caches, bias = _problem(t=40, start=0, capacity=48, padded=False)
    want_caches = [c.clone() for c in caches]
    want = rope_attention_reference(q, k, v, cos, sin, *want_caches, causal=True, scale=0.25, start=0)
    backend = TritonBackend(q.device, interpret=q.device.type == "cpu")
    got = backend.kernel_ops()["rope_attention"](q, k, v, cos, sin, *caches, causal=True, scale=0.25, start=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for c, w in zip(caches, want_caches):
        torch.testing.assert_close(c, w, rtol=1e-6, atol=1e-6)


def test_a_cache_too_short_is_refused():
    q, k, v, cos, sin, caches, bias = _problem(start=40, capacity=40)
    with pytest.raises(ValueError, match="holds 40 positions"):
        rope_decode_attention_triton(q, k, v, cos, sin, *caches, bias, causal=True, scale=0.25, start=40)
