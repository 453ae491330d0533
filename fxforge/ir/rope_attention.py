"""`rope_attention`: rotate-half rotary of q and k, the KV-cache append of the rotated k
and of v, and attention over the cache, as one op (made by passes/fuse_rope_attention.py).

    rope_attention(q, k, v, cos, sin, k_cache, v_cache, [bias]) {causal, scale, start}

means, step by step (`compose` below evaluates exactly this):
  1. q' = q * cos + rotate_half(q) * sin and k' likewise, with
     rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]) (the spelling transformers uses);
     q, k, v: [B, H or Hkv, T, D], the pre-rotary views of the QKV projection; cos, sin
     broadcast to [B, 1, T, D];
  2. kv_append(k_cache, k') and kv_append(v_cache, v) at `start` (the cache length);
  3. attention(q', those cache views, v's, [bias]) {causal, scale}.
Result: the attention's output [B, H, T, D]. It writes both caches (stateful).

Why an op of its own: at decode, the rotary with the K/V stores was a launch of its own
between the QKV GEMV and the attention, moving a few hundred bytes per head. The Triton
backend runs the whole op as one kernel for few query positions
(codegen/kernels/rope_decode_attention.py) and as the composition above otherwise (the
generated rotary-and-store kernel, then the attention kernels: what ran before the
fusion); the torch backend turns it back into the composition
(passes/fuse_rope_attention.unfuse).
"""
from __future__ import annotations

import functools

ATTRS = "causal: bool, scale: float, start: size"
# the composition's rotary-and-store group: its inputs are (q, cos, q_hi, q_lo, sin, k, k_hi,
# k_lo, v, k_cache, v_cache); its outputs q', the K cache view and the V cache view
OUTPUTS = ("t4", "t9", "t10")
INTO = ((1, 9), (2, 10))


@functools.lru_cache(maxsize=None)
def rotary_body(v_dtype) -> tuple:
    """The fused_pointwise body of step 1 and 2 (fuse_elementwise made the same group before
    this op existed); v is stored through an identity cast, as a lone kv_append is. Cached,
    so a kernel's launch plan keyed by the body's identity is found again."""
    return (("mul", ("in0", "in1"), ()), ("neg", ("in2",), ()), ("cat", ("t1", "in3"), (("dim", 3),)),
            ("mul", ("t2", "in4"), ()), ("add", ("t0", "t3"), ()),
            ("mul", ("in5", "in1"), ()), ("neg", ("in6",), ()), ("cat", ("t6", "in7"), (("dim", 3),)),
            ("mul", ("t7", "in4"), ()), ("add", ("t5", "t8"), ()),
            ("cast", ("in8",), (("dtype", v_dtype),)))


def split(inputs) -> tuple:
    """(q, k, v, cos, sin, k_cache, v_cache, bias or None) of the op's inputs."""
    q, k, v, cos, sin, k_cache, v_cache = inputs[:7]
    return q, k, v, cos, sin, k_cache, v_cache, (inputs[7] if len(inputs) > 7 else None)


def compose(inputs, attrs, pointwise, attend, half):
    """The op's result computed as its steps with the given implementations:
    `pointwise(*inputs, body=, outputs=, into=, start=)` (a fused_pointwise storing into the
    caches), `attend(q, k, v, [bias], causal=, scale=)` and `half(x, start, end)`
    (x[..., start:end]). Works on IR values (a Builder) as well as on tensors."""
    q, k, v, cos, sin, k_cache, v_cache, bias = split(inputs)
    d = int(q.shape[3])
    h = d // 2
    q_rot, k_view, v_view = pointwise(q, cos, half(q, h, d), half(q, 0, h), sin, k, half(k, h, d), half(k, 0, h), v,
                                      k_cache, v_cache, body=rotary_body(v.dtype), outputs=OUTPUTS, into=INTO,
                                      start=attrs["start"])
    extra = (bias,) if bias is not None else ()
    return attend(q_rot, k_view, v_view, *extra, causal=attrs["causal"], scale=attrs["scale"])


def infer_rope_attention(types, attrs):
    from .ops import IRTypeError, infer_attention, infer_kv_append
    from .types import broadcast_shapes, dims_equal

    if len(types) not in (7, 8):
        raise IRTypeError(f"rope_attention takes q, k, v, cos, sin, k_cache, v_cache, [bias]; got {len(types)} inputs")
    q, k, v, cos, sin, k_cache, v_cache, bias = split(types)
    if any(t.rank != 4 for t in (q, k, v, k_cache, v_cache)):
        raise IRTypeError(f"rope_attention wants [B, H, T, D] q, k, v and caches, got {q}, {k}, {v}")
    d = q.shape[3]
    if not d.is_number or int(d) % 2 or not (dims_equal(k.shape[3], d) and dims_equal(v.shape[3], d)):
        raise IRTypeError(f"rope_attention: q, k, v need one even head dim, got {q}, {k}, {v}")
    if not (dims_equal(k.shape[2], q.shape[2]) and dims_equal(v.shape[2], q.shape[2])
            and dims_equal(k.shape[1], v.shape[1])):
        raise IRTypeError(f"rope_attention: k {k} and v {v} do not fit q {q}")
    want = (q.shape[0], 1, q.shape[2], d)
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            ok = t.rank <= 4 and all(dims_equal(a, b) for a, b in zip(broadcast_shapes(t.shape, want), want))
        except Exception:
            ok = False
        if not ok:
            raise IRTypeError(f"rope_attention: {name} {t} does not broadcast to [B, 1, T, D]")
    kv = [infer_kv_append([c, x], {"start": attrs["start"]})[0] for c, x in ((k_cache, k), (v_cache, v))]
    extra = [bias] if bias is not None else []
    return infer_attention([q, *kv, *extra], {"causal": attrs["causal"], "scale": attrs["scale"]})


def rope_attention_reference(*tensors, causal, scale, start):
    """The composition with each step's torch reference. Mutates the caches."""
    from .ops import attention_reference, fused_pointwise_reference

    return compose(tensors, {"causal": causal, "scale": scale, "start": start}, fused_pointwise_reference,
                   attention_reference, lambda x, s, e: x[..., s:e])
