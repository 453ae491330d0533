"""codegen/kernels/paged_kv_write.py: the paged cache's write in one launch equals the op's
torch reference (padding slots, a permuted `new`, float32 into bfloat16, several blocks),
refuses an out-of-range slot on CPU like the reference, and is what the Triton backends
run for paged_kv_write."""
import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxforge.codegen.kernels import paged_kv_write as kernel  # noqa: E402
from fxforge.ir.ops import paged_kv_write_reference  # noqa: E402
from fxforge.runtime.launch_count import LaunchCounter  # noqa: E402


def _case(new_dtype, cache_dtype, batch=3, heads=2, seq=5, dim=8, blocks=6, block_size=4):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(blocks, block_size, heads, dim, generator=g).to(cache_dtype)
    # new as the model makes it: a projection [B, T, H*D] viewed and permuted to [B, H, T, D]
    new = torch.randn(batch, seq, heads * dim, generator=g).to(new_dtype).view(batch, seq, heads, dim).transpose(1, 2)
    slots = torch.randperm(blocks * block_size, generator=g)[:batch * seq].view(batch, seq)
    slots[-1, :2] = -1  # the last row's left padding
    return cache, new, slots


@pytest.mark.parametrize("new_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                   (torch.float16, torch.float16)])
def test_the_kernel_equals_the_reference(new_dtype, cache_dtype):
    cache, new, slots = _case(new_dtype, cache_dtype)
    assert not new.is_contiguous()
    new[0, 0, 0, :3] = torch.tensor([float("inf"), -0.0, 3.3e38 if new_dtype == torch.float32 else 1.0])
    want = paged_kv_write_reference(cache.clone(), new, slots)
    got = cache.clone()
    with LaunchCounter() as c:
        kernel.paged_kv_write_triton(got, new, slots)
    assert c.triton == 1 and c.torch == 0 and c.syncs == 0, c.by_name  # the range check is on the device
    assert torch.equal(got, want)
    assert not torch.equal(want, cache)  # something was written


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.float16])
def test_a_layers_k_and_v_in_one_launch(v_dtype):
    """paged_kv_write(k_cache, v_cache, k, v, slots): one launch when K and V have the same
    shape and dtypes, else one each; the reference's values either way."""
    k_cache, k, slots = _case(torch.float32, torch.bfloat16)
    v_cache, v, _ = _case(v_dtype, torch.bfloat16)
    v = v * 3.0  # another value than k's (and a non-contiguous-made-contiguous input)
    want = paged_kv_write_reference(k_cache.clone(), v_cache.clone(), k, v, slots)
    got = (k_cache.clone(), v_cache.clone())
    with LaunchCounter() as c:
        out = kernel.paged_kv_write_triton(*got, k, v, slots)
    assert out[0] is got[0] and out[1] is got[1]
    assert c.triton == (1 if v_dtype == torch.float32 else 2) and c.torch == 0, c.by_name
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_padding_slots_write_nothing_and_int32_slots_work():
    cache, new, slots = _case(torch.float32, torch.float32)
    slots[:] = -1
    slots[0, 3] = 7
    got = kernel.paged_kv_write_triton(cache.clone(), new, slots.to(torch.int32))
    want = cache.clone()
    want[1, 3] = new[0, :, 3]  # slot 7 = block 1, offset 3
    assert torch.equal(got, want)


def test_heads_split_over_programs_and_a_decode_step():
    """More heads x dim than one program's tile: the heads go to a second grid axis."""
    heads, dim = 5, 1024
    assert kernel.tile(heads, dim)[0] < heads
    cache, new, slots = _case(torch.float32, torch.float32, batch=2, heads=heads, seq=1, dim=dim, blocks=3,
                              block_size=2)
    slots[:, 0] = torch.tensor([5, -1])
    assert torch.equal(kernel.paged_kv_write_triton(cache.clone(), new, slots),
                       paged_kv_write_reference(cache.clone(), new, slots))


def test_an_out_of_range_slot_is_a_clear_error_on_cpu():
    cache, new, slots = _case(torch.float32, torch.float32)
    slots[0, 0] = cache.shape[0] * cache.shape[1]
    with pytest.raises(ValueError, match="outside the cache's 24 slots"):
        kernel.paged_kv_write_triton(cache.clone(), new, slots)
    with pytest.raises(ValueError, match="do not match"):
        kernel.paged_kv_write_triton(cache, new, slots[:, :2])


def test_the_triton_backends_run_the_kernel_for_the_op():
    from fxforge.runtime.backends.triton_backend import TritonBackend

    ops = TritonBackend(torch.device("cpu"), interpret=True).kernel_ops()
    assert inspect.unwrap(ops["paged_kv_write"]) is kernel.paged_kv_write_triton
