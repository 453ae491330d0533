"""The weights one compiled subgraph was built from, and the guard that a call passes them.

With inline_inbuilt_nn_modules (the default since torch 2.5) dynamo passes a module's
parameters and buffers as graph inputs, and reuses one graph for every call whose inputs
look alike: two instances of one class, each layer of a loop with a graph break in it, a
model whose Parameter was replaced or edited in place. fxforge bakes the weights it saw
into its OptimizedModel (the passes concatenate, transpose or quantize them), so a call
with other weights, or with the same ones edited since, needs another OptimizedModel.

The guard is cheap and exact for the ways a weight changes:
  - another tensor in its place (another instance, another layer, `m.w = Parameter(...)`,
    `load_state_dict(..., assign=True)`): the object's identity;
  - an in-place edit (`w.mul_(2)`, `load_state_dict`, an optimizer step): `_version`;
  - new storage under the same object (`w.data = t`, which leaves `_version` alone): its
    data_ptr. The storages seen at compile time are kept alive, so no other storage can
    take their addresses while the guard holds them.
Two kinds of weight are not version-checked, as they read live: buffers the compiled
model writes itself (a KV cache updated with index_put_: it holds that very tensor, so an
edit is what it reads next), and inference tensors, which keep no version counter (an
in-place edit of one inside inference_mode is a change the guard cannot see). The other
is an edit through `w.data` (`w.data += delta`, as peft merges LoRA weights; `w.data[:10]
.zero_()`): PyTorch gives `.data` a version counter of its own, so the weight's `_version`
stays, and a weight a pass rewrote (fused q/k/v, quantized) keeps its old copy. Edit
weights in place as themselves (`with torch.no_grad(): w.add_(delta)`) or call
`torch._dynamo.reset()` after a `.data` edit; the README says so.

A buffer edited in place by someone else between calls (another subgraph's step counter
or cache) would rebuild the model at every call: after its first such edit the subgraph
takes it as an input read at each call instead (backend.py, _SubgraphRunner._read_live).
"""
from __future__ import annotations

from collections.abc import Sequence

from .subgraph import UnsupportedSubgraph


def weight_key(args: Sequence, positions: Sequence[int]) -> tuple:
    """The identities of the weight tensors of one call: which compiled model to look up.
    An id stays unique while the WeightSet that recorded it holds the tensor."""
    return tuple(id(args[pos]) for pos in positions)


class WeightSet:
    """The weight tensors of one call (dynamo graph inputs at `positions`), as a compiled
    subgraph was built from them; `matches(args)` tells whether a later call passes the
    same tensors, unchanged."""

    __slots__ = ("key", "_identity", "_versions", "_storages")

    def __init__(self, args: Sequence, positions: Sequence[int]):
        tensors = [args[pos] for pos in positions]
        try:
            self._identity = [(pos, t, t.data_ptr()) for pos, t in zip(positions, tensors)]
            self._storages = [t.untyped_storage() for t in tensors]  # held: see the module doc
        except RuntimeError as e:  # a tensor subclass with no storage of its own
            raise UnsupportedSubgraph(f"a weight has no storage to guard ({e}); fxforge could not tell "
                                      "a later call with other weights apart") from e
        self._versions = [(t, t._version) for t in tensors if not t.is_inference()]
        self.key = weight_key(args, positions)

    def matches(self, args: Sequence) -> bool:
        for pos, tensor, ptr in self._identity:
            arg = args[pos]
            if arg is not tensor or arg.data_ptr() != ptr:
                return False
        for tensor, version in self._versions:
            if tensor._version != version:
                return False
        return True

    def edited_in_place(self, args: Sequence) -> list[int]:
        """Positions of the weights `args` passes as the same tensors, in the same storage,
        with a newer version: edited in place since."""
        versions = {id(t): v for t, v in self._versions}
        return [pos for pos, tensor, ptr in self._identity
                if args[pos] is tensor and tensor.data_ptr() == ptr and id(tensor) in versions
                and tensor._version != versions[id(tensor)]]

    def forget_written(self):
        """After the compiled model's first run: stop checking the version of the weights it
        wrote itself (state such as a KV cache, which it holds and reads live)."""
        self._versions = [(t, v) for t, v in self._versions if t._version == v]

    def __len__(self) -> int:
        return len(self._identity)
