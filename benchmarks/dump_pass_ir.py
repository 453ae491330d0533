"""Write the IR after every pass for the zoo models, one file per (model, pipeline, pass),
so that two checkouts can be compared byte for byte: a change meant to be only faster
(e.g. the rule driver's dispatch by root op) must leave every file identical.

    PYTHONPATH=. python benchmarks/dump_pass_ir.py OUT_DIR [--no-smollm2]
    diff -r OUT_BEFORE OUT_AFTER

Pipelines: the default one, and one with kv_cache=True and quantize="int8" (the passes
that run only when asked). Random models are seeded, so their weights (and any folded
constant) are the same in both checkouts.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from fxforge.ir.capture import capture_with_spec  # noqa: E402
from fxforge.ir.printer import print_graph  # noqa: E402
from fxforge.passes import default_registry  # noqa: E402
from fxforge.passes.manager import run_pipeline  # noqa: E402

PIPELINES = {"default": {}, "kv_int8": {"kv_cache": True, "quantize": "int8"}}


def zoo_models(with_smollm2: bool):
    """(name, model, example ids) for each zoo model, built under a fixed seed."""
    import zoo

    def seeded(make, *args, **kwargs):
        torch.manual_seed(0)
        return make(*args, **kwargs)

    yield "nanogpt_traced", *_with_ids(seeded(zoo.nanogpt_traced))
    for attn in ("eager", "sdpa"):
        yield f"gpt2_{attn}", *_with_ids(seeded(zoo.gpt2, attn))
        yield f"llama_{attn}", *_with_ids(seeded(zoo.llama, attn))
    if with_smollm2 and zoo.smollm2_dir() is not None:
        model, tok = zoo.smollm2()
        yield "smollm2", model, tok("The capital of France is", return_tensors="pt").input_ids


def _with_ids(model_and_vocab):
    model, vocab = model_and_vocab
    return model, torch.arange(8).remainder(vocab).unsqueeze(0)


def dump_model(out_dir: str, name: str, model, ids):
    registry = default_registry()
    for label, raw_options in PIPELINES.items():
        options = registry.parse_options(raw_options)
        graph, _ = capture_with_spec(model, (ids,))
        folder = os.path.join(out_dir, name, label)
        os.makedirs(folder, exist_ok=True)

        def dump(i, pass_name, g):
            with open(os.path.join(folder, f"{i:02d}_{pass_name}.ir"), "w") as f:
                f.write(print_graph(g))

        run_pipeline(graph, registry.pipeline(options), options, check=True, dump=dump)
        print(f"{name}/{label}: {len(os.listdir(folder))} files", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--no-smollm2", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for name, model, ids in zoo_models(not args.no_smollm2):
        dump_model(args.out_dir, name, model, ids)


if __name__ == "__main__":
    main()
