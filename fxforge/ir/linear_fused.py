"""`linear_fused`: a float linear with the pointwise group that feeds it (prologue) and the
one that consumes it (epilogue), as one op (made by passes/fuse_linear_pointwise.py).

    linear_fused(*x_inputs, weight, [bias], *epilogue_inputs, [down_weight, [down_bias]])
        {n_x, bias, prologue, prologue_outputs, row?, columns, epilogue, epilogue_outputs,
         down?, down_bias?}

means, step by step (`compose` below evaluates exactly this):
  1. prologue: a fused_pointwise body over the n_x leading inputs (empty: x is input 0);
     its first output is x, the others are extra outputs of this op (a residual sum);
  2. y = linear(x, weight, [bias]);
  3. epilogue: a fused_pointwise body whose operands in0..in{P-1} are the column ranges
     `columns` of y (y[..., start:end]) and whose later operands are the epilogue inputs
     (empty: the op returns y);
  4. down (down=true): z = linear(h, down_weight, [down_bias]) of the one result h of step 3
     (an MLP's down projection after its activation).
A quantized linear (attrs `parts` and `qattrs`, as the quant_linear op's): in place of the
one weight input come its packed parts, and step 2 is quant_linear(x, *parts, [bias])
(e.g. w8a8's per-token int8 quantization of x with each row's outliers kept in float).
Results: z, else the epilogue's outputs (or y); then the prologue's extra outputs.

Why an op of its own: a decode step multiplies a handful of rows by each weight, and then
the normalisation before a linear and the activation after it are each a launch of their
own that moves almost nothing. The Triton backend runs the whole op as one GEMV kernel
(codegen/kernels/decode_gemv.py) for few rows and as the composition above otherwise; the
torch backend turns it back into the composition (passes/fuse_linear_pointwise.unfuse).
With a down projection the whole MLP of a decode layer is one kernel
(codegen/kernels/decode_mlp.py): the activation never goes through memory.
"""
from __future__ import annotations


def split_down(tensors, attrs) -> tuple[list, object, object]:
    """(the inputs of steps 1-3, down weight or None, down bias or None)."""
    tensors = list(tensors)
    if not attrs.get("down"):
        return tensors, None, None
    if attrs.get("down_bias"):
        return tensors[:-2], tensors[-2], tensors[-1]
    return tensors[:-1], tensors[-1], None


def quantized(attrs) -> bool:
    """Whether the node's linear is a quant_linear (its weight is packed parts)."""
    return bool(attrs.get("parts"))


def split_inputs(tensors, attrs) -> tuple[list, object, object, list]:
    """(x inputs, weight, bias or None, epilogue inputs) of a linear_fused node's inputs
    (without the down projection's: see split_down). A quantized node's weight is the
    list of its packed parts, in the order of attrs["parts"]."""
    tensors = split_down(tensors, attrs)[0]
    n_x = attrs["n_x"]
    n_w = len(attrs["parts"]) if quantized(attrs) else 1
    weight = list(tensors[n_x:n_x + n_w]) if quantized(attrs) else tensors[n_x]
    bias = tensors[n_x + n_w] if attrs["bias"] else None
    return list(tensors[:n_x]), weight, bias, list(tensors[n_x + n_w + bool(attrs["bias"]):])


def quant_step(quant_linear, attrs):
    """Step 2 of a quantized node as `linear(x, parts, bias)` over an implementation with
    the quant_linear op's calling convention (x, *parts, [bias], parts=, qattrs=, bias=)."""
    def linear(x, parts, bias):
        return quant_linear(x, *parts, *([bias] if bias is not None else []), parts=attrs["parts"],
                            qattrs=attrs["qattrs"], bias=bias is not None)
    return linear


def compose(tensors, attrs, pointwise, linear, cut, quant_linear=None) -> list:
    """The op's results, computed as its three steps with the given implementations:
    `pointwise(*inputs, body=, outputs=, row=)` (a fused_pointwise), `linear(x, w, b)`,
    `cut(y, start, end)` (y[..., start:end]) and, for a quantized node, `quant_linear` (the
    quant_linear op's convention). Works on types as well as tensors."""
    _, down_weight, down_bias = split_down(tensors, attrs)
    xs, weight, bias, extra = split_inputs(tensors, attrs)
    first = linear
    if quantized(attrs):
        if quant_linear is None:
            raise ValueError("a quantized linear_fused node needs a quant_linear implementation")
        first = quant_step(quant_linear, attrs)
    if attrs["prologue"]:
        pro = _as_list(pointwise(*xs, body=attrs["prologue"], outputs=attrs["prologue_outputs"],
                                 row=attrs.get("row")))
        x, side = pro[0], pro[1:]
    else:
        x, side = xs[0], []
    y = first(x, weight, bias)
    if attrs["epilogue"]:
        operands = [cut(y, int(s), int(e)) for s, e in attrs["columns"]] + extra
        results = _as_list(pointwise(*operands, body=attrs["epilogue"], outputs=attrs["epilogue_outputs"], row=None))
    else:
        results = [y]
    if down_weight is not None:
        results = [linear(results[0], down_weight, down_bias)]
    return results + side


def _as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def infer_linear_fused(types, attrs):
    from .ops import IRTypeError, OPS

    n_down = bool(attrs.get("down")) + bool(attrs.get("down_bias"))
    n_w = len(attrs["parts"]) if quantized(attrs) else 1
    if quantized(attrs) != bool(attrs.get("qattrs")) or (quantized(attrs) and attrs.get("down")):
        raise IRTypeError("a quantized linear needs parts and qattrs (and takes no down projection)")
    if attrs["n_x"] < 1 or len(types) < attrs["n_x"] + n_w + bool(attrs["bias"]) + n_down:
        raise IRTypeError(f"n_x={attrs['n_x']}, bias={str(attrs['bias']).lower()} need more than {len(types)} inputs")
    if bool(attrs["prologue"]) != bool(attrs["prologue_outputs"]) or (
            not attrs["prologue"] and attrs["n_x"] != 1):
        raise IRTypeError("a prologue needs its outputs (and without one, n_x is 1)")
    if not attrs["columns"] or not all(isinstance(c, tuple) and len(c) == 2 for c in attrs["columns"]):
        raise IRTypeError(f"columns {attrs['columns']!r} are not (start, end) pairs")
    if attrs.get("down_bias") and not attrs.get("down"):
        raise IRTypeError("down_bias=true needs down=true")
    if attrs.get("down") and attrs["epilogue"] and len(attrs["epilogue_outputs"]) != 1:
        raise IRTypeError(f"a down projection reads one result, not the epilogue's {len(attrs['epilogue_outputs'])}")

    def pointwise(*ts, body, outputs, row):
        return OPS["fused_pointwise"].infer(list(ts), {"body": body, "outputs": outputs})

    def linear(x, w, b):
        return OPS["linear"].infer([x, w] + ([b] if b is not None else []), {})[0]

    def cut(y, start, end):
        if not 0 <= start < end or (y.shape[-1].is_number and end > int(y.shape[-1])):
            raise IRTypeError(f"columns {start}:{end} are not within the linear's {y.shape[-1]} outputs")
        return OPS["slice"].infer([y], {"dim": -1, "start": start, "end": end, "step": 1})[0]

    def quant_linear(x, *ts, **qattrs):
        return OPS["quant_linear"].infer([x, *ts], qattrs)[0]

    return compose(list(types), attrs, pointwise, linear, cut, quant_linear)


def linear_fused_reference(*tensors, n_x, bias, prologue, prologue_outputs, columns, epilogue, epilogue_outputs,
                           row=None, down=False, down_bias=False, parts=(), qattrs=()):
    """Each step with its registry reference (fused_pointwise, linear or quant_linear, slice)."""
    from .ops import OPS

    attrs = dict(n_x=n_x, bias=bias, prologue=prologue, prologue_outputs=prologue_outputs, row=row,
                 columns=columns, epilogue=epilogue, epilogue_outputs=epilogue_outputs, down=down,
                 down_bias=down_bias, parts=parts, qattrs=qattrs)
    outs = compose(tensors, attrs, OPS["fused_pointwise"].reference, OPS["linear"].reference,
                   lambda y, s, e: y[..., s:e], OPS["quant_linear"].reference)
    return outs[0] if len(outs) == 1 else tuple(outs)


ATTRS = ("n_x: int, bias: bool, prologue: tuple, prologue_outputs: strs, row?: int|none, columns: tuple, "
         "epilogue: tuple, epilogue_outputs: strs, down?: bool, down_bias?: bool, parts?: strs, qattrs?: pairs")
