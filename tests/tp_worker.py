"""One rank of the tensor-parallel checks (tests/test_shard.py launches it):

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py llama gpt2 qwen2

Every rank builds the same small random model (same seed), optimizes it with
tensor_parallel=N (its own slice of the weights, collectives over gloo), and checks:
  - the logits equal the unsharded model's (eager transformers), within fp32 reduction
    tolerance;
  - greedy generate() gives the unsharded model's tokens, and the same tokens on every rank;
  - the rank's weight bytes are ~1/N of the sharded weights plus the replicated ones.
A case is `model[+variant]`: +vocab splits the lm_head/embedding by vocabulary, +int4
composes with quantize (compared with the unsharded model quantized the same way), +gqa
with gqa=1 (KV heads fewer than ranks: replicated). Rank 0 prints one `TP_RESULT {json}`
line per case; any failed check raises (a non-zero exit of the launch).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fxforge  # noqa: E402
import zoo  # noqa: E402
from fxforge.passes.quantize import QuantConfig  # noqa: E402
from fxforge.passes.shard import ShardConfig  # noqa: E402
from fxforge.runtime.collectives import end_process  # noqa: E402


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return Qwen2ForCausalLM(cfg).eval(), 128


SMOLLM2_LAYERS = 6


def smollm2():
    """SmolLM2-135M's real weights and heads (9 query, 3 KV), its first SMOLLM2_LAYERS of 30
    layers: every layer shards the same way, and three ranks sharing two cores run the whole
    model (load, optimize twice, eager reference, 12 tokens) in over a minute of the suite."""
    import copy

    model, tok = zoo.smollm2()
    model = copy.copy(model)  # zoo's cached model keeps its 30 layers
    model.model = copy.copy(model.model)
    model.model.layers = model.model.layers[:SMOLLM2_LAYERS]
    model.config = copy.deepcopy(model.config)
    model.config.num_hidden_layers = SMOLLM2_LAYERS
    model.model.config = model.config
    return model, tok


MODELS = {"llama": zoo.llama, "gpt2": zoo.gpt2, "qwen2": qwen2}


def _bytes(params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def run_case(case: str, world: int) -> dict:
    name, *variants = case.split("+")
    torch.manual_seed(0)
    if name == "smollm2":
        model, tok = smollm2()
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        new_tokens, rtol, atol = 12, 1e-3, 1e-3
    else:
        model, vocab = MODELS[name]()
        with torch.no_grad():  # random models' biases start at zero: make them count
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.02)
        ids = torch.randint(1, vocab, (2, 8))
        new_tokens, rtol, atol = 8, 1e-4, 1e-5
    options = {"kv_cache": True}
    if "int4" in variants:
        options["quantize"] = QuantConfig("int4", group_size=32)
    if "gqa" in variants:
        options["gqa"] = 1
    shard = ShardConfig(world, vocab="vocab" in variants)
    start = time.perf_counter()
    fast = fxforge.optimize(model, (ids[:1],), tensor_parallel=shard, verbose=False, **options)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        if "int4" in variants or "gqa" in variants:  # approximations: compare with the same, unsharded
            reference = fxforge.optimize(model, (ids[:1],), verbose=False, **options)
            ref_logits = zoo.logits_of(reference(ids))
            ref_tokens = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        else:
            ref_logits = zoo.logits_of(model(ids))
            ref_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                        pad_token_id=model.generation_config.eos_token_id)
        logits = zoo.logits_of(fast(ids))
    tokens = fast.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    err = float((logits - ref_logits).abs().max())
    assert torch.allclose(logits, ref_logits, rtol=rtol, atol=atol), f"{case}: logits differ by {err:.3g}"
    assert torch.equal(tokens, ref_tokens), f"{case}: greedy tokens differ:\n{tokens}\n{ref_tokens}"
    everyone = [None] * world
    dist.all_gather_object(everyone, tokens.tolist())
    assert all(t == everyone[0] for t in everyone), f"{case}: ranks generated different tokens"

    details = next(s.details["shard"] for s in fast.stats if s.name == "shard")
    kv_heads = details["layers"][0]["kv_heads"][1]
    caches = fast.graph.state_values
    assert caches and all(int(v.shape[1]) == kv_heads for v in caches), \
        f"{case}: the KV cache should hold this rank's {kv_heads} KV heads: {[v.type for v in caches]}"
    full = details["weight_bytes_full"]
    sharded, replicated = details["weight_bytes_sharded"], details["weight_bytes_replicated"]
    rank_bytes = _bytes(fast.graph.params)  # after the backend's planning as well as the passes
    per_rank = [None] * world
    dist.all_gather_object(per_rank, [sharded, replicated])
    if "int4" not in variants:
        # each rank holds 1/N of what is split, and all of what is replicated
        # (with fewer KV heads than ranks, each rank keeps a copy of its KV head: a bit more)
        assert all(abs(s * world + r - full) <= 1024 or "gqa" in variants for s, r in per_rank), \
            (case, per_rank, full)
    return {"case": case, "world_size": world, "max_abs_err": err, "tokens_equal": True,
            "weight_bytes_full": full, "weight_bytes_sharded": sharded, "weight_bytes_replicated": replicated,
            "rank_param_bytes": rank_bytes, "per_rank": per_rank, "optimize_s": round(seconds, 2),
            "kv_heads": details["layers"][0]["kv_heads"] if details["layers"] else None,
            "heads": details["layers"][0]["heads"] if details["layers"] else None}


def main(cases: list[str]):
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        for case in cases:
            result = run_case(case, world)
            if rank == 0:
                print("TP_RESULT " + json.dumps(result), flush=True)
    except BaseException:
        dist.destroy_process_group()
        raise
    end_process()  # barrier, teardown, exit 0 (see its docstring: gloo's threads at exit)


if __name__ == "__main__":
    main(sys.argv[1:] or ["llama", "gpt2", "qwen2"])
