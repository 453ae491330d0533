"""runtime/launch_count: launches, host syncs and host time of a decode step, counted for a
tiny Llama on the Triton kernels (interpreted), so that a regression in the launch count
or a new host sync fails here."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fxforge  # noqa: E402
import zoo  # noqa: E402
from fxforge.runtime.launch_count import LaunchCounter  # noqa: E402

# A decode step of zoo.llama (2 layers) on backend="interpret", after the rotary fusion and
# the KV stores and the linear/pointwise fusion: per layer the q/k/v GEMV with its RMSNorm
# (and the residual add) inside (linear_fused), one kernel for rotary q + rotary k + the K
# append + the V append + the decode attention (rope_attention; a short context is one split:
# the kernel writes the output, no combine launch), the gate/up GEMV with the second RMSNorm
# before and SwiGLU after it inside, and the down projection in the same kernel (decode_mlp);
# once the cos/sin table and the lm_head GEMV with the final norm inside; torch: o_proj
# matmuls per layer, the
# embedding and the key-bias/positions ops; w8a8: per layer the q/k/v GEMV with its (add +)
# RMSNorm before and x split and quantized per token inside (linear_fused with parts), the
# rope_attention kernel, the o_proj and down split-K GEMVs (quant_gemv), the gate/up GEMV with
# the second RMSNorm and SwiGLU inside; the float lm_head's GEMV with the final norm.
# Lower them when a change saves more.
MAX_LAUNCHES = {None: 12, "w8a8": 14}


def test_counter_sees_launches_syncs_and_not_views():
    x = torch.randn(4, 8)
    with LaunchCounter() as c:
        y = x.view(8, 4).t()[1:]  # views: nothing launched
        z = (y * 2).sum()  # two kernels
        z.item()  # a sync on a GPU
        torch.nonzero(x > 0)  # gt, and a data-dependent shape: a sync
        bool((x > 5).any())
    assert c.sync_names["_local_scalar_dense"] == 2 and c.sync_names["nonzero"] == 1 and c.syncs == 3
    assert c.by_name["aten.mul"] == 1 and c.by_name["aten.sum"] == 1 and "aten.view" not in c.by_name
    assert c.triton == 0



def test_result_type_is_not_a_launch():
    # under inference_mode the dispatch mode sees aten.result_type (a dtype worked out on
    # the host, no kernel); the where and the clamp are the launches
    x = torch.randn(4)
    with torch.inference_mode(), LaunchCounter() as c:
        torch.ops.aten.result_type(x, 2.0)
        torch.where(x > 0, x, 0.0).clamp(min=0.5)
    assert "aten.result_type" not in c.by_name and c.torch == 3, c.by_name

@pytest.mark.parametrize("quantize", [None, "w8a8"])
def test_tiny_llama_decode_step_launches_and_never_syncs(quantize):
    model, vocab = zoo.llama()
    ids = torch.randint(3, vocab, (1, 5))
    opts = {"quantize": quantize} if quantize else {}
    fast = fxforge.optimize(model, (ids,), kv_cache=True, backend="interpret", **opts)
    p = fast.decode_profile(steps=1)
    assert p.syncs == 0, p.sync_names
    assert p.launches <= MAX_LAUNCHES[quantize], str(p)
    names = dict(p.top)
    assert "aten.cat" not in names and "aten.neg" not in names  # rotary is inside the pointwise kernels
    assert "aten.copy_" not in names and "aten.index_copy_" not in names  # K/V stored by the kernels
    assert "decode step:" in fast.report() and "host syncs" in fast.report()
