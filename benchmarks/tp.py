"""Tensor parallelism: per-rank weight memory and decode step time for N = 1, 2 ranks.

Each N is one `torchrun --standalone --nproc-per-node N` launch of this script (gloo on
CPU, nccl on GPUs when there are N of them). N = 1 is the model optimized without
tensor_parallel (the baseline); N > 1 uses tensor_parallel=N. Every rank measures; the
table gives the slowest rank's step and every rank's memory.

    python benchmarks/tp.py [--sizes 1 2] [--model llama-mid|smollm2] [--tokens 32]
                            [--threads-per-rank K] [--vocab] [--out f.json]

On CPU each rank gets cores // N threads by default (all ranks together use the machine's
cores, as the baseline does); --threads-per-rank overrides it.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def load(name: str):
    if name == "smollm2":
        import zoo

        model, tok = zoo.smollm2()
        return model, tok("The capital of France is a city that", return_tensors="pt").input_ids
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every rank builds the same weights
    # ~80M parameters: big enough that weights dominate a decode step on CPU
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval(), torch.randint(1, 32000, (1, 16))


def rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker(args):
    import torch.distributed as dist

    import fxforge
    from fxforge.passes.shard import ShardConfig
    from fxforge.runtime.collectives import end_process

    world = int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    model, ids = load(args.model)
    model, ids = model.to(device), ids.to(device)
    options = {"kv_cache": True, "verbose": False}
    if world > 1:
        options["tensor_parallel"] = ShardConfig(world, vocab=args.vocab)
    start = time.perf_counter()
    fast = fxforge.optimize(model, (ids,), **options)
    optimize_s = time.perf_counter() - start
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    gc.collect()
    weight_bytes = sum(t.numel() * t.element_size() for t in fast.pipeline_graph.params.values())

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def timed(n):
        sync()
        t0 = time.perf_counter()
        fast.generate(ids, max_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t0

    timed(2)  # warm up (buffers, cpu_linear choices)
    prefill = min(timed(1) for _ in range(args.repeat))
    total = min(timed(1 + args.tokens) for _ in range(args.repeat))
    step_ms = (total - prefill) / args.tokens * 1000
    mine = {"rank": rank, "weight_mib": weight_bytes / 2**20, "rss_mib": rss_mib(), "step_ms": step_ms,
            "prefill_ms": prefill * 1000, "optimize_s": optimize_s,
            "cuda_max_alloc_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print("TP_BENCH " + json.dumps({
            "world_size": world, "device": "cuda" if cuda else "cpu", "threads_per_rank": None if cuda else threads,
            "model": args.model, "full_weight_mib": full_bytes / 2**20, "vocab": args.vocab,
            "kv_bytes_per_token": fast.kv_layout.bytes_per_token, "tokens": args.tokens,
            "step_ms": max(r["step_ms"] for r in everyone), "prefill_ms": max(r["prefill_ms"] for r in everyone),
            "ranks": everyone}), flush=True)
    end_process()  # barrier, teardown, exit 0: gloo's threads can abort a finished rank at exit


def launch(args) -> list[dict]:
    results = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               os.path.abspath(__file__), "--worker", "--model", args.model, "--tokens", str(args.tokens),
               "--repeat", str(args.repeat), "--threads-per-rank", str(args.threads_per_rank)]
        cmd += ["--vocab"] * args.vocab
        env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TP_BENCH ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"N={n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[0].split(" ", 1)[1]))
    return results


def table(results: list[dict]) -> str:
    base = results[0]["step_ms"]
    rows = ["| N | device | threads/rank | weights per rank (MiB) | RSS per rank (MiB) | KV bytes/token per rank "
            "| decode step (ms) | vs N=1 | prefill (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        weights = " / ".join(f"{x['weight_mib']:.1f}" for x in r["ranks"])
        rss = " / ".join(f"{x['rss_mib']:.0f}" for x in r["ranks"] if x["rss_mib"] is not None) or "-"
        rows.append(f"| {r['world_size']} | {r['device']} | {r['threads_per_rank'] or '-'} | {weights} | {rss} | "
                    f"{r['kv_bytes_per_token']} | {r['step_ms']:.2f} | {base / r['step_ms']:.2f}x | "
                    f"{r['prefill_ms']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="llama-mid", choices=["llama-mid", "smollm2"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=0)
    parser.add_argument("--vocab", action="store_true", help="split the embedding and lm_head by vocabulary too")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        results = launch(args)
        print(f"model {results[0]['model']}: {results[0]['full_weight_mib']:.1f} MiB of weights unsharded, "
              f"{args.tokens} decode steps after a {16 if args.model == 'llama-mid' else 'short'}-token prompt")
        print(table(results))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
