"""torch.compile(backend=fxforge) on what a held-out tester found: each case gives eager's
answer (outputs, and the inputs and buffers the model writes) or a clear error."""
import pytest
import torch
import torch.nn as nn

import fxforge.dynamo as fxforge_dynamo
from fxforge.dynamo import FxforgeBackend
from helpers import compile_count


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled frames of one test must not serve the next
    yield
    torch._dynamo.reset()


def run_both(fn, *inputs, backend=None):
    """(eager result, eager inputs after, compiled result, compiled inputs after)."""
    eager_in = [x.clone() for x in inputs]
    fast_in = [x.clone() for x in inputs]
    fx = backend or FxforgeBackend()
    with torch.no_grad():
        expected = fn(*eager_in)
        got = torch.compile(fn, backend=fx)(*fast_in)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    return expected, eager_in, got, fast_in


# -- in-place ops through views -----------------------------------------------------------

VIEW_WRITES = {
    "view_mul": lambda x: (x.view(-1).mul_(3), x.sum(-1))[1],
    "column_mul": lambda x: (x[:, 1].mul_(3), x.sum(-1))[1],
    "strided_rows_mul": lambda x: (x[::2].mul_(3), x.sum(-1))[1],
    "transposed_row_mul": lambda x: (x.t()[0].mul_(3), x.sum(-1))[1],
    "diagonal_mul": lambda x: (x.diagonal().mul_(3), x.sum(-1))[1],
    "column_div": lambda x: (x.t()[1].div_(4), x.sum(-1))[1],
    "view_mul_result_unread": lambda x: (x.view(-1).mul_(3.0), torch.ones(1))[1],
    "whole_mul_result_unread": lambda x: (x.mul_(3), torch.ones(1))[1],
    "column_add": lambda x: (x[:, 1].add_(1), x.sum(-1))[1],
    "column_copy": lambda x: (x[:, 1].copy_(x[:, 0]), x.sum(-1))[1],
}


@pytest.mark.parametrize("name", VIEW_WRITES)
def test_in_place_write_through_a_view_of_an_input_reaches_the_input(name):
    """A mul_/div_ by a number on a view was kept as an opaque in-place call that
    fuse_attention's in-place-scale rule read as out-of-place (its view is read by nothing
    else) and dropped: the output missed it and the input stayed unchanged."""
    x = torch.arange(12.).reshape(4, 3)
    expected, (eager_x,), got, (fast_x,) = run_both(VIEW_WRITES[name], x)
    assert torch.equal(fast_x, eager_x)
    assert torch.equal(got, expected)


class DecayedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.register_buffer("ema", torch.ones(4, 8))

    def forward(self, x):
        self.ema[0].mul_(0.9)  # one row of a buffer
        h = self.l(x)
        h[:, 0].mul_(2)  # one column of an intermediate
        return h + self.ema.sum(0)


def test_in_place_scale_of_a_buffer_row_and_an_intermediate_column():
    torch.manual_seed(0)
    eager, model = DecayedBuffer().eval(), DecayedBuffer().eval()
    model.load_state_dict(eager.state_dict())
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fast(x), eager(x))
            torch.testing.assert_close(model.ema, eager.ema)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]


def test_output_after_a_strided_write_is_a_new_tensor_as_in_eager():
    def f(x):
        x.view(-1)[::2].mul_(3)
        return x * 1

    x = torch.arange(12.).reshape(4, 3)
    expected, (eager_x,), got, (fast_x,) = run_both(f, x)
    assert torch.equal(fast_x, eager_x) and torch.equal(got, expected)
    assert got.data_ptr() != fast_x.data_ptr()


def test_an_input_written_and_returned_is_returned_itself_as_in_eager():
    x = torch.arange(12.).reshape(4, 3)
    expected, (eager_x,), got, (fast_x,) = run_both(lambda x: x.mul_(3), x)
    assert torch.equal(fast_x, eager_x) and torch.equal(got, expected)
    assert got is fast_x


# -- weight names -------------------------------------------------------------------------

class TwoLayersCountingCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # dynamo then spells weights L['self'].__dict__['_modules']['a']...
        return self.b(self.a(x))


class PlainListOfLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = [nn.Linear(16, 16), nn.Linear(16, 16)]  # not registered: no _modules path

    def forward(self, x):
        for block in self.blocks:
            x = block(x).tanh()
        return x


def _global_layers(x):
    return _LAYER_2(_LAYER_1(x).relu())


torch.manual_seed(0)
_LAYER_1, _LAYER_2 = nn.Linear(16, 16), nn.Linear(16, 16)


@pytest.mark.parametrize("case", ["attribute_set_in_forward", "plain_list", "globals", "module_arguments"])
def test_each_layer_keeps_its_own_weights(case):
    """Weights whose dynamo source has no _modules path were all named by their leaf
    (weight, bias): the second layer's weights replaced the first's."""
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    if case == "module_arguments":
        def fn(a, b, x):
            return b(a(x).relu())
        args = (_LAYER_1, _LAYER_2, x)
    elif case == "globals":
        fn, args = _global_layers, (x,)
    else:
        fn = (TwoLayersCountingCalls if case == "attribute_set_in_forward" else PlainListOfLayers)().eval()
        args = (x,)
    fx = FxforgeBackend()
    with torch.no_grad():
        expected = fn(*args)
        got = torch.compile(fn, backend=fx)(*args)
    torch.testing.assert_close(got, expected)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    names = list(fx.models[0].graph.params)
    assert len(names) == 4 and len(set(names)) == 4, names


def test_weight_paths_read_dynamo_sources():
    from fxforge.dynamo.subgraph import weight_path

    assert weight_path("L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']") \
        == "model.layers.0.weight"
    assert weight_path("L['self'].__dict__['_modules']['a']._parameters['bias']") == "a.bias"
    assert weight_path("L['self'].blocks[1]._parameters['weight']") == "blocks.1.weight"
    assert weight_path("G['lin1']._buffers['mask']") == "lin1.mask"
    assert weight_path("L['x']") is None


def test_clashing_weight_paths_get_distinct_names_or_an_error():
    from fxforge.dynamo.subgraph import _attach, _Paths

    paths = _Paths()
    assert paths.unique("a.weight", "p0") == "a.weight"
    assert paths.unique("a.weight", "p1") == "p1"  # the same spelling twice: two tensors
    assert paths.unique("a", "p2") == "p2"  # a module on the way to a.weight
    assert paths.unique("a.weight.x", "p1") == "p1_1"  # through a weight; p1 is taken
    root = nn.Module()
    _attach(root, "a.weight", nn.Parameter(torch.ones(1)))
    with pytest.raises(AssertionError, match="two weights"):
        _attach(root, "a.weight", nn.Parameter(torch.zeros(1)))
    with pytest.raises(AssertionError, match="through a weight"):
        _attach(root, "a.weight.x", nn.Parameter(torch.zeros(1)))


# -- dims dynamo leaves dynamic at size 1 --------------------------------------------------

class SqueezedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 16)

    def forward(self, x):
        return self.l(x).squeeze(1) * 2


@pytest.mark.parametrize("how", ["mark_unbacked", "backed_size_oblivious"])
@pytest.mark.parametrize("lengths", [(5, 1, 3), (1, 4)])
def test_a_dynamic_dim_at_one_gets_a_model_of_its_own(how, lengths):
    """mark_unbacked or backed_size_oblivious keep one dynamo graph for every size, 1
    included; fxforge traced the dim at >= 2, where squeeze(1) does nothing, and returned
    (2, 1, 16) at T=1 where eager returns (2, 16)."""
    torch.manual_seed(0)
    model = SqueezedLinear().eval()
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=how == "backed_size_oblivious")
    with torch.no_grad(), oblivious:
        for length in lengths:
            x = torch.randn(2, length, 16)
            if how == "mark_unbacked":
                torch._dynamo.decorators.mark_unbacked(x, 1)
            else:
                torch._dynamo.mark_dynamic(x, 1)
            expected = model(x)
            got = fast(x)
            assert got.shape == expected.shape, (length, got.shape, expected.shape)
            torch.testing.assert_close(got, expected)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    assert len(fx.compiled) == 2  # one for sizes >= 2, one at 1


# -- torch.compile's mode= and options= ----------------------------------------------------

def _compile_and_call(**compile_arguments):
    model = nn.Linear(16, 16).eval()
    with torch.no_grad():
        return torch.compile(model, **compile_arguments)(torch.randn(2, 16))


@pytest.mark.parametrize("backend", ["function", "object"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_mode_is_refused_with_what_to_use_instead(backend, mode):
    fx = fxforge_dynamo.backend if backend == "function" else FxforgeBackend()
    with pytest.raises(Exception, match=r"fxforge has no modes.*options="):
        _compile_and_call(backend=fx, mode=mode)


def test_mode_default_is_no_mode():
    _compile_and_call(backend=fxforge_dynamo.backend, mode="default")


def test_options_beside_a_backend_object_say_where_options_go():
    with pytest.raises(Exception, match=r"FxforgeBackend\(quantize='int8'\), not options"):
        _compile_and_call(backend=FxforgeBackend(), options={"quantize": "int8"})


def test_an_unknown_option_fails_at_the_first_compile_with_the_known_ones():
    """A typo warned once per subgraph and left the whole model uncompiled."""
    with pytest.raises(Exception, match=r"no option\(s\) \['quantise'\].*'quantize'"):
        _compile_and_call(backend=fxforge_dynamo.backend, options={"quantise": "int8"})
    with pytest.raises(TypeError, match=r"no option\(s\) \['quantise'\]"):
        FxforgeBackend(quantise="int8")


# -- torch.compile(dynamic=True): Python numbers ------------------------------------------

class ScaledSoftmax(nn.Module):
    def __init__(self, scale=0.125, shift=3):
        super().__init__()
        self.l = nn.Linear(16, 16)
        self.scale, self.shift = scale, shift

    def forward(self, x, n):
        return self.l(x).softmax(-1) * self.scale + self.shift + n


def test_dynamic_true_bakes_python_numbers_in_and_compiles():
    """dynamic=True passes a float attribute as an f64[] input read with .item(), and an
    int one as a size of no input: fxforge fell back ('a tensor's value is read into
    Python (zuf0)', though the user never called .item()). Each compiled model now has
    the numbers baked in and serves calls with those values; another value compiles anew.
    (An int argument comes as a size that is no dim of an input: it fell back too.)"""
    torch.manual_seed(0)
    model = ScaledSoftmax().eval()
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx, dynamic=True)
    with torch.no_grad():
        for length in (3, 5):
            x = torch.randn(2, length, 16)
            torch.testing.assert_close(fast(x, 2), model(x, 2))
        torch.testing.assert_close(fast(x, 4), model(x, 4))  # an int argument: another value
        model.scale = 0.5  # another float: eager's answer, not the baked one
        torch.testing.assert_close(fast(x, 4), model(x, 4))
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]


# -- a buffer written by another subgraph ------------------------------------------------

class StepAcrossABreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.ls = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        y = self.ls(x) * (1 + self.step)  # one subgraph reads the buffer
        torch._dynamo.graph_break()
        self.step.add_(1)  # the next one writes it
        return y


def test_a_buffer_another_subgraph_writes_is_read_live_not_recompiled_for(monkeypatch):
    """The reading subgraph's weight guard saw a new version of the buffer at every call
    and rebuilt its model every time; after the first such edit it takes the buffer as an
    input it reads at each call."""
    torch.manual_seed(0)
    eager, model = StepAcrossABreak().eval(), StepAcrossABreak().eval()
    model.load_state_dict(eager.state_dict())
    fx = FxforgeBackend()
    fast = torch.compile(model, backend=fx)
    compiles = compile_count(monkeypatch)
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(2, 16)
            torch.testing.assert_close(fast(x), eager(x))
            assert torch.equal(model.step, eager.step)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    assert compiles[0] <= 3, compiles[0]  # reader, writer, the reader once more with the buffer live


# -- outputs alias what eager's alias, and nothing else -----------------------------------

def _shares(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("fn", [lambda x: x * 1, lambda x: x + 0, lambda x: x.clone(),
                                lambda x: (x.clone()[0].mul_(10), x * 1)[1]],
                         ids=["mul_one", "add_zero", "clone", "clone_written_then_mul_one"])
def test_a_new_tensor_in_eager_is_a_new_tensor_compiled(fn):
    """A pass folds `x * 1` to x: the compiled model returned the input itself, and a
    write to the output changed the caller's x."""
    x = torch.arange(4.)
    with torch.no_grad():
        out = torch.compile(fn, backend=FxforgeBackend())(x)
    assert not _shares(out, x)
    out.fill_(-1)
    assert torch.equal(x, torch.arange(4.))


def test_two_equal_outputs_are_two_tensors_and_clones_of_weights_are_their_own():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("buf", torch.zeros(2))

        def forward(self, x):
            return self.lin(x), self.buf.clone(), self.lin.weight * 1, x * 2, x * 2

    model = M().eval()
    weight = model.lin.weight.detach().clone()
    fx = FxforgeBackend()
    with torch.no_grad():
        _, snap, w, a, b = torch.compile(model, backend=fx)(torch.ones(2))
        snap.add_(5)
        w.zero_()
        a.fill_(-1)
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]
    assert torch.equal(model.buf, torch.zeros(2)) and torch.equal(model.lin.weight, weight)
    assert torch.equal(b, torch.full((2,), 2.))


def test_the_same_node_returned_twice_is_one_tensor_as_in_eager():
    def f(x):
        y = x * 2
        return y, y

    with torch.no_grad():
        a, b = torch.compile(f, backend=FxforgeBackend())(torch.ones(2))
    assert a is b


def test_a_clone_written_after_a_graph_break_leaves_the_input():
    def f(x):
        h = x.clone()
        torch._dynamo.graph_break()
        h.add_(100)
        return h.sum()

    x = torch.arange(4.)
    with torch.no_grad():
        assert torch.compile(f, backend=FxforgeBackend())(x).item() == 406
    assert torch.equal(x, torch.arange(4.))


VIEW_OUTPUTS = {
    "view_dtype": (lambda x: x.view(torch.int32), lambda: torch.ones(3)),
    "view_dtype_written": (lambda x: x.mul_(2).view(torch.int32), lambda: torch.ones(3)),
    "conj": (lambda x: x.conj(), lambda: torch.tensor([1 + 2j, 3 - 1j])),
    "slice_all": (lambda x: x[:], lambda: torch.arange(12.).reshape(3, 4)),
    "view_same_shape": (lambda x: x.view(x.shape), lambda: torch.arange(12.).reshape(3, 4)),
    "expand_as": (lambda x: x.expand_as(x), lambda: torch.arange(12.).reshape(3, 4)),
    "unsqueeze_squeeze": (lambda x: x.unsqueeze(0).squeeze(0), lambda: torch.arange(12.).reshape(3, 4)),
    "detach": (lambda x: x.detach(), lambda: torch.ones(3, 4, requires_grad=True)),
}


@pytest.mark.parametrize("name", VIEW_OUTPUTS)
def test_a_view_of_an_input_is_a_new_view_with_eager_dtype_and_bits(name):
    """_returned_inputs matched storage, sizes, strides and offset only: x.view(int32) came
    back as x (float32), x.conj() unconjugated, x[:] as x itself (o.t_() then transposed
    the caller's x), x.detach() with requires_grad."""
    fn, make = VIEW_OUTPUTS[name]
    x_eager, x_fast = make(), make()
    with torch.no_grad():
        expected = fn(x_eager)
        got = torch.compile(fn, backend=FxforgeBackend())(x_fast)
    assert got.dtype == expected.dtype and got.is_conj() == expected.is_conj()
    assert got.requires_grad == expected.requires_grad
    assert (got is x_fast) == (expected is x_eager) and _shares(got, x_fast)
    assert torch.equal(got.resolve_conj(), expected.resolve_conj())
    got.t_() if got.dim() == 2 else None
    assert x_fast.shape == x_eager.shape


def test_a_view_of_a_written_input_stays_a_view_across_a_graph_break():
    """After a write through a view the graph was made functional and the view output was
    a copy: y.add_(1) after the break missed x (72, eager 75)."""
    def f(x):
        x[0].mul_(2)
        y = x[:, 1]
        torch._dynamo.graph_break()
        y.add_(1)
        return x.sum()

    x_eager, x_fast = torch.arange(12.).reshape(3, 4), torch.arange(12.).reshape(3, 4)
    fx = FxforgeBackend()
    with torch.no_grad():
        expected = f(x_eager)
        got = torch.compile(f, backend=fx)(x_fast)
    assert got.item() == expected.item() == 75
    assert torch.equal(x_fast, x_eager)
    assert fx.compiled  # the first subgraph, which writes x and returns the view


def test_a_view_of_a_written_input_or_buffer_is_returned_as_a_view():
    class Ema(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("ema", torch.ones(3, 4))

        def forward(self, x):
            self.ema[1:].add_(x)
            return self.ema

    def row(x):
        x[:, 1].mul_(3)
        return x[0]

    x = torch.arange(12.).reshape(3, 4)
    fx = FxforgeBackend()
    with torch.no_grad():
        out = torch.compile(row, backend=fx)(x)
        out.fill_(-1)
        assert torch.equal(x[0], torch.full((4,), -1.))
        model = Ema()
        assert torch.compile(model, backend=fx)(torch.ones(4)) is model.ema
    assert not fx.fallbacks, [f.reason for f in fx.fallbacks]


# -- inputs sharing memory ----------------------------------------------------------------

def test_a_write_to_an_expanded_input_falls_back_with_a_reason():
    def f(x):
        x[0].mul_(2)
        return x.sum()

    x_eager, x_fast = torch.arange(4.).expand(3, 4), torch.arange(4.).expand(3, 4)
    fx = FxforgeBackend()
    with torch.no_grad(), pytest.warns(UserWarning, match="share memory"):
        got = torch.compile(f, backend=fx)(x_fast)
    assert got.item() == f(x_eager).item()
    assert torch.equal(x_fast, x_eager)
    assert "stride 0" in fx.fallbacks[0].reason


def test_overlapping_inputs_fall_back_with_a_one_line_reason(caplog):
    b = torch.arange(16.).reshape(4, 4)
    fx = FxforgeBackend()
    with torch.no_grad(), pytest.warns(UserWarning, match="overlap in memory"):
        out = torch.compile(lambda x, y: (x.mul_(2), y + 0)[1], backend=fx)(b[0:2], b[1:3])
    assert out.tolist() == [[8, 10, 12, 14], [8, 9, 10, 11]]
    assert "overlap in memory" in fx.fallbacks[0].reason
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -- dynamic=True numbers and weights edited between calls -------------------------------

def test_minus_zero_is_another_number_than_zero():
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 0.0

        def forward(self, x):
            return 1.0 / (x * self.scale)

    model = S()
    fast = torch.compile(model, backend=FxforgeBackend(), dynamic=True)
    with torch.no_grad():
        for value in (0.0, -0.0, 0.0):
            model.scale = value
            assert torch.equal(fast(torch.ones(2)), model(torch.ones(2)))


def test_a_parameter_edited_before_every_call_is_capped_by_max_weight_sets(monkeypatch):
    class Edited(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin.bias.add_(0.5)
            torch._dynamo.graph_break()
            return self.lin(x)

    torch.manual_seed(0)
    eager, model = Edited(), Edited()
    model.load_state_dict(eager.state_dict())
    fx = FxforgeBackend(max_weight_sets=3)
    compiles = compile_count(monkeypatch)
    fast = torch.compile(model, backend=fx)
    with torch.no_grad(), pytest.warns(UserWarning, match="more than 3 sets of weights"):
        for _ in range(10):
            x = torch.randn(2, 4)
            torch.testing.assert_close(fast(x), eager(x))
    assert compiles[0] <= 4, compiles[0]  # the writer once, the reader up to the limit
    assert len(fx.fallbacks) == 1
