"""A subgraph from torch.compile (a dynamo GraphModule and its example inputs) as a module
fxforge can capture: weights become the module's parameters and buffers, sizes become
`x.size(d)` of the input tensors, and only the real user tensors remain as inputs.

Dynamo gives its backend a flat list of graph inputs. With inline_inbuilt_nn_modules (the
default since torch 2.5) that list holds the model's parameters and buffers too; without
it they are attributes of the GraphModule. A dynamic size (a SymInt input) is always the
size of some input tensor. torch.export of the wrapper below then sees a model in the
shape capture expects: parameters it can name, tensor inputs with dynamic dims.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


class UnsupportedSubgraph(Exception):
    """This subgraph cannot go through fxforge; the backend runs it as dynamo gave it."""


@dataclass
class InputLayout:
    """Where each of dynamo's graph inputs comes from, by position."""

    count: int
    user: list[int] = field(default_factory=list)  # positions of the user's tensors
    weights: dict[int, str] = field(default_factory=dict)  # position -> weight path ("model.norm.weight")
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # position -> (position of a tensor, dim)
    # output index -> the FX node of an output that is a graph input or a view of one (`return
    # x.mul_(3)`, `x[:, 1]`, `self.ema`): eager returns that tensor or a view of the caller's
    # tensor, the compiled model a new one with its values; the view is made again (replay)
    input_views: dict = field(default_factory=dict)
    # output index -> an earlier index the graph returns the same FX node at (one object)
    same_outputs: dict[int, int] = field(default_factory=dict)
    # per output, which example values share storage (None: not a tensor); two outputs of
    # different groups are distinct tensors in eager
    output_groups: list = field(default_factory=list)
    # positions of Python numbers dynamo leaves unspecialized (torch.compile(dynamic=True)):
    # a float (self.scale) passed as a 0-dim tensor read back with .item(), or an int passed
    # as a size that is no dim of an input tensor. Each compiled model has their values
    # baked in, and serves calls with those values
    numbers: list[int] = field(default_factory=list)
    # the locals and globals weights were reached from, where not the compiled module itself
    # (`model` when torch.compile wraps a function that calls a global model): their weight
    # paths start with that name (model.lm_head.weight), the model's own names do not
    weight_roots: set[str] = field(default_factory=set)
    own_weights: bool = False  # some weight is the compiled module's own (under L['self'])


# A weight's source, as dynamo names it:
#   L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']
#   L['self'].__dict__['_modules']['a']._parameters['weight']   (an attribute set in forward)
#   L['self'].blocks[0]._parameters['weight']                   (a plain list of modules)
#   G['lin1']._parameters['weight'],  L['b']._parameters['bias']  (a global, an argument)
_ROOT = re.compile(r"(?P<scope>[LG])\[(?P<q>['\"])(?P<name>[^'\"]+)(?P=q)\]")
_STEPS = re.compile(
    r"\.__dict__\[(?P<q0>['\"])_(?:modules|parameters|buffers)(?P=q0)\]"  # the container itself: no name
    r"|\._(?:modules|parameters|buffers)\[(?P<q1>['\"])(?P<key>[^'\"]+)(?P=q1)\]"
    r"|\.__dict__\[(?P<q2>['\"])(?P<dict_key>[^'\"]+)(?P=q2)\]"
    r"|\.(?P<attr>[A-Za-z_]\w*)"
    r"|\[(?P<q3>['\"])(?P<item>[^'\"]+)(?P=q3)\]"
    r"|\[(?P<index>\d+)\]")
_WEIGHT_LEAF = re.compile(r"(?:\._(?:parameters|buffers)|\.__dict__\[['\"]_(?:parameters|buffers)['\"]\])"
                          r"\[['\"][^'\"]+['\"]\]$")


def weight_path(source_name: str | None) -> str | None:
    """The weight's dotted path, from dynamo's source of a graph input: the model's own name
    for it under L['self'] (model.layers.0.mlp.up_proj.weight), else prefixed by the local or
    global it was reached from (lin1.weight, blocks.0.weight under L['s'] is s.blocks.0.weight).
    None for an input that is not a module's parameter or buffer, or a source spelled in a
    way this does not read."""
    if not source_name or not _WEIGHT_LEAF.search(source_name):
        return None
    root = _ROOT.match(source_name)
    if root is None:
        return None
    keys = [] if root["scope"] == "L" and root["name"] == "self" else [root["name"]]
    at = root.end()
    while at < len(source_name):
        step = _STEPS.match(source_name, at)
        if step is None:
            return None
        name = step["key"] or step["dict_key"] or step["attr"] or step["item"] or step["index"]
        if name is not None:
            keys.append(name.replace(".", "_"))  # a dict key with a dot would split the path
        at = step.end()
    return ".".join(keys) if keys else None


def weight_root(source_name: str | None) -> str | None:
    """The local or global a weight's path (weight_path) starts with; None where the path is
    the model's own name for it (under L['self'])."""
    root = _ROOT.match(source_name or "")
    return None if root is None or (root["scope"] == "L" and root["name"] == "self") else root["name"]


def _source_name(node) -> str | None:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else name


def input_layout(gm: torch.fx.GraphModule, example_inputs) -> InputLayout:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise UnsupportedSubgraph(f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs")
    layout = InputLayout(len(example_inputs))
    taken = _Paths()
    symbolic: list[tuple[int, object]] = []
    for pos, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(example, torch.SymInt):
            symbolic.append((pos, example.node.expr))
        elif isinstance(example, torch.Tensor) and _is_python_number(node):
            if not all(_is_item_call(user) for user in node.users):
                raise UnsupportedSubgraph(
                    f"dynamo passes the Python number {_source_name(node)} as a tensor (torch.compile(dynamic=True) "
                    "leaves numbers unspecialized), and the graph uses it other than by .item(); compile without "
                    "dynamic=True (dynamo then bakes the number in)")
            layout.numbers.append(pos)
        elif isinstance(example, torch.Tensor):
            path = weight_path(_source_name(node))
            if path is None and isinstance(example, torch.nn.Parameter):
                path = node.name  # a parameter with no module source: keep it a parameter
            if path is not None:
                layout.weights[pos] = taken.unique(path, node.name)
                if (root := weight_root(_source_name(node))) is not None:
                    layout.weight_roots.add(root)
                else:
                    layout.own_weights = True
            else:
                layout.user.append(pos)
        else:
            raise UnsupportedSubgraph(f"graph input {node.name} is a {type(example).__name__}, not a tensor or size")
    for pos, expr in symbolic:
        try:
            layout.sizes[pos] = _tensor_dim_of(expr, placeholders, layout.user)
        except UnsupportedSubgraph:  # an int argument or attribute: baked in like a float
            layout.numbers.append(pos)
    layout.numbers.sort()
    layout.input_views, layout.same_outputs, layout.output_groups = _output_aliases(gm, placeholders)
    return layout


def _is_python_number(node) -> bool:
    return bool(getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False))


def _is_item_call(node) -> bool:
    return (node.op == "call_method" and node.target == "item") or \
        (node.op == "call_function" and node.target in (torch.Tensor.item, torch.ops.aten.item.default))


def with_numbers_baked(gm: torch.fx.GraphModule, values: dict[int, float]) -> torch.fx.GraphModule:
    """A copy of `gm` in which each `.item()` of the number input at a position of `values`
    is that value: the graph computes what eager computes with that Python number (its
    placeholder stays, unread)."""
    graph = torch.fx.Graph()
    copies: dict = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for pos, value in values.items():
        for item in list(placeholders[pos].users):
            baked = copies[item]
            for user in list(baked.users):
                user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is baked else a)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is baked else a)
            graph.erase_node(baked)
    return torch.fx.GraphModule(gm, graph)


# in-place ops that change the metadata of their tensor (not only its values): replaying one
# on the caller's tensor would change it
_METADATA_IN_PLACE = {"t_", "transpose_", "swapdims_", "swapaxes_", "squeeze_", "unsqueeze_", "as_strided_",
                      "resize_", "resize_as_", "set_", "detach_", "requires_grad_", "share_memory_", "fill_diagonal_"}


def _target_name(node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def writes_self(node) -> bool:
    """An in-place op that returns the tensor it wrote (`x.mul_(3)`, `x += 1`)."""
    import operator

    name = _target_name(node)
    if node.op == "call_function" and node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                                       operator.ifloordiv, operator.imod, operator.ipow,
                                                       operator.iand, operator.ior, operator.ixor):
        return isinstance(node.meta.get("example_value"), torch.Tensor)
    return name.endswith("_") and not name.startswith("_")


def _storage(val):
    from torch.multiprocessing.reductions import StorageWeakRef

    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except Exception:  # no storage (a tensor subclass): not known to alias
        return None


def _input_storages(placeholders) -> set:
    return {s for s in (_storage(n.meta.get("example_value")) for n in placeholders) if s is not None}


def _replayable(node, inputs: set) -> bool:
    """Whether `node` is computed from graph inputs by view ops only (and in-place ops that
    return their tensor, and size arithmetic): then replaying those ops on the caller's
    tensors gives the very view eager returns."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    if _target_name(node) in _METADATA_IN_PLACE:
        return False
    if writes_self(node):
        return bool(node.args) and isinstance(node.args[0], torch.fx.Node) and _replayable(node.args[0], inputs)
    val = node.meta.get("example_value")
    values = val if isinstance(val, (tuple, list)) else (val,)
    if any(isinstance(v, torch.Tensor) and _storage(v) not in inputs for v in values):
        return False  # a new tensor: computed, not a view
    deps: list = []
    torch.fx.node.map_arg((node.args, node.kwargs), deps.append)
    return all(_replayable(d, inputs) for d in deps)


def replay(gm: torch.fx.GraphModule, node, args, cache: dict | None = None):
    """The value of `node` (a _replayable one) computed from dynamo's graph inputs `args`:
    the view ops run again on the caller's tensors (in-place ops are not run again)."""
    cache = {} if cache is None else cache
    if node in cache:
        return cache[node]
    if node.op == "placeholder":
        if "placeholders" not in cache:
            cache["placeholders"] = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        value = args[cache["placeholders"][node]]
    elif node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
    elif writes_self(node):
        value = replay(gm, node.args[0], args, cache)
    else:
        a, kw = torch.fx.node.map_arg((node.args, node.kwargs), lambda d: replay(gm, d, args, cache))
        value = node.target(*a, **kw) if node.op == "call_function" else getattr(a[0], node.target)(*a[1:], **kw)
    cache[node] = value
    return value


def _output_aliases(gm: torch.fx.GraphModule, placeholders) -> tuple[dict, dict, list]:
    """What eager's outputs alias, from dynamo's FX graph and its example values:
    (output index -> FX node, for each output that is a graph input or a view of one, to be
    replayed on the caller's tensors; output index -> the earlier index of the same FX node;
    per output, the storage group of its example value, or None)."""
    inputs = _input_storages(placeholders)
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    views, same, groups, first = {}, {}, [], {}
    storages: dict = {}
    for i, out in enumerate(outputs if isinstance(outputs, (tuple, list)) else ()):
        if not isinstance(out, torch.fx.Node):
            groups.append(None)
            continue
        storage = _storage(out.meta.get("example_value")) if out.op != "placeholder" else None
        groups.append(storages.setdefault(storage, len(storages)) if storage is not None else None)
        if out in first:
            same[i] = first[out]
            continue
        first[out] = i
        if out.op in ("placeholder", "get_attr") or (storage is not None and storage in inputs):
            if not _replayable(out, inputs):
                raise UnsupportedSubgraph(f"output {i} ({out.name}) is a view of an input made by ops fxforge cannot "
                                          "rebuild as a view (an in-place change of its shape)")
            views[i] = out
    return views, same, groups


class _Paths:
    """The weight paths of one subgraph, each distinct: two inputs are two tensors (dynamo
    passes a tensor reached twice once), so two spellings that read alike (a module and
    its attribute, two leaves of one name) must not become one parameter."""

    def __init__(self):
        self.leaves: set[str] = set()
        self.modules: set[str] = set()  # every proper prefix of a path: a module on the way

    def unique(self, path: str, fallback: str) -> str:
        for candidate in (path, fallback, *(f"{fallback}_{i}" for i in range(1, 1000))):
            if self._free(candidate):
                self._take(candidate)
                return candidate
        raise UnsupportedSubgraph(f"no free name for the weight {path!r}")

    def _free(self, path: str) -> bool:
        parts = path.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts))}
        return path not in self.leaves and path not in self.modules and not (prefixes & self.leaves)

    def _take(self, path: str):
        parts = path.split(".")
        self.leaves.add(path)
        self.modules.update(".".join(parts[:i]) for i in range(1, len(parts)))


def dynamic_dims(gm: torch.fx.GraphModule, layout: InputLayout) -> dict[int, list[int]]:
    """Per user tensor position, the dims dynamo traced as symbolic (the others are fixed)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {}
    for pos in layout.user:
        val = placeholders[pos].meta.get("example_value")
        shape = getattr(val, "shape", ())
        out[pos] = [d for d, s in enumerate(shape) if isinstance(s, torch.SymInt) and not _is_constant(s)]
    return out


def _is_constant(size: torch.SymInt) -> bool:
    return bool(getattr(size.node.expr, "is_number", False))


def _tensor_dim_of(expr, placeholders, user_positions) -> tuple[int, int]:
    for pos in user_positions:
        val = placeholders[pos].meta.get("example_value")
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.expr == expr:
                return pos, d
    raise UnsupportedSubgraph(f"the size {expr} is no dim of an input tensor")


class SubgraphModule(torch.nn.Module):
    """Calls dynamo's GraphModule with the weights from its own parameters and buffers,
    the sizes read off the inputs and the Python numbers of `example_inputs` baked in:
    forward(*user_tensors)."""

    def __init__(self, gm: torch.fx.GraphModule, layout: InputLayout, example_inputs):
        super().__init__()
        wrapped = [pos for pos in layout.numbers if isinstance(example_inputs[pos], torch.Tensor)]
        if wrapped:
            gm = with_numbers_baked(gm, {pos: example_inputs[pos].item() for pos in wrapped})
        # ints: passed to the graph as the constants they were at this call
        self._ints = {pos: int(example_inputs[pos]) for pos in layout.numbers if pos not in wrapped}
        self.dynamo_graph = gm  # a submodule: weights held as its attributes stay parameters
        self.layout = layout
        for pos, path in layout.weights.items():
            tensor = example_inputs[pos]
            if isinstance(tensor, torch._subclasses.FakeTensor):
                raise UnsupportedSubgraph("the weights came as fake tensors: there are no values to compile with")
            _attach(self, path, tensor)
        self._weight_paths = dict(layout.weights)

    def forward(self, *tensors):
        args: list = [None] * self.layout.count
        for pos, tensor in zip(self.layout.user, tensors):
            args[pos] = tensor
        for pos, path in self._weight_paths.items():
            args[pos] = _lookup(self, path)
        for pos, (tensor_pos, dim) in self.layout.sizes.items():
            args[pos] = args[tensor_pos].size(dim)
        for pos, value in self._ints.items():
            args[pos] = value
        return self.dynamo_graph(*args)


def _attach(root: torch.nn.Module, path: str, tensor: torch.Tensor):
    """Register `tensor` at `path` under `root`, making empty modules along the way, so that
    captured parameters keep the model's names (model.layers.0.mlp.up_proj.weight)."""
    *parents, leaf = path.split(".")
    module = root
    for key in parents:
        child = module._modules.get(key)
        if child is None:
            if key in module._parameters or key in module._buffers:
                raise AssertionError(f"fxforge.dynamo: the weight path {path!r} runs through a weight")
            child = torch.nn.Module()
            module.add_module(key, child)
        module = child
    if leaf in module._parameters or leaf in module._buffers or leaf in module._modules:
        # input_layout gives each weight its own path: a clash would make two tensors one
        raise AssertionError(f"fxforge.dynamo: two weights were given the path {path!r}")
    if isinstance(tensor, torch.nn.Parameter):
        module.register_parameter(leaf, tensor)
    else:
        module.register_buffer(leaf, tensor)


def _lookup(root: torch.nn.Module, path: str) -> torch.Tensor:
    *parents, leaf = path.split(".")
    module = root
    for key in parents:
        module = module._modules[key]
    return getattr(module, leaf)
