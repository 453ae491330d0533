"""Tensor parallelism: one model split across N processes (GPUs, or CPU processes with gloo).

Each rank loads the same model, optimizes it with `tensor_parallel=N` and keeps its own
slice of the weights: attention by heads, each MLP by columns, with one all_reduce after
the attention output projection and one after the MLP down projection (Megatron-LM).
Every rank computes the same logits and generates the same tokens.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py            # CPU (gloo) or GPUs (nccl)
    python examples/tensor_parallel.py [--nproc 2] [--smollm2] [--vocab]  # launches torchrun itself

--smollm2 uses SmolLM2-135M (9 query heads, 3 KV heads: run it with --nproc 3); the
default is a small random Llama (no download). --vocab splits the embedding and the
lm_head by vocabulary too. See docs/tensor-parallel.md for several machines.
"""
import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fxforge  # noqa: E402
from fxforge.runtime.collectives import end_process  # noqa: E402
from fxforge.passes.shard import ShardConfig  # noqa: E402


def load(smollm2: bool):
    if smollm2:
        import zoo

        model, tok = zoo.smollm2()
        return model, tok("The capital of France is", return_tensors="pt").input_ids, tok
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same random weights on every rank
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval(), torch.randint(1, 256, (1, 8)), None


def main(args):
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR ...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores

    model, ids, tok = load(args.smollm2)
    model, ids = model.to(device), ids.to(device)
    fast = fxforge.optimize(model, (ids,), tensor_parallel=ShardConfig(world, vocab=args.vocab), kv_cache=True,
                            verbose=False)
    with torch.no_grad():
        full = model(ids).logits  # the unsharded model, for the comparison only
    del model  # from here on, each rank holds only its own slice (+ the replicated weights)

    logits = fast(ids).logits
    tokens = fast.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    shard = next(s.details["shard"] for s in fast.stats if s.name == "shard")
    layer = shard["layers"][0]
    mib = 2 ** 20
    summary = (f"rank {rank}/{world}: heads {layer['heads'][0]} -> {layer['heads'][1]}, KV heads "
               f"{layer['kv_heads'][0]} -> {layer['kv_heads'][1]}{' (replicated)' if layer['kv_replicated'] else ''}; "
               f"weights {shard['weight_bytes_sharded'] / mib:.2f} MiB sharded + "
               f"{shard['weight_bytes_replicated'] / mib:.2f} MiB replicated (unsharded: "
               f"{shard['weight_bytes_full'] / mib:.2f} MiB); KV cache {fast.kv_layout.bytes_per_token} bytes/token; "
               f"max |logits - unsharded| = {(logits - full).abs().max().item():.2e}")
    everyone, summaries = [None] * world, [None] * world
    dist.all_gather_object(everyone, tokens.tolist())
    dist.all_gather_object(summaries, summary)
    if rank == 0:  # one process prints, so lines never interleave
        print("\n".join(summaries))
        print("all_reduce ops in the graph:", fast.graph.count("all_reduce"),
              "| all_gather:", fast.graph.count("all_gather"))
        print("tokens identical on every rank:", "yes" if all(t == everyone[0] for t in everyone) else "NO")
        print("generated:", tok.decode(tokens[0]) if tok is not None else tokens[0].tolist())
    end_process()  # barrier, teardown, exit 0: gloo's threads can abort a finished rank at exit


def launch(args):
    """Not under torchrun: start it, with this script as the program of every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.abspath(__file__), "--new-tokens", str(args.new_tokens)]
    cmd += ["--smollm2"] * args.smollm2 + ["--vocab"] * args.vocab
    return subprocess.call(cmd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks to launch when not run under torchrun")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (use --nproc 3)")
    parser.add_argument("--vocab", action="store_true", help="split the embedding and lm_head by vocabulary")
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()
    if "RANK" in os.environ:
        main(args)
    else:
        sys.exit(launch(args))
