"""Property tests (hypothesis) for the whole path IR text -> typecheck -> passes -> backends.

1. Random small graphs of registry ops over symbolic shapes [B, T, ...] survive
   print -> parse (structurally equal) -> typecheck -> the default pipeline, and the
   optimized program on the "torch" and "interpret" (generated Triton, interpreted)
   backends equals each op's registry reference run over the original graph, at concrete
   sizes drawn per example (1 included).
2. Mutated IR text (tokens deleted, duplicated, swapped or replaced, lines dropped or
   repeated, truncation, garbage) makes parse + typecheck raise ParseError or
   IRCheckError, or succeed; never another exception.

CI runs a fixed, small number of examples, derandomized so that runs are repeatable.
FXFORGE_PROPERTY_EXAMPLES=400 runs 400 examples of the torch-backend property and
proportionally more or fewer of the others, with fresh random draws each run, for a long
local search (hypothesis prints, and saves in .hypothesis/, any failing example).
"""
import functools
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxforge.codegen.pointwise import PointwiseKernels
from fxforge.ir import Graph, IRCheckError, ParseError, parse, structurally_equal, typecheck
from fxforge.ir.builder import Builder
from fxforge.ir.graph import Value
from fxforge.ir.ops import IRTypeError
from fxforge.ir.types import TensorType, symbol
from fxforge.passes import default_registry
from fxforge.passes.manager import run_pipeline
from fxforge.runtime.backends import op_table
from fxforge.runtime.program import build_program

from test_ir import TEXT as IR_TEST_TEXT

B, T = symbol("B"), symbol("T")
F32 = torch.float32


def _examples(ci_count: int, share: float) -> int:
    """`ci_count` in CI; `share` of FXFORGE_PROPERTY_EXAMPLES when that is set."""
    wanted = os.environ.get("FXFORGE_PROPERTY_EXAMPLES")
    return max(1, int(int(wanted) * share)) if wanted else ci_count


def _settings(ci_count: int, share: float):
    local_search = bool(os.environ.get("FXFORGE_PROPERTY_EXAMPLES"))
    return settings(max_examples=_examples(ci_count, share), deadline=None, derandomize=not local_search,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- random graphs -------------------------------------------------------------------------
# The first input is always [B, T, 8], so both symbols are bound by the program's inputs.
INPUT_SHAPES = [(B, T, 8), (B, T, 8), (T, 8), (B, 1, 8), (8,), (B, T, 1), (1, T, 8)]
UNARY = ["neg", "abs", "relu", "tanh", "sigmoid", "silu", "sin", "cos", "erf"]
BINARY = ["add", "sub", "mul", "maximum", "minimum"]
COMPARE = ["gt", "lt", "ge", "le", "eq", "ne"]
VOCAB_SIZE = 11  # rows of an embedding table; integer inputs are ids below it


class Skip(Exception):
    """A step that does not fit the values drawn (e.g. shapes that do not broadcast)."""


class GraphMaker:
    """Grows a graph one random step at a time. Every step builds well-typed nodes
    through the Builder (which runs the type rules); a step that does not fit is skipped."""

    def __init__(self, draw):
        self.draw = draw
        self.b = Builder()
        self.inputs: list[Value] = []
        self.floats: list[Value] = []   # float32 values the next steps read
        self.exact: list[Value] = []    # bool and integer values, which may become outputs
        self.params: dict[str, torch.Tensor] = {}
        self.param_values: list[Value] = []
        self.gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    # helpers ---------------------------------------------------------------------------
    def pick(self) -> Value:
        return self.floats[self.draw(st.integers(0, len(self.floats) - 1))]

    def param(self, shape) -> Value:
        name = f"w{len(self.param_values)}"
        tensor = torch.randn(shape, generator=self.gen) * 0.3
        self.params[name] = tensor
        v = Value(TensorType(tuple(shape), F32), param=name)
        self.param_values.append(v)
        return v

    def static_last(self, x: Value) -> int:
        if x.rank == 0 or not x.shape[-1].is_number:
            raise Skip
        return int(x.shape[-1])

    def emit(self, op, *args, **attrs) -> Value:
        try:
            return self.b.emit(op, *args, **attrs)
        except (IRTypeError, TypeError) as e:  # broadcast_shapes raises TypeError
            raise Skip from e

    # steps -------------------------------------------------------------------------------
    def unary(self, x):
        op = self.draw(st.sampled_from(UNARY + ["gelu", "gelu_tanh", "exp", "log", "sqrt", "rsqrt"]))
        if op.startswith("gelu"):
            return self.emit("gelu", x, approximate="tanh" if op == "gelu_tanh" else "none")
        if op == "exp":  # bounded first, so exp stays finite
            return self.emit("exp", self.emit("tanh", x))
        if op in ("log", "sqrt", "rsqrt"):  # of a positive value
            return self.emit(op, self.emit("add", self.emit("exp", self.emit("tanh", x)), self.b.const(1.0)))
        return self.emit(op, x)

    def binary(self, x):
        y = self.pick()
        op = self.draw(st.sampled_from(BINARY + ["div", "pow"]))
        if op == "div":  # a divisor away from 0
            return self.emit("div", x, self.emit("add", self.emit("abs", y), self.b.const(0.5)))
        if op == "pow":
            return self.emit("pow", x, self.b.const(self.draw(st.sampled_from([2, 3]))))
        return self.emit(op, x, y)

    def scalar(self, x):
        value = self.draw(st.sampled_from([0.5, -2.0, 3, 1e-3]))
        return self.emit(self.draw(st.sampled_from(["mul", "add", "sub"])), x, self.b.const(value))

    def compare(self, x):
        cond = self.emit(self.draw(st.sampled_from(COMPARE)), x, self.pick())
        self.exact.append(cond)
        if self.draw(st.booleans()):
            return self.emit("where", cond, x, self.emit("mul", x, self.b.const(2.0)))
        return self.emit("cast", cond, dtype=F32)

    def count(self, x):
        """An integer result: how many elements along a dim pass a comparison."""
        if x.rank == 0:
            raise Skip
        cond = self.emit(self.draw(st.sampled_from(COMPARE)), x, self.b.const(0.0))
        dim = self.draw(st.integers(0, x.rank - 1))
        n = self.emit("sum", cond, dims=(dim,), keepdim=True, dtype=None)  # int64, as in torch
        self.exact.append(n)
        return self.emit("mul", x, self.emit("cast", n, dtype=F32))

    def embedding(self, x):
        """Rows of a table picked by integer ids: a new i64 input [B, T]."""
        ids = Value(TensorType((B, T), torch.int64), hint=f"ids{len(self.inputs)}")
        self.inputs.append(ids)
        return self.emit("embedding", self.param((VOCAB_SIZE, 8)), ids)

    def clamp(self, x):
        lo, hi = self.draw(st.sampled_from([(-0.5, 0.5), (0.0, None), (None, 1.0)]))
        return self.emit("clamp", x, min=lo, max=hi)

    def reduce(self, x):
        if x.rank == 0:
            raise Skip
        op = self.draw(st.sampled_from(["sum", "mean", "amax", "amin", "softmax", "log_softmax"]))
        dim = self.draw(st.integers(0, x.rank - 1))
        if op in ("softmax", "log_softmax"):
            return self.emit(op, x, dim=dim, dtype=None)
        attrs = {"dims": (dim,), "keepdim": self.draw(st.booleans())}
        if op in ("sum", "mean"):
            attrs["dtype"] = None
        return self.emit(op, x, **attrs)

    def norm(self, x):
        n = self.static_last(x)
        weight = self.draw(st.booleans())
        operands = [x] + ([self.param((n,))] if weight else [])
        if self.draw(st.booleans()):
            bias = self.draw(st.booleans())
            operands += [self.param((n,))] if bias else []
            return self.emit("layer_norm", *operands, shape=(n,), eps=1e-5, weight=weight, bias=bias)
        return self.emit("rms_norm", *operands, shape=(n,), eps=1e-6, weight=weight)

    def view(self, x):
        if x.rank >= 2 and self.draw(st.booleans()):  # merge the last two dims
            return self.emit("view", x, shape=x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
        n = self.static_last(x)
        if n % 2:
            raise Skip
        return self.emit("view", x, shape=x.shape[:-1] + (2, n // 2))

    def permute(self, x):
        dims = tuple(self.draw(st.permutations(range(x.rank))))
        return self.emit("permute", x, dims=dims)

    def expand(self, x):
        ones = [i for i, d in enumerate(x.shape) if d == 1]
        if not ones:
            raise Skip
        shape = list(x.shape)
        shape[self.draw(st.sampled_from(ones))] = self.draw(st.sampled_from([B, T, 3]))
        return self.emit("expand", x, shape=tuple(shape))

    def slice(self, x):
        static = [i for i, d in enumerate(x.shape) if d.is_number and int(d) >= 2]
        if not static:
            raise Skip
        dim = self.draw(st.sampled_from(static))
        size = int(x.shape[dim])
        start = self.draw(st.integers(0, 1))
        step = self.draw(st.sampled_from([1, 2]))
        return self.emit("slice", x, dim=dim, start=start, end=size, step=step)

    def unsqueeze_squeeze(self, x):
        ones = tuple(i for i, d in enumerate(x.shape) if d == 1)
        if ones and self.draw(st.booleans()):
            return self.emit("squeeze", x, dims=ones)
        return self.emit("unsqueeze", x, dim=self.draw(st.integers(0, x.rank)))

    def cat(self, x):
        if x.rank == 0:
            raise Skip
        other = self.emit("neg", x)
        return self.emit("cat", x, other, dim=self.draw(st.integers(0, x.rank - 1)))

    def linear(self, x):
        k = self.static_last(x)
        n = self.draw(st.sampled_from([4, 8]))
        if self.draw(st.booleans()):
            operands = [x, self.param((n, k))] + ([self.param((n,))] if self.draw(st.booleans()) else [])
            return self.emit("linear", *operands)
        return self.emit("matmul", x, self.param((k, n)))

    def attention(self, x):
        """q k^T * scale -> softmax -> @ v over two heads of x's last dim (fuse_attention's
        pattern; the other steps may already have bent x out of shape, then it is skipped)."""
        if x.rank != 3 or self.static_last(x) != 8:
            raise Skip
        heads = []
        for _ in range(3):
            h = self.emit("linear", x, self.param((8, 8)))
            h = self.emit("view", h, shape=x.shape[:2] + (2, 4))
            heads.append(self.emit("permute", h, dims=(0, 2, 1, 3)))
        q, k, v = heads
        scores = self.emit("matmul", q, self.emit("permute", k, dims=(0, 1, 3, 2)))
        scores = self.emit("mul", scores, self.b.const(0.5))
        out = self.emit("matmul", self.emit("softmax", scores, dim=3, dtype=None), v)
        return self.emit("view", self.emit("permute", out, dims=(0, 2, 1, 3)), shape=x.shape)

    STEPS = ["unary", "binary", "scalar", "compare", "count", "embedding", "clamp", "reduce", "norm", "view", "permute", "expand",
             "slice", "unsqueeze_squeeze", "cat", "linear", "attention"]

    def build(self, max_steps: int) -> Graph:
        shape_ids = [0] + self.draw(st.lists(st.integers(0, len(INPUT_SHAPES) - 1), max_size=2))
        for i, s in enumerate(shape_ids):
            v = Value(TensorType(INPUT_SHAPES[s], F32), hint=f"x{i}")
            self.inputs.append(v)
            self.floats.append(v)
        made = 0
        for step in self.draw(st.lists(st.sampled_from(self.STEPS), min_size=1, max_size=max_steps)):
            try:
                self.floats.append(getattr(self, step)(self.pick()))
                made += 1
            except Skip:
                continue
        if not made:  # at least one node
            self.floats.append(self.emit("relu", self.inputs[0]))
        outputs = self.floats[len(self.inputs):][-2:]
        if self.exact and self.draw(st.booleans()):
            outputs.append(self.exact[-1])
        return Graph(inputs=self.inputs, param_values=self.param_values, nodes=self.b.nodes, outputs=outputs,
                     params=self.params, input_names=[v.hint for v in self.inputs])


@st.composite
def graphs(draw, max_steps=8):
    return GraphMaker(draw).build(max_steps)


# -- the pipeline and the comparison --------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _default_pipeline():
    return default_registry().pipeline({})


def _round_trip(g: Graph) -> Graph:
    text = str(g)
    again = parse(text, params=g.params)
    assert structurally_equal(g, again), text
    assert str(again) == text
    typecheck(again)
    return again


def _concrete_inputs(g: Graph, sizes: dict, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def tensor(v):
        shape = tuple(int(d.subs(sizes)) for d in v.shape)
        if v.dtype.is_floating_point:
            return torch.randn(shape, generator=gen, dtype=v.dtype)
        return torch.randint(0, VOCAB_SIZE, shape, generator=gen, dtype=v.dtype)
    return [tensor(v) for v in g.inputs]


def _assert_same(got, want, where: str):
    assert len(got) == len(want), where
    for i, (o, r) in enumerate(zip(got, want)):
        assert o.dtype == r.dtype and o.shape == r.shape, f"{where} output {i}: {o.dtype}{list(o.shape)} " \
                                                          f"vs reference {r.dtype}{list(r.shape)}"
        if r.dtype.is_floating_point:
            scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * scale, equal_nan=True, msg=lambda m: f"{where} "
                                       f"output {i}: {m}")
        else:
            assert torch.equal(o, r), f"{where} output {i} differs (exact dtype {r.dtype})"


def _check_graph(g: Graph, sizes: dict, seed: int, backends: tuple[str, ...]):
    typecheck(g)
    parsed = _round_trip(g)
    optimized, _ = run_pipeline(parsed, _default_pipeline(), check=True)
    _round_trip(optimized)
    xs = _concrete_inputs(g, sizes, seed)
    want = build_program(g, op_table("torch"))(*xs)  # each op's reference, over the original graph
    for backend in backends:
        kernels = PointwiseKernels() if backend != "torch" else None
        got = build_program(optimized, op_table(backend, kernels=kernels))(*xs)
        _assert_same(got, want, f"{backend} backend at {sizes}\n{optimized}\n")


SIZES = st.fixed_dictionaries({B: st.sampled_from([1, 2, 3]), T: st.sampled_from([1, 2, 5])})


@_settings(ci_count=150, share=1.0)
@given(g=graphs(), sizes=SIZES, seed=st.integers(0, 1000))
def test_random_graphs_through_pipeline_match_reference_torch_backend(g, sizes, seed):
    _check_graph(g, sizes, seed, ("torch",))


@_settings(ci_count=40, share=0.25)
@given(g=graphs(max_steps=4), sizes=SIZES, seed=st.integers(0, 1000))
def test_random_graphs_through_pipeline_match_reference_interpret_backend(g, sizes, seed):
    _check_graph(g, sizes, seed, ("interpret",))


# -- malformed text ---------------------------------------------------------------------------
_TOKEN = re.compile(r'%[\w.]+|\$\d*|"[^"\n]*"|\w+|\s+|.', re.S)
VOCAB = ["relu", "silu", "add", "where", "cat", "softmax", "sum", "view", "linear", "attention", "torch_call",
         "fused_pointwise", "const", "nope", "%99", "%x0", "%1", "f32", "i64", "bool", "int", "f99", "(", ")", "{",
         "}", "[", "]", "=", ",", ":", "$", "$7", "none", "true", "1.5", "-1", "0", "B", "T", "B + 1", '"s"',
         "dim=", "dims=(0,)", "dtype=f32", "return", "param", "state", "graph", "#", "\n", "torch.strided",
         "device(\"cpu\")", "__class__", "f32[B, T, 8]", "**", "/", "..."]


# Ops and header forms the random graphs do not make (opaque calls, state, KV cache,
# quantized linears, symbolic scalar inputs), as the passes print them.
SEED_TEXTS = [
    IR_TEST_TEXT,  # tests/test_ir.py's graph: torch_call, cat, slice, where
    """graph(%x: f32[B, 2, T, 4], %L: int {role="cache_len"}, %s0: state "layer0.k_cache" f32[B, 2, S, 4] {layer=0, kind="k", layout="dense"}) {
  signature {outputs=("output", "output", "output", "output"), max_seq_len=64}
  %1: f32[B, 2, L + T, 4] = kv_append(%s0, %x) {start=L}
  %2: f32[B, 2, T, 4] = attention(%x, %1, %1) {causal=true, scale=0.5}
  %3: i64[T] = arange() {start=0, end=T, step=1, dtype=i64}
  %4: f32[B, T] = full() {shape=(B, T), value=0.0, dtype=f32}
  %5: f32[2, T, 4] = select(%x) {dim=0, index=0}
  return (%2, %3, %4, %5)
}""",
    """graph(%x: f32[B, T, 8], %p0: param "w0.qweight" i8[8, 8], %p1: param "w0.scale" f32[8]) {
  %1: f32[B, T, 8] = quant_linear(%x, %p0, %p1) {parts=("qweight", "scale"), \
qattrs=(("scheme", "int8"), ("shape", (8, 8)), ("orig_dtype", "float32")), bias=false}
  %2: f32[B, T, 8], %3: f32[B, T, 8] = fused_pointwise(%1) {body=(("exp", ("in0",), ()), \
("const", (), (("value", 2.0), ("dtype", f32))), ("mul", ("t0", "t1"), ())), outputs=("t0", "t2")}
  return (%2, %3)
}""",
]


@st.composite
def mutated_text(draw):
    source = draw(st.sampled_from(["graph", "optimized", "seed"]))
    if source == "seed":
        text = draw(st.sampled_from(SEED_TEXTS))
    else:
        g = draw(graphs(max_steps=4))
        text = str(run_pipeline(g, _default_pipeline(), check=False)[0] if source == "optimized" else g)
    for _ in range(draw(st.integers(1, 3))):
        text = draw(st.sampled_from([_token_edit, _line_edit, _truncate, _garbage]))(draw, text)
    return text


def _token_edit(draw, text: str) -> str:
    tokens = _TOKEN.findall(text)
    if not tokens:  # an earlier edit left nothing
        return draw(st.sampled_from(VOCAB))
    i = draw(st.integers(0, len(tokens) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "swap", "replace"]))
    if how == "delete":
        del tokens[i]
    elif how == "duplicate":
        tokens.insert(i, tokens[i])
    elif how == "swap":
        j = draw(st.integers(0, len(tokens) - 1))
        tokens[i], tokens[j] = tokens[j], tokens[i]
    else:
        tokens[i] = draw(st.sampled_from(VOCAB))
    return "".join(tokens)


def _line_edit(draw, text: str) -> str:
    lines = text.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "swap"]))
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    else:
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _truncate(draw, text: str) -> str:
    return text[:draw(st.integers(0, len(text)))]


def _garbage(draw, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.text(alphabet="%$(){}[]=,:\"#\\ \nabcf0123+-*/._", max_size=12)) + text[at:]


@_settings(ci_count=800, share=4.0)
@given(text=mutated_text())
def test_malformed_text_raises_only_parse_or_check_errors(text):
    try:
        g = parse(text)
    except ParseError:
        return
    try:
        typecheck(g)
    except IRCheckError:
        return
    # what typechecks also prints and reads back
    assert structurally_equal(g, parse(str(g))), text


@pytest.mark.parametrize("text", ["", "   \n", "graph", "graph(", "}", "return", "%1 = relu(%x)", "$"])
def test_degenerate_text_raises_parse_error(text):
    with pytest.raises(ParseError):
        parse(text)


@pytest.mark.parametrize("text", SEED_TEXTS)
def test_seed_texts_are_valid(text):
    g = parse(text)
    typecheck(g)
    assert str(g) == text
