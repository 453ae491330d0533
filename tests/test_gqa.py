"""gqa: MHA -> GQA with fewer K/V heads. Exact when heads are already duplicated within
groups; otherwise approximate, with the error reported; composes with kv_cache."""
import pytest
import torch

import fxforge
from fxforge.passes.gqa import GQAConfig, GQAError

import zoo
from helpers import assert_close_to_eager, assert_matches_eager, assert_round_trips


def _duplicate_llama_heads(model, group):
    """Make K/V heads equal within consecutive groups of `group` heads: GQA in disguise."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            d = attn.head_dim
            for proj in (attn.k_proj, attn.v_proj):
                w = proj.weight.view(-1, d, proj.weight.shape[1])
                for h in range(w.shape[0]):
                    w[h] = w[h - h % group]
    return model


def _duplicate_gpt2_heads(model, group):
    with torch.no_grad():
        for block in model.transformer.h:
            c = block.attn.c_attn
            n_embd, d = c.weight.shape[0], block.attn.head_dim
            for part in (1, 2):  # K and V columns of the fused [in, 3 * n_embd] weight
                cols = slice(part * n_embd, (part + 1) * n_embd)
                w = c.weight[:, cols].view(n_embd, -1, d)
                b = c.bias[cols].view(-1, d)
                for h in range(w.shape[1]):
                    w[:, h] = w[:, h - h % group]
                    b[h] = b[h - h % group]
    return model


def _gqa_details(fast):
    return next(s.details["gqa"] for s in fast.stats if s.name == "gqa")


@pytest.mark.parametrize("method", ["mean", "aligned"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_duplicated_heads_convert_exactly(name, method):
    if name == "llama":
        model, vocab = zoo.llama("sdpa", kv_heads=4)
        _duplicate_llama_heads(model, 2)
    else:
        model, vocab = zoo.gpt2("sdpa")
        _duplicate_gpt2_heads(model, 2)
    calib = torch.randint(0, vocab, (2, 24))
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),),
                            gqa=GQAConfig(2, method, calibration=calib))
    assert all(int(n.inputs[1].shape[1]) == 2 for n in fast.graph.nodes if n.op == "attention")
    assert_matches_eager(model, fast, vocab, [(1, 5), (3, 13)])
    assert max(layer["rel_error"] for layer in _gqa_details(fast)["layers"]) < 1e-5
    assert_round_trips(fast.graph)


def test_projections_shrink_and_old_weights_leave_the_graph():
    model, vocab = zoo.gpt2("sdpa")
    ids = (torch.randint(0, vocab, (2, 7)),)
    fast = fxforge.optimize(model, ids, gqa=1, disable=["fuse_linear"])
    names = set(fast.graph.params)
    assert not any(n.endswith("c_attn.weight") for n in names)  # the fused qkv is split, then gone
    kv = [t.shape for n, t in fast.graph.params.items() if n.endswith(("c_attn.weight.gqa_k", "c_attn.weight.gqa_v"))]
    assert kv == [(16, 64)] * 4  # K and V of 2 layers: 1 head x 16 outputs, down from 4 heads x 16
    text = fast.ir
    assert "attention(" in text and "f32[B, 1, T, 16]" in text
    # fuse_linear (in the default pipeline) joins the shrunk q, k, v again: 64 + 16 + 16 rows
    fused = fxforge.optimize(model, ids, gqa=1)
    qkv = [t.shape for n, t in fused.graph.params.items() if n.endswith("c_attn.weight.{gqa_q,gqa_k,gqa_v}")]
    assert qkv == [(96, 64)] * 2, sorted(fused.graph.params)


@pytest.mark.parametrize("name, G", [("llama_mha", 2), ("llama_mha", 1), ("gpt2", 2), ("gpt2", 1), ("smol_like", 1)])
def test_aligned_beats_mean(name, G):
    model, vocab = {"llama_mha": lambda: zoo.llama("sdpa", kv_heads=4), "gpt2": lambda: zoo.gpt2("sdpa"),
                    "smol_like": lambda: zoo.llama("sdpa", kv_heads=2)}[name]()
    calib = torch.randint(0, vocab, (4, 32))
    errors = {}
    for method in ("mean", "aligned"):
        fast = fxforge.optimize(model, (calib[:1, :7],), gqa=GQAConfig(G, method, calibration=calib))
        errors[method] = sum(layer["rel_error"] for layer in _gqa_details(fast)["layers"])
    assert errors["aligned"] < errors["mean"], errors


def test_report_has_errors_and_cache_bytes():
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    calib = torch.randint(0, vocab, (2, 16))
    fast = fxforge.optimize(model, (calib,), gqa=GQAConfig(2, calibration=calib))
    details = _gqa_details(fast)
    assert len(details["layers"]) == 2
    for layer in details["layers"]:
        assert layer["kv_bytes_per_token"] == (2 * 4 * 16 * 4, 2 * 2 * 16 * 4)
        assert 0 < layer["rel_error"] < 2
    report = fast.report()
    assert "gqa" in report and "KV cache bytes per token 1024 -> 512" in report
    assert "relative error per layer" in report
    # without calibration the report says how to get the error
    plain = fxforge.optimize(model, (calib,), gqa=2)
    assert "pass GQAConfig(calibration=...)" in plain.report()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_with_kv_cache_generation_works_and_cache_shrinks(name):
    model, vocab = zoo.llama("sdpa", kv_heads=4) if name == "llama" else zoo.gpt2("sdpa")
    ids = torch.randint(0, vocab, (2, 7))
    full = fxforge.optimize(model, (ids,), kv_cache=True)
    small = fxforge.optimize(model, (ids,), kv_cache=True, gqa=GQAConfig(1))
    assert small.kv_layout.bytes_per_token * 4 == full.kv_layout.bytes_per_token  # exactly Hkv / G
    prompt = torch.randint(0, vocab, (2, 5))
    out = small.generate(prompt, 10)
    # the cached GQA model decodes as its own uncached graph does, greedily
    nocache = fxforge.optimize(model, (ids,), gqa=GQAConfig(1))
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, nocache(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
    small.generate(prompt, 3)
    [cache] = small._caches.idle
    assert cache.nbytes() * 4 == full.kv_cache_for(2, cache.capacity).nbytes()


def test_bad_inputs():
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    ids = torch.randint(0, vocab, (2, 7))
    with pytest.raises(GQAError, match="does not divide this model's 4 KV heads"):
        fxforge.optimize(model, (ids,), gqa=3)
    with pytest.raises(GQAError, match="unknown method 'median'"):
        fxforge.optimize(model, (ids,), gqa=GQAConfig(2, "median"))
    with pytest.raises(GQAError, match="needs calibration"):
        fxforge.optimize(model, (ids,), gqa=GQAConfig(2, "aligned"))
    with pytest.raises(GQAError, match="calibration input must be"):
        fxforge.optimize(model, (ids,), gqa=GQAConfig(2, "aligned", calibration=torch.randn(2, 7)))
    with pytest.raises(GQAError, match="no fused attention"):
        fxforge.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8)), (torch.randn(2, 8),), gqa=1)


def test_composes_with_quantize_and_kv_cache():
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    calib = torch.randint(0, vocab, (2, 24))
    fast = fxforge.optimize(model, (calib[:, :7],), gqa=GQAConfig(2, "aligned", calibration=calib),
                            kv_cache=True, quantize="int8")
    order = [s.name for s in fast.stats]
    assert order.index("gqa") < order.index("kv_cache") < order.index("quantize")
    # each layer's K and V appends: one fused node storing both (fuse_elementwise.store_appends)
    stores = [n for n in fast.graph.nodes if n.attrs.get("into")]
    assert fast.graph.count("quant_linear") > 0 and len(stores) == 2 and all(len(n.attrs["into"]) == 2 for n in stores)
    prompt = torch.randint(0, vocab, (1, 5))
    out = fast.generate(prompt, 6)
    # the quantized weights include the new, merged K/V projections
    assert any(".gqa_k" in n for n in fast.graph.params)
    seq = prompt
    plain = fxforge.optimize(model, (calib[:, :7],), gqa=GQAConfig(2, "aligned", calibration=calib), quantize="int8")
    for _ in range(6):
        seq = torch.cat([seq, plain(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name, kv_heads", [("qwen2", 2), ("phi3", 2), ("gemma", 2), ("gpt_neox", 4)])
def test_other_architectures_convert(name, kv_heads):
    # phi3: slices of a fused qkv linear; gpt_neox: q, k, v interleaved per head, sliced
    # after the head split and permute, with partial rotary (so K is only averaged)
    from test_kv_cache import _arch

    model, vocab = _arch(name)
    ids = torch.randint(0, vocab, (2, 9))
    calib = torch.randint(0, vocab, (2, 32))
    # G = Hkv changes nothing but the rewiring: exact
    same = fxforge.optimize(model, (ids,), gqa=GQAConfig(kv_heads, "aligned", calibration=calib))
    with torch.no_grad():
        assert_close_to_eager(model(ids), same(ids))
    assert max(layer["rel_error"] for layer in _gqa_details(same)["layers"]) < 1e-5
    merged = fxforge.optimize(model, (ids,), gqa=GQAConfig(1, "aligned", calibration=calib), kv_cache=True)
    assert merged.generate(ids[:1, :4], 5).shape == (1, 9)


def _duplicate_rows(weight, bias, heads, group):
    """K or V projection rows [heads * d, in] (and bias) equal within groups of heads."""
    w = weight.view(heads, -1, weight.shape[1])
    b = bias.view(heads, -1) if bias is not None else None
    for h in range(heads):
        w[h] = w[h - h % group]
        if b is not None:
            b[h] = b[h - h % group]


@pytest.mark.parametrize("name", ["xglm", "mpt"])
def test_folded_heads_and_alibi_convert_exactly(name):
    # XGLM folds its heads into the batch for the matmuls (views around the fused attention
    # that gqa once tripped on); MPT's ALiBi slopes are the attention's fourth input, not
    # a mask
    from test_attention_variants import mpt, xglm

    torch.manual_seed(0)
    model = xglm() if name == "xglm" else mpt()
    with torch.no_grad():
        if name == "xglm":
            for layer in model.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    _duplicate_rows(proj.weight, proj.bias, 4, 2)
        else:
            for block in model.transformer.blocks:
                w = block.attn.Wqkv.weight
                n = w.shape[0] // 3
                for part in (1, 2):
                    _duplicate_rows(w[part * n:(part + 1) * n], None, 4, 2)
    ids = torch.randint(2, 128, (1, 9))
    fast = fxforge.optimize(model, (ids,), gqa=GQAConfig(2, "mean"), kv_cache=True)
    assert [int(n.inputs[1].shape[1]) for n in fast.graph.nodes if n.op == "attention"] == [2, 2], fast.ir
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(fast.generate(ids, 8, eos_token_id=None), ref)


@pytest.mark.parametrize("name, says", [
    ("gptj", "aten.stack.default .* is an interleaved rotary embedding"),
    ("qwen3", "is a norm of the keys"),
])
def test_refusals_name_the_op_in_the_way(name, says):
    import transformers as tr

    if name == "gptj":
        model = tr.GPTJForCausalLM(tr.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                 n_positions=128))
    else:
        model = tr.Qwen3ForCausalLM(tr.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=4, head_dim=16))
    with pytest.raises(GQAError, match=says):
        fxforge.optimize(model.eval(), (torch.randint(0, 128, (1, 6)),), gqa=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_convert(dtype):
    # the float32 head maps met bfloat16 weight blocks in one matmul: every half model crashed
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    model = model.to(dtype)
    ids, calib = torch.randint(0, vocab, (2, 7)), torch.randint(0, vocab, (2, 16))
    assert fxforge.optimize(model, (ids,), gqa=2)(ids).logits.dtype == dtype
    fast = fxforge.optimize(model, (ids,), gqa=GQAConfig(2, "aligned", calibration=calib))
    assert fast(ids).logits.dtype == dtype
    # llama's rotary is rotate-half: the layout check allows for the weights' rounding
    # (~1e-3 in bfloat16) instead of taking it for another layout
    assert "only averaged" not in fast.report()
    assert all(0 < layer["rel_error"] < 2 for layer in _gqa_details(fast)["layers"])


def test_bad_calibration_is_refused_naming_it():
    model, vocab = zoo.llama("sdpa", kv_heads=4)
    ids = torch.randint(0, vocab, (2, 7))

    def refused(calib, says, method="aligned", m=model):
        with pytest.raises(GQAError, match=says):
            fxforge.optimize(m, (ids,), gqa=GQAConfig(2, method, calibration=calib))

    refused(torch.zeros(1, 0, dtype=torch.long), r"calibration input of shape \(1, 0\) is empty")
    refused(torch.randint(vocab, 2 * vocab, (1, 16)), r"calibration token ids must be in \[0, 128\)", "mean")
    # 'aligned' fits each merged head from the tokens: fewer than head_dim (16) cannot
    refused(torch.randint(0, vocab, (1, 15)), "calibration has 15 tokens .*at least 16")
    gpt2, _ = zoo.gpt2("sdpa")  # 128 positions
    refused(torch.randint(0, vocab, (1, 130)), r"fails on the calibration inputs \(shape \(1, 130\)\)", m=gpt2)


def test_gpt2_error_is_measured_with_the_out_projection_bias():
    # GPT-2's c_proj is a matmul, then an add of its bias: the error was measured before
    # the add, 10x the block output's. Mean GQA equals each K/V head replaced by its
    # group's mean, so the true error can be measured in eager with hooks.
    torch.manual_seed(0)
    model, vocab = zoo.gpt2("sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    calib = torch.randint(0, vocab, (2, 16))
    fast = fxforge.optimize(model, (calib,), gqa=GQAConfig(2, "mean", calibration=calib))
    reported = [layer["rel_error"] for layer in _gqa_details(fast)["layers"]]
    merged = zoo.gpt2("sdpa")[0]
    merged.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in merged.transformer.h:  # c_attn: [in, q | k | v], 4 heads of 16
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            for lo in (64, 128):
                g = w[:, lo:lo + 64].reshape(64, 2, 2, 16)
                w[:, lo:lo + 64] = g.mean(2, keepdim=True).expand_as(g).reshape(64, 64)
                g = b[lo:lo + 64].reshape(2, 2, 16)
                b[lo:lo + 64] = g.mean(1, keepdim=True).expand_as(g).reshape(64)

    def c_proj_outputs(m):
        outs = []
        hooks = [blk.attn.c_proj.register_forward_hook(lambda mod, i, o: outs.append(o)) for blk in m.transformer.h]
        with torch.no_grad():
            m(calib)
        for h in hooks:
            h.remove()
        return outs

    measured = [((b - a).norm() / a.norm()).item() for a, b in zip(c_proj_outputs(model), c_proj_outputs(merged))]
    assert reported == pytest.approx(measured, rel=1e-3)


def test_aligned_moves_the_alibi_slopes_with_the_query_heads():
    # MPT's KV heads 0 and 2 (and 1 and 3) made equal: 'aligned' merges them exactly and
    # permutes the query heads to [0, 2, 1, 3]; each head's ALiBi slope must move with it,
    # else heads 1 and 2 swap slopes (a wrong answer, not an approximation error)
    from test_attention_variants import mpt

    torch.manual_seed(0)
    model = mpt()
    with torch.no_grad():
        for block in model.transformer.blocks:
            w = block.attn.Wqkv.weight
            n = w.shape[0] // 3
            for part in (1, 2):
                rows = w[part * n:(part + 1) * n].view(4, n // 4, -1)
                rows[2], rows[3] = rows[0].clone(), rows[1].clone()
    ids = torch.randint(2, 128, (1, 9))
    calibration = torch.randint(2, 128, (4, 16))
    fast = fxforge.optimize(model, (ids,), gqa=GQAConfig(2, "aligned", calibration=calibration))
    attention = [n for n in fast.graph.nodes if n.op == "attention"]
    assert attention and all(n.attrs.get("alibi") and int(n.inputs[1].shape[1]) == 2 for n in attention), fast.ir
    assert_close_to_eager(model(ids), fast(ids), rel=1e-4)


def test_a_multi_query_model_is_named_as_such():
    """GPTBigCode with multi_query=True gives its one K/V head a head axis by unsqueeze:
    the refusal names multi-query attention, not an unknown op in the way."""
    import transformers as tr

    torch.manual_seed(0)
    config = tr.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, multi_query=True,
                                 bos_token_id=0, eos_token_id=0)
    model = tr.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(GQAError, match="multi-query attention .* no K/V heads to merge"):
        fxforge.optimize(model, (torch.randint(0, 64, (1, 6)),), gqa=1)


def test_multi_latent_attention_is_named_as_such():
    """DeepSeek-V3's MLA expands one rotary key head to every head: the refusal names
    multi-latent attention, not an op that is 'not a head reshape'."""
    import transformers as tr

    torch.manual_seed(0)
    config = tr.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                 q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                 v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 first_k_dense_replace=1)
    model = tr.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(GQAError, match="multi-latent attention"):
        fxforge.optimize(model, (torch.randint(0, 64, (1, 6)),), gqa=2)
