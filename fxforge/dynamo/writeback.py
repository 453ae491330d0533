"""Writes of a torch.compile subgraph to its inputs and buffers, made functional.

A dynamo graph runs the user's in-place ops as they were written: `x[:, 1].mul_(3)` on an
input, `self.ema[0].mul_(0.9)` on a buffer, `h.t()[1].div_(4)` on an intermediate. The IR
is SSA with no aliasing, so an in-place op kept as an opaque call on a view is a write the
passes cannot see: one that rewrites `mul_` on a value "nobody else reads" as `mul` drops
it (the view's base is read, not the view). torch's functionalization (as optimize() runs
it) turns every such write into out-of-place ops (`select_scatter`, ...) and reports each
written input or buffer as an extra output holding its new value. optimize() refuses
those outputs (a forward with side effects); a dynamo graph must keep them, so each one
becomes an explicit `copy_` of the new value into the input or buffer, after everything
else: the only in-place ops left write whole graph inputs, which the lowerer keeps as
opaque calls on the caller's real tensors.

A graph whose only writes are whole inputs or buffers written in place directly (a cache's
`index_copy_`, `x.add_(1)`), with no view of them taken before the write, is kept as it is:
the lowerer keeps each write as an opaque in-place call on the real tensor, which costs no
copy of the whole buffer per call, and views of the input it returns stay views, as in
eager. Functionalization is for the rest: a write through a view, or a view read after a
write to its base.
"""
from __future__ import annotations

import warnings

import torch


def writes_only_whole_inputs(ep) -> bool:
    """Every in-place op of `ep` either is one the lowerer makes functional itself, or
    writes a whole graph input (a user tensor, weight or buffer) of which no view is taken
    before its last write: kept as opaque in-place calls, such writes need no
    functionalization."""
    from ..ir.capture import _writes_first_only, writes_to_functionalize

    writes_left, aliases, order = writes_to_functionalize(ep.graph_module.graph)
    for node in writes_left:
        base = node.args[0] if node.args else None
        if not _writes_first_only(node.target) or not isinstance(base, torch.fx.Node) or base.op != "placeholder":
            return False
        group = aliases.get(base)
        if not group:
            return False
        writes = [m for m in group if m.op == "call_function" and isinstance(m.target, torch._ops.OpOverload)
                  and m.args and m.args[0] is base and _writes_first_only(m.target)]
        last = max(order[m] for m in writes)
        # another alias made before the last write (a view, or a write through one) would
        # read or write the tensor out of the IR's sight
        if not all(m is base or m in writes or order[m] > last for m in group):
            return False
    return True


def functional_with_writeback(ep):
    """`ep` made functional, with each input or buffer it writes copied back in place."""
    from torch.export.graph_signature import InputKind, OutputKind

    with warnings.catch_warnings():  # torch's own deprecation inside its deep copy of the program
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        ep = ep.run_decompositions({})
    signature = ep.graph_signature
    graph = ep.graph_module.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    # a write's spec names the buffer (its path) or the user input (its placeholder)
    written_placeholder = {spec.target: spec.arg.name for spec in signature.input_specs
                           if spec.kind in (InputKind.BUFFER, InputKind.PARAMETER)}
    output = graph.output_node()
    kept_values, kept_specs = [], []
    for spec, value in zip(signature.output_specs, output.args[0]):
        if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION):
            target = placeholders[written_placeholder[spec.target]]
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            target = placeholders[spec.target]
        else:
            kept_values.append(value)
            kept_specs.append(spec)
            continue
        with graph.inserting_before(output):
            write = graph.call_function(torch.ops.aten.copy_.default, (target, value))
        write.meta["val"] = target.meta.get("val")
    output.args = (tuple(kept_values),)
    graph.lint()
    ep.graph_module.recompile()
    signature.output_specs[:] = kept_specs
    return ep
