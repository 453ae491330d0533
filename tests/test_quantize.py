"""The quantize pass: which layers it takes (by what the graph computes, not module class),
what it skips and why, the bytes it saves, and outputs close to the float model."""
import pytest
import torch

import fxforge
from fxforge.passes.quantize import QuantConfig

import zoo

# max |quantized - float| / max |float| on the random test models
TOLERANCE = {"int8": 0.03, "w8a8": 0.04, "int4": 0.3, "nf4": 0.3}


def quant_stats(fast):
    return next(s for s in fast.stats if s.name == "quantize")


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantized_model_stays_close(scheme, family):
    model, vocab = zoo.llama("sdpa", hidden=128) if family == "llama" else zoo.gpt2("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=scheme)
    stats = quant_stats(fast)
    rule = "linear" if family == "llama" else "matmul_param"  # GPT-2's Conv1D is addmm(W[in, out])
    assert stats.rules[rule] >= 2
    # every quantized layer is a quant_linear, siblings merged by fuse_linear (q/k/v, gate/up)
    merged = next(s for s in fast.stats if s.name == "fuse_linear").details.get("fuse_linear", {"groups": []})
    assert fast.graph.count("quant_linear") + sum(len(g) - 1 for g in merged["groups"]) == sum(stats.rules.values())
    for b, t in [(1, 1), (3, 9)]:
        ids = torch.randint(0, vocab, (b, t))
        with torch.no_grad():
            ref = model(ids).logits
        err = ((fast(ids).logits - ref).abs().max() / ref.abs().max()).item()
        assert err < TOLERANCE[scheme], err


def test_report_gives_bytes_and_skip_reasons():
    model, vocab = zoo.llama("sdpa", hidden=128)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int8")
    details = quant_stats(fast).details["quantize"]
    assert details["bytes_after"] / details["bytes_before"] <= 0.26
    names = [n for n, *_ in details["layers"]]
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names
    assert ("lm_head.weight", "excluded by 'lm_head*'") in details["skipped"]
    report = fast.report()
    assert "int8: 14 layers" in report and "skipped lm_head.weight" in report
    fast4 = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int4")
    d4 = quant_stats(fast4).details["quantize"]
    assert d4["bytes_after"] / d4["bytes_before"] <= 0.14


def test_shape_that_does_not_fit_is_skipped_with_reason_when_strict():
    model, vocab = zoo.gpt2("sdpa")  # n_embd=64: K=64 is not a multiple of group 128
    cfg = QuantConfig("int4", strict_group_size=True)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=cfg)
    skipped = dict(quant_stats(fast).details["quantize"]["skipped"])
    assert "not divisible by group_size=128" in skipped["transformer.h.0.attn.c_attn.weight"]
    assert skipped["transformer.h.0.attn.c_attn.weight"].endswith("without it this layer would use group_size 64")
    cfg = QuantConfig("int4", group_size=32)
    fast32 = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=cfg)
    assert "transformer.h.0.attn.c_attn.weight" in [n for n, *_ in quant_stats(fast32).details["quantize"]["layers"]]


def _group_sizes_in_graph(fast) -> dict:
    """weight name -> the group size recorded in its quant_linear's qattrs."""
    out = {}
    for node in fast.graph.nodes:
        if node.op == "quant_linear":
            qweight = node.inputs[1 + node.attrs["parts"].index("qweight")].param
            out[qweight.rsplit(".", 1)[0]] = dict(node.attrs["qattrs"])["group_size"]
    return out


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_group_size_falls_back_per_layer_to_the_largest_that_divides(scheme):
    # GPT-2 here: c_attn, c_proj, c_fc read K=64, mlp.c_proj reads K=256. Asked for 128,
    # every layer must still be quantized: the K=64 ones at group 64, the K=256 ones at 128.
    model, vocab = zoo.gpt2("sdpa")
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig(scheme, group_size=128))
    details = quant_stats(fast).details["quantize"]
    assert [name for name, _ in details["skipped"]] == ["lm_head.weight"]
    sizes = _group_sizes_in_graph(fast)
    assert sizes == details["group_sizes"] and len(sizes) == 8
    assert sizes["transformer.h.0.attn.c_attn.weight"] == 64 and sizes["transformer.h.0.mlp.c_proj.weight"] == 128
    assert (f"{scheme}: 6 layers at group_size 64 (in_features 64 not a multiple of 128; "
            "strict_group_size=True skips them instead)") in fast.report()
    with torch.no_grad():
        ref = model(ids).logits
    assert ((fast(ids).logits - ref).abs().max() / ref.abs().max()).item() < TOLERANCE[scheme]


class _OutputNamedHead(torch.nn.Module):
    """Meta's and llama2.c's spelling: the head is called `output`, not lm_head."""

    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(vocab, dim)
        self.w1 = torch.nn.Linear(dim, 64, bias=False)
        self.w2 = torch.nn.Linear(64, dim, bias=False)
        self.output = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        h = h + self.w2(torch.nn.functional.silu(self.w1(h)))
        return self.output(h).float()


def test_the_output_head_stays_float_by_default_whatever_its_name():
    """The default keeps lm_head* float by name; a head named otherwise was quantized (a
    3.6e-2 logit error on Meta's llama spelling). It is found by what it computes: its
    result is a graph output through no other product. An `exclude` without OUTPUT_HEAD
    (here: only embeddings) quantizes it, as it does lm_head."""
    from fxforge.passes.quantize import OUTPUT_HEAD

    torch.manual_seed(0)
    model = _OutputNamedHead().eval()
    ids = torch.randint(0, 64, (2, 7))
    details = quant_stats(fxforge.optimize(model, (ids,), quantize="int8")).details["quantize"]
    assert dict(details["skipped"])["output.weight"].startswith("the output head")
    assert {name for name, *_ in details["layers"]} == {"w1.weight", "w2.weight"}
    details = quant_stats(fxforge.optimize(model, (ids,), quantize=QuantConfig("int8", exclude=("*embed*",)))
                          ).details["quantize"]
    assert "output.weight" in {name for name, *_ in details["layers"]}
    assert OUTPUT_HEAD in QuantConfig("int8").exclude


def test_no_supported_group_size_divides_in_features_is_skipped_with_reason():
    model = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    # exclude=(): the last linear is the model's output head, kept float by default
    fast = fxforge.optimize(model, (torch.randn(2, 48),), quantize=QuantConfig("int4", exclude=()))
    details = quant_stats(fast).details["quantize"]
    assert details["group_sizes"] == {"2.weight": 32}
    reason = dict(details["skipped"])["0.weight"]
    assert reason == "int4: in_features K=48 is not divisible by group_size=128 nor by a smaller supported " \
                     "group size (32, 64)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="int4", group_size=100), r"int4 group_size must be one of \(32, 64, 128, 256\).*got 100"),
    (dict(scheme="nf4", group_size=0), r"nf4 group_size must be one of \(32, 64, 128, 256\).*got 0"),
    (dict(scheme="int4", group_size=True), r"group_size must be one of .* got True"),
    (dict(scheme="int4", group_size=64.0), r"group_size must be one of .* got 64.0"),
    (dict(scheme="int8", group_size=64), "group_size applies to int4 and nf4 only; int8 scales each output"),
    (dict(scheme="int4", double_quant=True), "double_quant applies to nf4 only"),
    (dict(scheme="int8", threshold=3.0), "threshold applies to w8a8 only"),
    (dict(scheme="w8a8", threshold=0), "threshold must be a positive number"),
    (dict(scheme="w8a8", threshold="6"), "threshold must be a positive number"),
    (dict(scheme="nf4", zero_point="float"), "zero_point applies to int4 only"),
    (dict(scheme="int4", include=()), r"include=\(\) matches no layer"),
])
def test_config_that_would_do_nothing_is_rejected_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(include="*mlp*"), r"include must be a tuple of glob patterns .* got '\*mlp\*'"),
    (dict(exclude=("lm_head*", 3)), "exclude must be a tuple of glob patterns"),
    (dict(scheme="nf4", double_quant="yes"), "double_quant must be True, False or None"),
    (dict(strict_group_size=1), "strict_group_size must be True or False"),
    (dict(include_tied="yes"), "include_tied must be True or False"),
    (dict(include_routers=1), "include_routers must be True or False"),
])
def test_config_fields_of_the_wrong_type_are_rejected(kwargs, message):
    with pytest.raises(TypeError, match=message):
        QuantConfig(**kwargs)


def test_valid_configs_still_build():
    assert QuantConfig("nf4", group_size=256, double_quant=True).options()["group_size"] == 256
    assert QuantConfig("w8a8", threshold=None).options() == {"threshold": None}
    assert QuantConfig("int8", include=["*mlp*"]).include == ("*mlp*",)
    assert QuantConfig("int4").options() == {"group_size": 128, "zero_point": "int"}


def test_a_tied_lm_head_is_quantized_only_when_asked():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 5))
    head = QuantConfig("int8", exclude=("*embed*",))
    kept = fxforge.optimize(model, (ids,), quantize=head)
    assert "skipped lm_head.weight: weight shared with an embedding" in kept.report()
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig("int8", exclude=("*embed*",), include_tied=True))
    layers = {name: before for name, before, _ in quant_stats(fast).details["quantize"]["layers"]}
    assert "lm_head.weight" in layers
    # the embedding keeps the float weight: the copy frees no bytes, and the report says so
    assert layers["lm_head.weight"] == 0 and "lm_head.weight: a packed copy, embedding keeps" in fast.report()
    embedding = next(n for n in fast.graph.nodes if n.op == "embedding")
    assert fast.graph.params[embedding.inputs[0].param].dtype == torch.float32  # the embedding stays float
    torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=0.1, atol=0.1)


def test_include_exclude_globs_and_unknown_scheme():
    model, vocab = zoo.llama("sdpa", hidden=128)
    cfg = QuantConfig("int8", include=("*mlp*",))
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize=cfg)
    names = [n for n, *_ in quant_stats(fast).details["quantize"]["layers"]]
    assert names and all(".mlp." in n for n in names)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; known schemes: int8, int4, nf4, w8a8"):
        fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), quantize="int3")


def test_a_config_that_quantizes_no_layer_warns_with_the_reasons():
    # every linear skipped by the user's patterns: the model keeps its size, and a warning says
    # why (report() alone would, and a typo in a pattern went unnoticed)
    model, vocab = zoo.llama("sdpa", hidden=128)
    ids = torch.randint(0, vocab, (2, 7))
    with pytest.warns(UserWarning, match=r"quantize='int8' quantized none of the model's \d+ linear weight\(s\).*"
                                         r"not in include.*include / exclude patterns"):
        fast = fxforge.optimize(model, (ids,), quantize=QuantConfig("int8", include=("*mpl*",)))
    assert not quant_stats(fast).details["quantize"]["layers"]
    import warnings
    with warnings.catch_warnings():  # a config that quantizes something does not warn
        warnings.filterwarnings("error", message="quantize=")
        fxforge.optimize(model, (ids,), quantize=QuantConfig("int8", include=("*mlp*",)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_interpret_backend_runs_the_triton_kernels(scheme):
    model, vocab = zoo.llama("sdpa", hidden=128, n_layer=1)
    ids = torch.randint(0, vocab, (1, 5))
    ref = fxforge.optimize(model, (ids,), quantize=scheme)
    fast = fxforge.optimize(model, (ids,), quantize=scheme, backend="interpret")
    torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
def test_compute_dtype_runs_the_products_in_bfloat16(scheme):
    model, vocab = zoo.llama("sdpa", hidden=128)
    ids = torch.randint(0, vocab, (2, 7))
    fast = fxforge.optimize(model, (ids,), quantize=QuantConfig(scheme, compute_dtype=torch.bfloat16))
    products = [n for n in fast.graph.nodes if n.op == "quant_linear"]
    assert products and all(n.inputs[0].dtype == n.outputs[0].dtype == torch.bfloat16 for n in products)
    # one cast per distinct input: q/k/v share one, gate/up another (2 layers x 4 inputs),
    # and so fuse_linear merges those siblings: one product per input
    assert len(products) == 8 and len({n.inputs[0] for n in products}) == 8
    assert "products in bfloat16" in fast.report()
    with torch.no_grad():
        ref = model(ids).logits
    out = fast(ids).logits
    assert out.dtype == torch.float32
    assert ((out - ref).abs().max() / ref.abs().max()).item() < TOLERANCE[scheme] + 0.02
    # the bf16 rounding moves the result a little away from float32 compute, not far
    moved = ((out - fxforge.optimize(model, (ids,), quantize=scheme)(ids).logits).abs().max() / ref.abs().max()).item()
    assert 0 < moved < 0.02


def test_compute_dtype_is_checked():
    with pytest.raises(ValueError, match="compute_dtype must be one of None, torch.float32"):
        QuantConfig("int8", compute_dtype=torch.int8)


def test_interpret_backend_with_bfloat16_compute():
    model, vocab = zoo.llama("sdpa", hidden=128, n_layer=1)
    ids = torch.randint(0, vocab, (1, 5))
    cfg = QuantConfig("int8", compute_dtype=torch.bfloat16)
    ref = fxforge.optimize(model, (ids,), quantize=cfg)
    fast = fxforge.optimize(model, (ids,), quantize=cfg, backend="interpret")
    torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=3e-2, rtol=3e-2)


class TinyMoE(torch.nn.Module):
    """An embedding, one attention-free block with a top-2 router over 4 experts (each a
    SwiGLU of its own nn.Linear layers, `gate_proj` among them: not a router) and a 3-D
    stacked weight read by a batched product, then an lm_head."""

    def __init__(self, vocab=64, hidden=64, experts=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.gate_proj = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(experts))
        self.down_proj = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(experts))
        self.stacked = torch.nn.Parameter(torch.randn(experts, hidden, hidden) / hidden ** 0.5)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        weights, chosen = torch.softmax(self.router(x), dim=-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e in range(len(self.gate_proj)):
            scale = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + scale * self.down_proj[e](torch.nn.functional.silu(self.gate_proj[e](x)))
        mixed = torch.einsum("bth,ehk->bek", x, self.stacked).mean(1, keepdim=True)
        return self.lm_head(out + x + mixed)


def test_moe_routers_stay_float_unless_asked_and_stacked_weights_are_reported():
    torch.manual_seed(0)
    model = TinyMoE().eval()
    ids = torch.randint(0, 64, (2, 5))
    fast = fxforge.optimize(model, (ids,), quantize="int8")
    details = quant_stats(fast).details["quantize"]
    quantized = {name for name, *_ in details["layers"]}
    skipped = dict(details["skipped"])
    assert "router.weight" not in quantized
    assert "router" in skipped["router.weight"] and "aten.topk" in skipped["router.weight"]
    assert "include_routers=True" in skipped["router.weight"]
    # the SwiGLU's gate_proj feeds an expert, not a choice: quantized
    assert {f"gate_proj.{e}.weight" for e in range(4)} <= quantized
    assert "3-D weight" in skipped["stacked"] and "stays float32" in skipped["stacked"]
    assert "mixture-of-experts router" in fast.report() and "stacked" in fast.report()
    with torch.no_grad():
        ref = model(ids)
    assert ((fast(ids) - ref).abs().max() / ref.abs().max()).item() < TOLERANCE["int8"]

    asked = fxforge.optimize(model, (ids,), quantize=QuantConfig("int8", include_routers=True))
    details = quant_stats(asked).details["quantize"]
    assert "router.weight" in {name for name, *_ in details["layers"]}
    assert "router.weight" not in dict(details["skipped"])


def test_a_linear_behind_another_product_is_not_a_router():
    from fxforge.ir.capture import capture
    from fxforge.passes.routers import router_weights

    class TwoProducts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 4)

        def forward(self, x):  # b's scores are chosen from; a only feeds b
            return self.b(torch.relu(self.a(x))).topk(1, dim=-1).values

    graph = capture(TwoProducts().eval(), (torch.randn(2, 8),))
    assert set(router_weights(graph)) == {"b.weight"}


def test_a_linear_spelled_x_at_w_transposed_is_quantized():
    # falcon's FalconLinear computes x @ self.weight.T (aten.numpy_T): cleanup makes it the
    # linear it is, so quantize (and fuse_linear) see it; before, int8 changed nothing
    from test_attention_variants import falcon

    torch.manual_seed(0)
    model = falcon(False)
    ids = torch.randint(0, 128, (2, 7))
    plain = fxforge.optimize(model, (ids,), passes=["cleanup"])
    assert plain.graph.count("linear") == 9, plain.ir  # 4 a layer + lm_head (the matmuls left are attention's)
    fast = fxforge.optimize(model, (ids,), quantize="int8")
    assert sum(quant_stats(fast).rules.values()) == 8
    with torch.no_grad():
        ref = model(ids).logits
    err = ((fast(ids).logits - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err < TOLERANCE["int8"], err


class _TiedAutoencoder(torch.nn.Module):
    """One weight read both ways: encoder linear(x, W), decoder h @ W."""

    def __init__(self, n_out, n_in):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(n_out, n_in) / 8)
        self.head = torch.nn.Linear(n_in, 8)

    def forward(self, x):
        return self.head(torch.relu(torch.nn.functional.linear(x, self.W)) @ self.W)


@pytest.mark.parametrize("shape", [(64, 64), (32, 64)])
def test_a_weight_read_in_both_orientations_gets_a_packing_for_each(shape):
    # one packing per weight name multiplied the second use by the wrong matrix: a square W
    # gave garbage (relative error ~1), a non-square one an IRTypeError
    torch.manual_seed(0)
    model, x = _TiedAutoencoder(*shape).eval(), torch.randn(2, 5, shape[1])
    fast = fxforge.optimize(model, (x,), quantize="int8")
    details = quant_stats(fast).details["quantize"]
    assert [n for n, *_ in details["layers"]] == ["W", "W (as matmul(x, W))"]
    assert details["bytes_before"] == model.W.numel() * 4  # the float weight was held once
    with torch.no_grad():
        ref = model(x)
    assert ((fast(x) - ref).norm() / ref.norm()).item() < TOLERANCE["int8"]


def test_a_weight_another_op_reads_in_float_stays_float_and_says_why():
    class ReadTwice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Linear(64, 64, bias=False)
            self.head = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.head(self.A(x) * self.A.weight.sum(0))

    # the float A.weight stays for sum(): a packed copy next to it was reported as 0.25x
    # the bytes while the program held 1.25x
    fast = fxforge.optimize(ReadTwice().eval(), (torch.randn(2, 5, 64),), quantize="int8")
    details = quant_stats(fast).details["quantize"]
    assert details["layers"] == [] and not any(k.startswith("A.weight.") for k in fast.state_dict())
    assert "also read by sum" in dict(details["skipped"])["A.weight"]


class _RotatedByABuffer(torch.nn.Module):
    """A fixed rotation R registered as a buffer (QuaRot style), multiplied like a weight."""

    def __init__(self, persistent=True):
        super().__init__()
        self.register_buffer("R", torch.linalg.qr(torch.randn(64, 64))[0], persistent=persistent)
        self.up, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.up(x @ self.R)))


@pytest.mark.parametrize("persistent", [True, False])
def test_a_buffer_multiplied_like_a_weight_stays_float(persistent, tmp_path):
    """Only parameters are quantized: a buffer is the model's own constant. Capture marks
    it `{buffer=true}` in the IR text, which parses back and survives save/load."""
    torch.manual_seed(0)
    model, x = _RotatedByABuffer(persistent).eval(), torch.randn(2, 5, 64)
    fast = fxforge.optimize(model, (x,), quantize="int8")
    details = quant_stats(fast).details["quantize"]
    assert [layer[0] for layer in details["layers"]] == ["up.weight"]
    assert "a buffer" in dict(details["skipped"])["R"]
    assert 'param "R" f32[64, 64] {buffer=true}' in fast.ir and str(fxforge.parse(fast.ir)) == fast.ir
    fast.save(str(tmp_path / "saved"))
    assert 'param "R" f32[64, 64] {buffer=true}' in fxforge.load(str(tmp_path / "saved")).ir
    ref = model(x)
    assert ((fast(x) - ref).norm() / ref.norm()).item() < TOLERANCE["int8"]


def test_include_exclude_match_gqa_weights_by_the_model_names():
    from fxforge.passes.gqa import source_param_name

    assert source_param_name("m.k_proj.weight.gqa_k") == "m.k_proj.weight"
    assert source_param_name("m.o_proj.weight.gqa.1") == "m.o_proj.weight"
    assert source_param_name("m.gqa.weight") == "m.gqa.weight"
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    ids = torch.randint(0, vocab, (1, 8))
    cfg = QuantConfig("int8", exclude=("lm_head*", "*.k_proj.weight", "*.v_proj.weight", "*.o_proj.weight"))
    for gqa in (2, fxforge.GQAConfig(2, "aligned", calibration=torch.randint(0, vocab, (2, 16)))):
        fast = fxforge.optimize(model, (ids,), quantize=cfg, gqa=gqa)
        names = [n for n, *_ in quant_stats(fast).details["quantize"]["layers"] if "layers.0.self_attn" in n]
        assert len(names) == 1 and "q_proj" in names[0], names


def test_weights_read_through_views_are_listed_as_skipped():
    class ThroughViews(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.Wt = torch.nn.Parameter(torch.randn(64, 64) / 8)  # [in, out], read as Wt.t()
            self.E = torch.nn.Parameter(torch.randn(64, 64) / 8)  # an einsum operand
            self.head = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.head(torch.nn.functional.linear(x, self.Wt.t()) + torch.einsum("btk,nk->btn", x, self.E))

    # both stay float, which report() said nothing about
    fast = fxforge.optimize(ThroughViews().eval(), (torch.randn(2, 5, 64),), quantize="int8")
    skipped = dict(quant_stats(fast).details["quantize"]["skipped"])
    assert skipped["Wt"].startswith("read by linear through permute")
    assert skipped["E"].startswith("read by matmul through")
    assert "skipped Wt: read by linear" in fast.report()


def test_linears_with_weights_computed_in_forward_are_listed_as_skipped():
    # parametrize / weight_norm / W * scale: the linear reads a computed weight, which quantize
    # leaves float; such weights were missing from the report altogether
    from torch.nn.utils import parametrize

    class Symmetric(torch.nn.Module):
        def forward(self, w):
            return (w + w.t()) / 2

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight * 0.5, self.bias)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.d, self.b = torch.nn.Linear(64, 64), Scaled(64, 64), torch.nn.Linear(64, 64)
            parametrize.register_parametrization(self.a, "weight", Symmetric())

        def forward(self, x):
            return self.b(self.d(self.a(x))).relu()

    torch.manual_seed(0)
    fast = fxforge.optimize(M().eval(), (torch.randn(2, 64),), quantize="int8")
    details = next(s.details["quantize"] for s in fast.stats if s.name == "quantize")
    skipped = dict(details["skipped"])
    assert "weight computed from it" in skipped["a.parametrizations.weight.original"]
    assert "weight computed from it" in skipped["d.weight"]
