"""Coverage sweep: every causal-LM architecture the installed transformers registers
(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), built tiny with random weights, through fxforge.

Per architecture and attention implementation (eager, sdpa where the model supports it):

  captured   fxforge's capture (torch.export + lowering) succeeds, dynamic batch and length
  optimize   fxforge.optimize(model, (ids,)) with the default pipeline succeeds
  equal      the optimized model equals eager (max abs error <= 1e-4 x max(1, |logits|max))
             at batch 1 and 3 and two sequence lengths, all from the one optimize() call
  attention  every attention of the model became a fused `attention` op: no `sdpa` node and
             no softmax over a rank-4 (batch, heads, query, key) tensor left in the final IR
  generate   optimize(kv_cache={"max_seq_len": 128}).generate equals transformers' greedy
             model.generate(do_sample=False), batch 1 and a left-padded batch of 3

Each failing column carries its reason (exception type and first line). A wrong output
(`equal` false with no exception) is a bug: the sweep lists them first.

The tiny config is generic: the common size fields present in the config class are set
(2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128, ...) and one table, OVERRIDES, holds
what a particular architecture needs beyond that. Each architecture runs in its own
subprocess with a timeout; everything is seeded.

    python benchmarks/coverage.py [--only llama,gpt2] [--attn eager,sdpa] [--jobs 2]
                                  [--timeout 300] [--out coverage.json] [--markdown coverage.md]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# -- the tiny config ------------------------------------------------------------------------
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, POSITIONS = 2, 64, 128, 4, 2, 128, 128

# Every field name a config class may use for a size; set wherever the class has it.
GENERIC = {
    **dict.fromkeys(["num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "encoder_layers"], LAYERS),
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "dim", "n_embed", "embed_dim", "model_dim"], HIDDEN),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size", "d_ff", "inner_hidden_size", "mlp_dim"], FFN),
    **dict.fromkeys(["num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads"], HEADS),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "num_key_value_groups_heads"], KV_HEADS),
    "head_dim": HIDDEN // HEADS,
    "kv_channels": HIDDEN // HEADS,
    "vocab_size": VOCAB,
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                     "max_sequence_length"], POSITIONS),
    # mixture of experts: few small experts
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token"], 2),
    **dict.fromkeys(["moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                     "moe_ffn_hidden_size"], 32),
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "first_k_dense_replace": 1,
    # multi-head latent attention (DeepSeek-V2/V3 style): low-rank and rotary sizes of the heads
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # partial rotary embeddings (GPT-J, CodeGen): within the small head
    "rotary_dim": 8,
    # BERT-family heads are causal LMs only as decoders
    "is_decoder": True,
    # special tokens inside the small vocabulary
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
}

# What an architecture needs beyond GENERIC (applied after it; None removes a field).
OVERRIDES: dict[str, dict] = {
}

# Architectures not run, and why (what the sweep cannot build or feed generically).
SKIP: dict[str, str] = {}

ATTN = ("eager", "sdpa")
SIZES = [(1, 5), (1, 11), (3, 5), (3, 11)]
GEN_TOKENS = 8
REL = 1e-4


def reason(exc: BaseException) -> str:
    """Exception type and its message's first line, short."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:240]


def _keys(config_class) -> set:
    names = set(getattr(config_class, "attribute_map", {}) or {})
    try:
        names |= set(inspect.signature(config_class.__init__).parameters)
    except (TypeError, ValueError):
        pass
    try:
        names |= set(config_class().to_dict())
    except Exception:
        pass
    return names


def _tiny_fields(config_class, model_type: str) -> dict:
    keys = _keys(config_class)
    fields = {k: v for k, v in GENERIC.items() if k in keys}
    if "qk_rope_head_dim" in fields:  # latent attention: the rotary part is the head_dim rotary sees
        fields["head_dim"] = fields["qk_rope_head_dim"]
        if "num_key_value_heads" in fields:  # the latent K/V serve every head
            fields["num_key_value_heads"] = HEADS
    fields.update(OVERRIDES.get(model_type, {}))
    return {k: v for k, v in fields.items() if v is not None}


def _sub_configs(config) -> dict:
    subs = getattr(config, "sub_configs", None) or {}
    return {name: getattr(config, name) for name in subs if getattr(config, name, None) is not None}


LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
MAX_DEFAULT_LAYERS = 64


def tiny_config(model_type: str, default_depth: bool = False):
    """The config of `model_type` at the tiny sizes; sub-configs (text, vision, ...) too.
    default_depth: keep the architecture's own layer count (for configs whose per-layer
    patterns, e.g. which layers attend, do not fit 2 layers)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    cls = type(base)

    def shrink(config_class, default):
        fields = _tiny_fields(config_class, model_type)
        if default_depth:
            for k in LAYER_FIELDS:
                fields.pop(k, None)
        return fields

    fields = shrink(cls, base)
    for name, sub in _sub_configs(base).items():
        fields[name] = {**sub.to_dict(), **shrink(type(sub), sub)}
        for k in ("layer_types", "sliding_window_pattern", "mlp_only_layers", "full_attn_idxs"):
            fields[name].pop(k, None)
    config = cls(**fields)
    if default_depth:
        depth = max((getattr(config, k, 0) or 0 for k in LAYER_FIELDS if isinstance(getattr(config, k, 0), int)),
                    default=0)
        if depth > MAX_DEFAULT_LAYERS:
            raise ValueError(f"its own depth ({depth} layers) is too deep for the sweep")
    return config


def build(model_type: str, attn: str, default_depth: bool = False):
    """The tiny random model, float32, eval mode, seeded."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, default_depth)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval(), config


def build_and_check(model_type: str, attn: str, example):
    """build() at 2 layers, else at the architecture's own depth; the model must run on
    `example` in eager mode. Returns (model, config, note) or raises the 2-layer error."""
    import torch

    try:
        model, config = build(model_type, attn)
        with torch.no_grad():
            model(example)
        return model, config, None
    except Exception as first:
        if "does not support an attention implementation" in str(first):
            raise
        try:
            model, config = build(model_type, attn, default_depth=True)
            with torch.no_grad():
                model(example)
        except Exception:
            raise first from None
        return model, config, "its own layer count (2 layers do not build or run)"


def _vocab(model, config) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None) or getattr(config, "vocab_size", None) or VOCAB
    return min(int(n), VOCAB)


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def attention_counts(graph) -> dict:
    """Fused attention ops, and attention left unfused (sdpa nodes, rank-4 softmaxes)."""
    fused = sum(1 for n in graph.nodes if n.op == "attention")
    sdpa = sum(1 for n in graph.nodes if n.op == "sdpa")
    softmax = sum(1 for n in graph.nodes if n.op == "softmax" and len(n.inputs[0].type.shape) == 4)
    return {"fused": fused, "unfused": sdpa + softmax}


def prompts(vocab: int, padded: bool):
    """The generate tests' prompts (tests/helpers.py), ids from 3 up (0-2: special tokens)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from helpers import prompts as seeded_prompts

    return seeded_prompts(vocab, padded, lowest=3)


def run_arch(model_type: str, attn: str, sizes=SIZES, gen_tokens: int = GEN_TOKENS, generate: bool = True) -> dict:
    """One row of the sweep: every column with its status and failure reason.

    Column values: True (ok), False (failed, see `reasons`), None (not run: an earlier
    column failed or it does not apply)."""
    import torch
    from fxforge.api import optimize_captured
    from fxforge.ir.capture import capture_with_spec

    row = {"arch": model_type, "attn": attn, "status": "run", "captured": None, "optimize": None, "equal": None,
           "attention": None, "generate": None, "reasons": {}, "seconds": {}, "max_rel_err": None}
    if model_type in SKIP:
        row["status"] = f"skipped: {SKIP[model_type]}"
        return row
    t0 = time.perf_counter()
    torch.manual_seed(0)
    example = torch.randint(3, VOCAB, (2, 7))
    try:
        model, config, note = build_and_check(model_type, attn, example)
    except Exception as e:
        if "does not support an attention implementation" in str(e):
            row["status"] = f"skipped: transformers has no {attn} attention for {model_type}"
        else:
            row["status"] = f"skipped: cannot build or run eager ({reason(e)})"
        return row
    if note:
        row["note"] = note
    row["model_class"] = type(model).__name__
    row["seconds"]["build"] = round(time.perf_counter() - t0, 2)
    vocab = _vocab(model, config)
    example = example.clamp(max=vocab - 1)

    t0 = time.perf_counter()
    try:
        # one capture serves optimize() and optimize(kv_cache=True): optimize() is exactly
        # optimize_captured(capture) and passes never change the graph they are given
        captured = capture_with_spec(model, (example,))
        row["captured"] = True
    except Exception as e:
        row["captured"] = False
        row["reasons"]["captured"] = reason(e)
        return row
    finally:
        row["seconds"]["capture"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    try:
        fast = optimize_captured(lambda: captured, model, verbose=False)
        row["optimize"] = True
    except Exception as e:
        row["optimize"] = False
        row["reasons"]["optimize"] = reason(e)
        fast = None
    row["seconds"]["optimize"] = round(time.perf_counter() - t0, 2)

    if fast is not None:
        counts = attention_counts(fast.graph)
        row["attention_ops"] = counts
        row["attention"] = counts["fused"] > 0 and counts["unfused"] == 0
        if not row["attention"]:
            row["reasons"]["attention"] = (f"{counts['unfused']} attention op(s) left unfused, "
                                           f"{counts['fused']} fused")
        worst, failed = 0.0, None
        for b, t in sizes:
            ids = torch.randint(3, vocab, (b, t))
            try:
                with torch.no_grad():
                    ref = _logits(model(ids)).float()
                    out = _logits(fast(ids)).float()
                if ref.shape != out.shape:
                    failed = f"shape {tuple(out.shape)} != eager {tuple(ref.shape)} at batch {b}, length {t}"
                    break
                scale = max(1.0, ref.abs().max().item())
                err = (ref - out).abs().max().item() / scale
                if not err == err:  # nan
                    err = float("inf")
                worst = max(worst, err)
                if err > REL:
                    failed = f"WRONG: max rel error {err:.3g} at batch {b}, length {t}"
            except Exception as e:
                failed = f"at batch {b}, length {t}: {reason(e)}"
                break
        row["max_rel_err"] = worst
        row["equal"] = failed is None
        if failed:
            row["reasons"]["equal"] = failed
            row["wrong"] = failed.startswith("WRONG")

    if generate:
        t0 = time.perf_counter()
        row["generate"] = _generate_parity(model, lambda: captured, vocab, gen_tokens, row)
        row["seconds"]["generate"] = round(time.perf_counter() - t0, 2)
    return row


def _generate_parity(model, capture, vocab, gen_tokens, row):
    import torch
    from fxforge.api import optimize_captured

    # transformers' own greedy generation first: where it fails, the column does not apply
    refs = {}
    for padded in (False, True):
        ids, mask = prompts(vocab, padded)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                refs[padded] = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=gen_tokens,
                                              min_new_tokens=gen_tokens, eos_token_id=None, pad_token_id=0)
        except Exception as e:
            row["reasons"]["generate"] = f"n/a: transformers' generate fails ({reason(e)})"
            return None
    try:
        # the longest sequence asked of it: a sliding window at least that wide is plain causal
        fast = optimize_captured(capture, model, kv_cache={"max_seq_len": POSITIONS}, verbose=False)
    except Exception as e:
        row["reasons"]["generate"] = f"optimize(kv_cache=True): {reason(e)}"
        return False
    for padded in (False, True):
        ids, mask = prompts(vocab, padded)
        label = "left-padded batch 3" if padded else "batch 1"
        try:
            out = fast.generate(ids, gen_tokens, attention_mask=mask, eos_token_id=None, pad_token_id=0)
        except Exception as e:
            row["reasons"]["generate"] = f"{label}: {reason(e)}"
            return False
        ref = refs[padded]
        if out.shape != ref.shape or not torch.equal(out, ref):
            n = ids.shape[1]
            first = next((i for i in range(min(out.shape[1], ref.shape[1]) - n)
                          if not torch.equal(out[:, n + i], ref[:, n + i])), None)
            row["reasons"]["generate"] = f"{label}: tokens differ from transformers (first at new token {first})"
            return False
    return True


# -- the driver ------------------------------------------------------------------------------
def worker(model_type: str, attns: list[str], out_path: str):
    """Run one architecture's rows in this process, appending each as a JSON line."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    for attn in attns:
        torch.manual_seed(0)
        try:
            row = run_arch(model_type, attn)
        except Exception as e:  # the sweep's own bug: still a row
            row = {"arch": model_type, "attn": attn, "status": f"error: {reason(e)}",
                   "traceback": traceback.format_exc()[-2000:]}
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_in_subprocess(model_type: str, attns: list[str], timeout: float) -> list[dict]:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as tmp:
        path = tmp.name
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", model_type,
                               "--attn", ",".join(attns), "--rows", path], env=env, capture_output=True,
                              text=True, timeout=timeout)
        tail = (proc.stderr or "").strip().splitlines()[-1:] if proc.returncode else []
        crash = f"worker exited {proc.returncode}: {tail[0][:200] if tail else ''}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        crash = f"timeout after {timeout:.0f} s"
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    os.unlink(path)
    done = {r["attn"] for r in rows}
    for attn in attns:
        if attn not in done:
            rows.append({"arch": model_type, "attn": attn, "status": f"error: {crash}", "captured": None,
                         "reasons": {}})
    for r in rows:
        r.setdefault("seconds", {})["total"] = round(time.perf_counter() - start, 1)
    return rows


# -- the summary -----------------------------------------------------------------------------
TARGETS = {"equal": 0.95, "attention": 0.90, "generate": 0.80}
COLUMNS = ("captured", "optimize", "equal", "attention", "generate")


def totals(rows: list[dict]) -> dict:
    """Counts per column over the rows that ran, and the targets' ratios over the captured."""
    ran = [r for r in rows if r.get("status") == "run"]
    captured = [r for r in ran if r.get("captured")]
    out = {"rows": len(rows), "ran": len(ran), "skipped": sum(1 for r in rows if r.get("status", "").startswith("skipped")),
           "errors": sum(1 for r in rows if r.get("status", "").startswith("error")),
           "captured": len(captured), "wrong": sum(1 for r in ran if r.get("wrong"))}
    for col in ("optimize", "equal", "attention", "generate"):
        ok = sum(1 for r in captured if r.get(col))
        out[col] = ok
        out[f"{col}_pct"] = round(100 * ok / len(captured), 1) if captured else 0.0
    na = sum(1 for r in captured if r.get("generate") is None)
    out["generate_na"] = na
    out["generate_pct_applicable"] = round(100 * out["generate"] / (len(captured) - na), 1) if len(captured) > na else 0.0
    out["captured_pct"] = round(100 * len(captured) / len(ran), 1) if ran else 0.0
    return out


def _cell(r, col):
    v = r.get(col)
    return {True: "ok", False: "FAIL", None: "-"}[v] if not (col == "equal" and r.get("wrong")) else "WRONG"


def markdown(rows: list[dict], meta: dict) -> str:
    t = totals(rows)
    lines = [f"transformers {meta.get('transformers')}, torch {meta.get('torch')}, python {meta.get('python')}, "
             f"{meta.get('date')}", "",
             f"rows (architecture x attention): {t['rows']}; ran {t['ran']}, skipped {t['skipped']}, "
             f"errors {t['errors']}; captured {t['captured']} ({t['captured_pct']}% of those that ran)", "",
             "| of the captured | ok | % | target |", "|---|---|---|---|",
             f"| wrong outputs | {t['wrong']} | | 0 |",
             f"| optimize() ok | {t['optimize']} | {t['optimize_pct']} | |",
             f"| equal to eager | {t['equal']} | {t['equal_pct']} | 95 |",
             f"| every attention fused | {t['attention']} | {t['attention_pct']} | 90 |",
             f"| kv_cache generate identical | {t['generate']} | {t['generate_pct']} "
             f"({t['generate_pct_applicable']} of {t['captured'] - t['generate_na']} where transformers generates) "
             f"| 80 |", "",
             "| architecture | attn | captured | optimize | equal | attention | generate | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["attn"])):
        status = r.get("status", "")
        if status != "run":
            lines.append(f"| {r['arch']} | {r['attn']} | - | - | - | - | - | {status[:160]} |")
            continue
        cells = [_cell(r, c) for c in COLUMNS]
        notes = "; ".join(f"{k}: {v}" for k, v in r.get("reasons", {}).items())
        lines.append(f"| {r['arch']} | {r['attn']} | " + " | ".join(cells) + f" | {notes[:300].replace('|', '/')} |")
    return "\n".join(lines) + "\n\n## Failures grouped by cause\n" + grouped_failures(rows)


def _cause(text: str) -> str:
    """A failure reason without its numbers and paths, so equal causes group together."""
    import re

    text = re.sub(r"\(first at new token \d+\)", "", text)
    text = re.sub(r"(at batch|batch) \d+(, length \d+)?", "batch b", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    text = re.sub(r"torch.export could not capture \w+: ", "torch.export: ", text)
    return text[:170]


def grouped_failures(rows: list[dict]) -> str:
    """Failures grouped by cause, per column (and the rows skipped, by reason)."""
    lines = []
    for col in ("status", *COLUMNS):
        groups: dict[str, list[str]] = {}
        for r in rows:
            if col == "status":
                if r.get("status", "run") == "run":
                    continue
                why = r["status"]
            else:
                why = r.get("reasons", {}).get(col)
                if why is None or (col == "generate" and r.get("generate") is None and not why.startswith("n/a")):
                    continue
            groups.setdefault(_cause(why), []).append(f"{r['arch']}/{r['attn']}")
        if not groups:
            continue
        lines += ["", f"### {'not run' if col == 'status' else col}", ""]
        for why, where in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- **{len(where)}** `{why.replace('`', '')}`: {', '.join(where)}")
    return "\n".join(lines) + "\n"


def meta_data() -> dict:
    import platform

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated model types (default: all)")
    p.add_argument("--attn", default=",".join(ATTN))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="seconds per architecture (all its rows)")
    p.add_argument("--out", default="coverage.json")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    attns = [a for a in args.attn.split(",") if a]
    if args.worker:
        worker(args.worker, attns, args.rows)
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.only:
        wanted = args.only.split(",")
        unknown = [a for a in wanted if a not in archs]
        if unknown:
            raise SystemExit(f"not causal-LM model types of this transformers: {unknown}")
        archs = wanted
    rows: list[dict] = []
    start = time.perf_counter()

    def one(arch):
        got = run_in_subprocess(arch, attns, args.timeout)
        for r in got:
            flag = {True: "ok", False: "FAIL", None: "-"}
            cols = " ".join(f"{c}={flag.get(r.get(c), '?')}" for c in COLUMNS)
            print(f"[{time.perf_counter() - start:6.0f}s] {arch:28s} {r['attn']:5s} {r.get('status', '')[:60]:20s} "
                  f"{cols} {json.dumps(r.get('reasons', {}))[:300]}", flush=True)
        return got

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for got in pool.map(one, archs):
            rows.extend(got)
            _save(rows, args)
    _save(rows, args)
    print(json.dumps(totals(rows), indent=1))


def _save(rows, args):
    meta = meta_data()
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "totals": totals(rows), "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
