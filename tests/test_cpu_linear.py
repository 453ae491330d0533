"""The CPU torch backend's linear: the kernel and weight layout timed fastest per shape,
once per machine (then read from a cache file). Values never change, only strides and
which library computes the product."""
import json
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.runtime import cpu_linear, cpu_linear_cache
from fxforge.runtime.cpu_linear import CpuLinearPlan, decide, onednn_available
from fxforge.runtime.cpu_linear_cache import CpuLinearCacheWarning, Decision

import zoo
from helpers import assert_matches_eager, benchmark_table

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("layout", ["row", "column", "strided"])
@pytest.mark.parametrize("x_shape", [(1, 96), (3, 7, 96), (96,), (0, 96)])
def test_onednn_linear_equals_f_linear(layout, x_shape):
    torch.manual_seed(0)
    w = {"row": torch.randn(40, 96), "column": torch.randn(96, 40).t(), "strided": torch.randn(40, 200)[:, 7:103]}[layout]
    b = torch.randn(40)
    x = torch.randn(x_shape)
    for bias in (None, b):
        torch.testing.assert_close(cpu_linear.onednn_linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_plan_runs_the_chosen_kernel_and_stores_the_chosen_layout():
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), cpu_linear=False)
    plan = CpuLinearPlan(choices={(64, 64): ("onednn", "column"), (128, 64): ("onednn", "row")})
    graph, moved, nbytes = plan.apply(fast.graph)
    assert moved and all(n.endswith("o_proj.weight") for n in moved)  # the [64, 64] weights
    assert nbytes == len(moved) * 64 * 64 * 4
    for name in moved:
        w = graph.params[name]
        assert w.stride() == (1, 64) and torch.equal(w, fast.graph.params[name])
    unchanged = [n for n in graph.params if n not in moved]
    assert all(graph.params[n] is fast.graph.params[n] for n in unchanged)
    x = torch.randn(2, 3, 64)
    for w in (torch.randn(64, 64), torch.randn(128, 64), torch.randn(32, 64)):  # onednn, onednn, F.linear
        torch.testing.assert_close(plan.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    half = torch.randn(2, 64, dtype=torch.bfloat16)  # not float32: F.linear whatever the plan says
    torch.testing.assert_close(plan.linear(half, torch.randn(64, 64, dtype=torch.bfloat16)).float().shape,
                               torch.Size([2, 64]))


@pytest.fixture
def timing(monkeypatch, tmp_path):
    """An empty cache in $FXFORGE_CACHE=tmp_path, short timing, and a count of the timed
    sweeps (timing[0])."""
    monkeypatch.delenv(cpu_linear_cache.FOLDER_VARIABLE, raising=False)
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "COLD_BYTES", 4 << 20)  # keep the timing short in tests
    # and let it finish on a busy CI machine: a shape cut short is not cached, and these
    # tests count what the cache saves (test_shapes_cut_short_are_not_cached cuts on purpose)
    monkeypatch.setattr(cpu_linear, "TIME_BUDGET_S", 30.0)
    monkeypatch.setattr(cpu_linear, "FEW_ROWS_BUDGET_S", 30.0)  # the 2-8-row choices' own budget alike
    sweeps = [0]
    real = cpu_linear._call_seconds

    def counted(*args):
        sweeps[0] += 1
        return real(*args)

    monkeypatch.setattr(cpu_linear, "_call_seconds", counted)
    return sweeps


def small_llama():
    # timing only looks at weights of 256 KiB or more: a 256-wide model has them
    model, vocab = zoo.llama("sdpa", hidden=256, heads=4)
    return model, vocab, (torch.randint(0, vocab, (2, 7)),)


def cpu_linear_stats(fast):
    return next(s for s in fast.runtime_stats if s.name == "cpu_linear")


def test_big_enough_weights_are_timed_and_the_model_stays_exact(timing):
    model, vocab, example = small_llama()
    fast = fxforge.optimize(model, example)
    stats = next(s for s in fast.runtime_stats if s.name == "cpu_linear")
    timed = [s for s in {tuple(w.shape) for w in fast.graph.params.values() if w.dim() == 2}
             if s[0] * s[1] * 4 >= cpu_linear.MIN_TIMED_BYTES]
    assert timed and stats.notes
    for shape, choice in stats.details["cpu_linear"]["choices"].items():
        assert shape in timed and choice != cpu_linear.BASELINE
    assert_matches_eager(model, fast, vocab, [(1, 1), (2, 9)])
    assert "cpu_linear" in fast.report()


def test_timing_leaves_the_callers_random_state_alone(timing):
    """The timing's inputs and the oneDNN check drew from torch's global generator: after
    torch.manual_seed, optimize() (or a first torch.compile call) moved the stream, and a
    seeded sampling then drew other tokens than eager."""
    model, vocab, example = small_llama()
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    fast = fxforge.optimize(model, example, cpu_linear="measure")
    assert timing[0] > 0  # it timed shapes
    assert torch.equal(torch.rand(4), expected)
    assert onednn_available() in (True, False) and fast is not None
    torch.manual_seed(0)
    onednn_available()
    assert torch.equal(torch.rand(4), expected)


def test_off_or_not_float32_keeps_f_linear():
    model, vocab = zoo.llama("sdpa", hidden=256, heads=4)
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), cpu_linear=False)
    assert fast.runtime_stats == []
    model16 = model.to(torch.bfloat16)
    fast16 = fxforge.optimize(model16, (torch.randint(0, vocab, (2, 7)),))
    stats16 = next(s for s in fast16.runtime_stats if s.name == "cpu_linear")
    assert not stats16.rules and stats16.notes == []  # no float32 weights to consider


def test_second_optimize_reads_the_cache_and_builds_the_same_plan(timing, tmp_path):
    model, vocab, example = small_llama()
    first = cpu_linear_stats(fxforge.optimize(model, example))
    sweeps_first = timing[0]
    second_model = fxforge.optimize(model, example)
    second = cpu_linear_stats(second_model)
    assert sweeps_first > 0 and timing[0] == sweeps_first  # the second call timed nothing
    assert second.details["cpu_linear"]["choices"] == first.details["cpu_linear"]["choices"]
    assert second.details["cpu_linear"]["column_major"] == first.details["cpu_linear"]["column_major"]
    files = os.listdir(tmp_path / "cpu_linear")
    assert len(files) == 1 and files[0].startswith("choices-") and files[0].endswith(".json")
    path = str(tmp_path / "cpu_linear" / files[0])
    assert first.details["cpu_linear"]["timed"] > 0 and f"saved to {path}" in first.notes[-1]
    assert second.details["cpu_linear"]["timed"] == 0 and "read from the cache" in second.notes[-1]
    assert path in second_model.report()
    assert_matches_eager(model, second_model, vocab, [(1, 1), (2, 9)])


def test_shapes_cut_short_are_not_cached(timing, monkeypatch):
    """A busy machine that runs out of timing budget keeps F.linear for that model, but
    does not write the guess to the cache: the next optimize() times those shapes again."""
    model, vocab, example = small_llama()
    real = cpu_linear.measure_choices
    monkeypatch.setattr(cpu_linear, "measure_choices", lambda shapes, candidates: real(shapes, candidates, budget_s=0.0))
    first = cpu_linear_stats(fxforge.optimize(model, example))
    assert first.details["cpu_linear"]["cut_short"] == first.details["cpu_linear"]["timed"] > 0
    assert "not cached: the next optimize() times them again" in first.notes[-1]
    monkeypatch.setattr(cpu_linear, "measure_choices", real)
    second = cpu_linear_stats(fxforge.optimize(model, example))
    source = second.details["cpu_linear"]
    assert source["from_cache"] == 0 and source["timed"] == first.details["cpu_linear"]["timed"]
    assert source["cut_short"] == 0


def test_only_the_shapes_missing_from_the_cache_are_timed(timing):
    model, vocab, example = small_llama()
    fxforge.optimize(model, example)
    wider_kv, _ = zoo.llama("sdpa", hidden=256, heads=4, kv_heads=4)  # another q/k/v shape, the rest alike
    stats = cpu_linear_stats(fxforge.optimize(wider_kv, example))
    source = stats.details["cpu_linear"]
    assert (source["from_cache"], source["timed"]) == (3, 1)
    assert "3 weight shapes read from the cache, 1 weight shape timed now" in stats.notes[-1]


def test_measure_times_again_and_false_times_nothing(timing):
    model, vocab, example = small_llama()
    fxforge.optimize(model, example)
    sweeps = timing[0]
    again = cpu_linear_stats(fxforge.optimize(model, example, cpu_linear="measure"))
    assert timing[0] > sweeps and again.details["cpu_linear"]["from_cache"] == 0
    sweeps = timing[0]
    fast = fxforge.optimize(model, example, cpu_linear=False)
    assert timing[0] == sweeps and fast.runtime_stats == []
    with pytest.raises(ValueError, match="cpu_linear="):
        fxforge.optimize(model, example, cpu_linear="sometimes")


@pytest.mark.parametrize("garbage", ["{not json", '{"format": 1, "fingerprint": {}, "choices": {}}',
                                     "[1, 2]"])
def test_a_corrupt_cache_file_warns_and_is_measured_again(timing, tmp_path, garbage):
    model, vocab, example = small_llama()
    fxforge.optimize(model, example)
    (path,) = (tmp_path / "cpu_linear").iterdir()
    path.write_text(garbage)
    sweeps = timing[0]
    with pytest.warns(CpuLinearCacheWarning, match="ignoring the cpu_linear cache file"):
        fast = fxforge.optimize(model, example)
    assert timing[0] > sweeps  # measured again ...
    assert json.loads(path.read_text())["choices"]  # ... and the file repaired
    assert_matches_eager(model, fast, vocab, [(1, 1), (2, 9)])


@pytest.mark.filterwarnings("error::fxforge.runtime.cpu_linear_cache.CpuLinearCacheWarning")
def test_an_unwritable_cache_folder_means_no_caching(timing, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")  # a folder inside a file cannot be made, even by root
    monkeypatch.setenv(cpu_linear_cache.FOLDER_VARIABLE, str(tmp_path / "a_file" / "cpu_linear"))
    model, vocab, example = small_llama()
    stats = cpu_linear_stats(fxforge.optimize(model, example))
    assert stats.details["cpu_linear"]["cache_error"] and "not cached" in stats.notes[-1]
    sweeps = timing[0]
    fxforge.optimize(model, example)
    assert timing[0] > sweeps  # nothing was remembered
    assert not [p for p in tmp_path.iterdir() if p.name != "a_file"]


def test_concurrent_writers_leave_a_whole_file(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_linear_cache.FOLDER_VARIABLE, str(tmp_path))
    fingerprint = {"cpu": "test", "method": {"version": 0}}
    path = cpu_linear_cache.cache_file(fingerprint)
    candidates = [("aten", "row"), ("onednn", "column")]

    def writer(i):
        decision = Decision("onednn", "column", 1.5, {"aten_row": 3.0, "onednn_column": 2.0}, 3)
        for _ in range(20):
            assert cpu_linear_cache.write_decisions(path, fingerprint, candidates,
                                                    {cpu_linear_cache.shape_key((i, 64)): decision}) is None

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    decisions = cpu_linear_cache.read_decisions(path, fingerprint, candidates)
    assert decisions and all(d.choice == ("onednn", "column") for d in decisions.values())
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary files left behind


def test_decide_keeps_f_linear_unless_clearly_and_consistently_faster():
    row, col, dnn_row, dnn_col = ("aten", "row"), ("aten", "column"), ("onednn", "row"), ("onednn", "column")

    def rounds(**medians):  # three rounds of the same time each
        return {c: [medians["_".join(c)]] * 3 for c in (row, col, dnn_row, dnn_col)}

    assert decide(rounds(aten_row=1.0, aten_column=0.97, onednn_row=0.98, onednn_column=0.96)).choice == row
    assert decide(rounds(aten_row=1.0, aten_column=0.5, onednn_row=0.51, onednn_column=0.6)).choice == dnn_row
    won = decide(rounds(aten_row=1.0, aten_column=0.9, onednn_row=0.8, onednn_column=0.5))
    assert won.choice == dnn_col and won.speedup == pytest.approx(2.0)
    assert won.median_us["onednn_column"] == pytest.approx(0.5e6)
    # faster by the medians, but slower in one round of three: not a clear win on a busy machine
    lucky = {row: [1.0, 1.0, 0.4], col: [0.5, 0.5, 0.9], dnn_row: [2.0] * 3, dnn_col: [2.0] * 3}
    assert decide(lucky).choice == row
    # time ran out after one round: too little to leave F.linear on
    assert decide({row: [1.0], col: [0.1], dnn_row: [1.0], dnn_col: [1.0]}).choice == row


def test_timing_stays_within_its_rounds_and_budget(monkeypatch):
    monkeypatch.setattr(cpu_linear, "COLD_BYTES", 1 << 20)
    monkeypatch.setattr(cpu_linear, "_call_seconds", lambda kernel, x, weights: [1e-6] * len(weights))
    candidates = cpu_linear.timing_candidates()
    shapes = [(256, 256), (512, 256)]
    counts = []
    real = cpu_linear.round_seconds

    def counting(*args):
        out = real(*args)
        counts.append({len(r) for r in out.values()})
        return out

    monkeypatch.setattr(cpu_linear, "round_seconds", counting)
    cut_short = cpu_linear.measure_choices(shapes, candidates, budget_s=0.0)
    assert counts == [{0}] * 2  # no time at all: nothing timed, F.linear kept
    assert all(d.choice == cpu_linear.BASELINE and d.rounds == 0 for d in cut_short.values())
    counts.clear()
    cpu_linear.measure_choices(shapes, candidates, budget_s=60.0)
    assert counts == [{cpu_linear.MAX_ROUNDS}] * 2  # plenty: the maximum, not more


def test_a_much_slower_candidate_is_timed_twice(monkeypatch):
    monkeypatch.setattr(cpu_linear, "COLD_BYTES", 1 << 20)

    def seconds(kernel, x, weights):
        return [1e-3 if weights[0].stride()[0] == 1 else 1e-4] * len(weights)  # column-major: 10x slower

    monkeypatch.setattr(cpu_linear, "_call_seconds", seconds)
    candidates = [("aten", "row"), ("aten", "column")]
    # F.linear is always timed to the end, however slow: every choice is compared with it
    row_slow = {c: [1.0, 1.0] for c in candidates}
    row_slow[("aten", "column")] = [0.1, 0.2]
    assert cpu_linear._still_in_the_running(row_slow, candidates) == candidates
    far = time.perf_counter() + 60
    rounds = cpu_linear.round_seconds((256, 256), candidates, torch.zeros(1 << 18), far, far)
    assert len(rounds[("aten", "column")]) == 2 and len(rounds[("aten", "row")]) == cpu_linear.MAX_ROUNDS
    assert cpu_linear.decide(rounds).choice == ("aten", "row")


def test_each_sweep_reads_memory_the_last_one_did_not():
    buffer = torch.zeros(cpu_linear.COLD_BYTES // 4)
    rows, columns = (cpu_linear.cold_weights(buffer, (512, 256), layout) for layout in ("row", "column"))
    assert len(rows) == len(columns) >= 2 * cpu_linear.CALLS_PER_ROUND
    first = cpu_linear._next_copies(rows, 0)
    second = cpu_linear._next_copies(columns, len(first))  # the next candidate, the other layout
    assert {w.data_ptr() for w in first}.isdisjoint(w.data_ptr() for w in second)
    assert all(w.stride() == (1, 512) for w in columns) and all(w.is_contiguous() for w in rows)


@needs_onednn
def test_a_few_rows_take_the_few_row_choice_on_the_original_weight(monkeypatch):
    """Speculative verification (2..FEW_ROWS rows) runs its own choice; one row and
    prompts keep the one-row choice; a few-row choice on row-major weights reads the
    model's original beside the column-major copy, never a new copy."""
    model, vocab = zoo.llama("sdpa")
    fast = fxforge.optimize(model, (torch.randint(0, vocab, (2, 7)),), cpu_linear=False)
    few, *engine_buckets = cpu_linear.ROW_BUCKETS
    plan = CpuLinearPlan(choices={(64, 64): ("aten", "column")},
                         by_rows={few: {(64, 64): ("onednn", "row")}, **{b: {(64, 64): ("aten", "row")} for b in engine_buckets}})
    graph, moved, _ = plan.apply(fast.graph)
    assert moved and len(plan.originals) == len(moved)
    assert plan.originals_bytes() == len(moved) * 64 * 64 * 4
    calls = []
    monkeypatch.setitem(cpu_linear.KERNELS, "aten", lambda x, w, b=None: calls.append(("aten", w)) or F.linear(x, w, b))
    monkeypatch.setitem(cpu_linear.KERNELS, "onednn",
                        lambda x, w, b=None: calls.append(("onednn", w)) or cpu_linear.onednn_linear(x, w, b))
    copy, original = graph.params[moved[0]], fast.graph.params[moved[0]]
    # one row, the few rows' bucket, the engine's buckets, then prompts: one-row choice again
    last = engine_buckets[-1].last
    for rows, choice, w in [(1, ("aten", "column"), copy), (2, ("onednn", "row"), original),
                            (cpu_linear.FEW_ROWS, ("onednn", "row"), original),
                            (cpu_linear.FEW_ROWS + 1, ("aten", "row"), original), (16, ("aten", "row"), original),
                            (last, ("aten", "row"), original),
                            (last + 1, ("aten", "column"), copy), (512, ("aten", "column"), copy)]:
        assert plan.choice((64, 64), rows) == choice
        x = torch.randn(1, rows, 64)
        calls.clear()
        torch.testing.assert_close(plan.linear(x, copy), F.linear(x, original), rtol=1e-5, atol=1e-5)
        assert calls[0][0] == choice[0] and calls[0][1] is w
    other = torch.randn(64, 64).t()  # a column-major weight the plan does not know: read as given
    calls.clear()
    plan.linear(torch.randn(3, 64), other)
    assert calls[0][1] is other


def test_few_row_choices_are_timed_against_the_one_row_choice_and_cached(timing):
    model, vocab, example = small_llama()
    first = cpu_linear_stats(fxforge.optimize(model, example))
    source = first.details["cpu_linear"]
    first = cpu_linear.ROW_BUCKETS[0].name
    assert source["rows_timed"][first] == source["timed"] > 0 and source["rows_cut_short"][first] == 0
    with open(source["cache_file"]) as f:
        keys = json.load(f)["choices"]
    for bucket in cpu_linear.ROW_BUCKETS:  # every bucket timed and cached, each under its own key
        assert source["rows_timed"][bucket.name] == source["timed"]
        assert sum(k.endswith(f" rows {bucket.name}") for k in keys) == source["timed"]
    second = cpu_linear_stats(fxforge.optimize(model, example))
    again = second.details["cpu_linear"]
    assert again["timed"] == 0 and not any(again["rows_timed"].values())
    assert again["few_rows"] == source["few_rows"] and again["choices"] == source["choices"]
    assert again["rows"] == source["rows"]
    for choices in again["rows"].values():
        for shape, (kernel, layout) in choices.items():  # never a layout the program lacks
            assert layout in ("row", again["choices"].get(shape, cpu_linear.BASELINE)[1])


def test_few_row_choices_cut_short_are_not_cached(timing, monkeypatch):
    model, vocab, example = small_llama()
    real = cpu_linear.measure_row_choices
    few = cpu_linear.ROW_BUCKETS[0]
    # the few rows' budget runs out; the other buckets are timed as usual
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates: real(
        bucket, shapes, one_row, candidates, **({"budget_s": 0.0} if bucket == few else {})))
    first = cpu_linear_stats(fxforge.optimize(model, example)).details["cpu_linear"]
    assert first["rows_cut_short"][few.name] == first["rows_timed"][few.name] > 0 and first["few_rows"] == {}
    assert not any(n for name, n in first["rows_cut_short"].items() if name != few.name)
    monkeypatch.setattr(cpu_linear, "measure_row_choices", real)
    second = cpu_linear_stats(fxforge.optimize(model, example)).details["cpu_linear"]
    assert second["timed"] == 0 and second["rows_timed"] == {**{b.name: 0 for b in cpu_linear.ROW_BUCKETS},
                                                             few.name: first["rows_timed"][few.name]}
    assert not any(second["rows_cut_short"].values())


def test_decide_against_another_baseline():
    col, dnn_row = ("aten", "column"), ("onednn", "row")
    assert decide({col: [1.0] * 3, dnn_row: [0.97] * 3}, baseline=col).choice == col  # a near tie: stay
    won = decide({col: [1.0] * 3, dnn_row: [0.7] * 3}, baseline=col)
    assert won.choice == dnn_row and won.speedup == pytest.approx(1 / 0.7)
    assert decide({col: [1.0], dnn_row: [0.1]}, baseline=col).choice == col  # cut short


@needs_onednn
def test_packed_copies_for_a_few_rows_are_opt_in_bounded_and_exact(timing, monkeypatch):
    """oneDNN-packed copies (a second copy of a weight) only with few_rows_packed_mb, at
    most that many MiB, the largest weights first; the values stay F.linear's."""
    from fxforge.runtime.backends.torch_backend import TorchBackend

    model, vocab, example = small_llama()
    default = cpu_linear_stats(fxforge.optimize(model, example)).details["cpu_linear"]
    assert default["packed_bytes"] == 0
    assert all(layout != "packed" for _, layout in default["few_rows"].values())
    # every shape chooses the packed copy in every bucket: the bound alone decides what is packed
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates: {
        s: Decision(*cpu_linear.PACKED, 2.0, {}, 9) for s in shapes if cpu_linear.PACKED in candidates})
    # (packed copies allowed is another cache key: the choices above are not read)
    fast = fxforge.optimize(model, example, backend=TorchBackend("cpu", few_rows_packed_mb=1))
    stats = cpu_linear_stats(fast)
    details = stats.details["cpu_linear"]
    assert 0 < details["packed_bytes"] <= 1 << 20
    assert any("did not fit" in n for n in stats.notes)
    assert_matches_eager(model, fast, vocab, [(1, 1), (1, 5), (2, 3), (1, 12), (2, 9), (1, 40)])
    # with room for all: one copy per weight, shared by every bucket
    roomy = fxforge.optimize(model, example, backend=TorchBackend("cpu", few_rows_packed_mb=64))
    plan_packed = cpu_linear_stats(roomy).details["cpu_linear"]
    weights = [w for w in roomy.graph.params.values() if w.dim() == 2 and w.numel() * 4 >= cpu_linear.MIN_TIMED_BYTES]
    assert plan_packed["packed_bytes"] == sum(w.numel() * 4 for w in weights)
    assert_matches_eager(model, roomy, vocab, [(1, 1), (1, 5), (2, 9), (1, 16)])
    with pytest.raises(ValueError, match="few_rows_packed_mb"):
        TorchBackend("cpu", few_rows_packed_mb=-1)


@needs_onednn
def test_one_packed_copy_is_read_by_the_buckets_that_chose_it_only(monkeypatch):
    w = torch.randn(64, 32)
    few, engine_rows, more = cpu_linear.ROW_BUCKETS
    plan = CpuLinearPlan(by_rows={few: {(64, 32): cpu_linear.PACKED}, engine_rows: {(64, 32): cpu_linear.PACKED},
                                  more: {(64, 32): ("onednn", "row")}})
    copy = torch.ops.mkldnn._reorder_linear_weight(w, few.timed)
    plan.packed = {id(w): (w, copy)}
    read = []
    monkeypatch.setitem(cpu_linear.KERNELS, "onednn",
                        lambda x, w, b=None: read.append(w) or cpu_linear.onednn_linear(x, w, b))
    for rows in (1, 2, 5, 8, 9, 12, 15, 16, 24, 32, 33):
        x = torch.randn(1, rows, 32)
        bucket = next((b for b in cpu_linear.ROW_BUCKETS if b.holds(rows)), None)
        read.clear()
        torch.testing.assert_close(plan.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        if bucket is None:
            assert plan.choice((64, 32), rows) == cpu_linear.BASELINE and read == []
        elif bucket == more:
            assert plan.choice((64, 32), rows) == ("onednn", "row") and read == [w]
        else:
            assert plan.choice((64, 32), rows) == cpu_linear.PACKED and read == [copy]


def test_packed_copies_are_timed_only_where_memory_is_given(monkeypatch, tmp_path):
    """Without few_rows_packed_mb neither the one-row choice nor a bucket's times a packed
    copy (one that won there would leave the bucket on the one-row choice, since none may
    be made); with it, the buckets do and the one-row choice still does not."""
    from fxforge.runtime.backends.torch_backend import TorchBackend

    monkeypatch.setenv(cpu_linear_cache.FOLDER_VARIABLE, str(tmp_path))
    seen = []
    monkeypatch.setattr(cpu_linear, "measure_choices", lambda shapes, candidates: seen.append(("one", shapes, candidates)) or {
        s: Decision(*cpu_linear.BASELINE, 1.0, {}, 9) for s in shapes})
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates: seen.append(
        (bucket.name, shapes, candidates)) or {s: Decision(*cpu_linear.BASELINE, 1.0, {}, 9) for s in shapes})
    model, vocab, example = small_llama()
    fxforge.optimize(model, example)
    assert [name for name, _, _ in seen] == ["one"] + [b.name for b in cpu_linear.ROW_BUCKETS]
    assert all(shapes and cpu_linear.PACKED not in candidates for _, shapes, candidates in seen)
    if onednn_available():
        seen.clear()
        fxforge.optimize(model, example, backend=TorchBackend("cpu", few_rows_packed_mb=64))
        # (the one-row choices come from the cache now: only the buckets' packed choices are timed)
        one, *buckets = seen
        assert one[0] == "one" and not one[1] and cpu_linear.PACKED not in one[2]
        assert [name for name, _, _ in buckets] == [b.name for b in cpu_linear.ROW_BUCKETS]
        assert all(shapes and cpu_linear.PACKED in candidates for _, shapes, candidates in buckets)


def test_row_buckets_are_ordered_apart_and_leave_one_row_alone():
    buckets = cpu_linear.ROW_BUCKETS
    assert buckets[0] == cpu_linear.RowBucket(2, cpu_linear.FEW_ROWS, cpu_linear.FEW_TIMED_ROWS)
    for bucket, after in zip(buckets, buckets[1:]):
        assert bucket.last < after.first
    for bucket in buckets:
        assert 1 < bucket.first <= bucket.timed <= bucket.last
    # the buckets are part of the timing method: other buckets are another cache file
    method = cpu_linear.timing_method(cpu_linear.timing_candidates())
    assert method["row_buckets"] == [[b.first, b.last, b.timed, b.budget] for b in buckets]


@needs_onednn
def test_engine_tokens_stay_plain_whatever_the_bucket_choices(monkeypatch, tmp_path):
    """An engine's decoding steps of 1 row and of every bucket's rows, each bucket on
    another kernel and layout: every request's tokens are the ones without cpu_linear."""
    monkeypatch.setenv(cpu_linear_cache.FOLDER_VARIABLE, str(tmp_path))
    monkeypatch.setattr(cpu_linear, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(cpu_linear, "measure_choices",
                        lambda shapes, candidates: {s: Decision("aten", "column", 2.0, {}, 9) for s in shapes})
    kernels = dict(zip(cpu_linear.ROW_BUCKETS, [("onednn", "row"), ("onednn", "column"), ("aten", "row")]))
    monkeypatch.setattr(cpu_linear, "measure_row_choices", lambda bucket, shapes, one_row, candidates: {
        s: Decision(*kernels[bucket], 2.0, {}, 9) for s in shapes})
    torch.manual_seed(0)
    model, vocab = zoo.llama("sdpa")
    example = (torch.randint(0, vocab, (2, 7)),)
    fast = fxforge.optimize(model, example, kv_cache=True)
    rows = cpu_linear_stats(fast).details["cpu_linear"]["rows"]
    assert set(rows) == {b.name for b in cpu_linear.ROW_BUCKETS}
    plain = fxforge.optimize(model, example, kv_cache=True, cpu_linear=False)
    gen = torch.Generator().manual_seed(3)
    # 18 requests at once: decoding steps of 18 rows down to 1, through every bucket
    prompts = [torch.randint(1, vocab, (int(n),), generator=gen) for n in torch.randint(2, 9, (18,), generator=gen)]
    rows_seen = set()
    for name, kernel in list(cpu_linear.KERNELS.items()):
        monkeypatch.setitem(cpu_linear.KERNELS, name, lambda x, w, b=None, kernel=kernel: rows_seen.add(
            x.numel() // x.shape[-1]) or kernel(x, w, b))
    answers = []
    for m in (fast, plain):
        engine = fxforge.Engine(m, max_batch=18, max_seq_len=32)
        requests = [engine.submit(p, 6 + i % 5) for i, p in enumerate(prompts)]
        engine.run()
        answers.append([r.result() for r in requests])
        assert engine.stats()["steps"] > 0
        engine.close()
    assert all(torch.equal(a, b) for a, b in zip(*answers))
    for bucket in cpu_linear.ROW_BUCKETS:  # the steps went through every bucket
        assert any(bucket.holds(r) for r in rows_seen), (bucket, sorted(rows_seen))


def test_the_row_count_benchmark_runs():
    """benchmarks/linear_rows.py (the per-row-count table in docs/benchmarks.md), on a
    small shape: one table row per kernel and layout, a figure per row count."""
    rows = benchmark_table("linear_rows.py", "--shapes", "64x32", "--rows", "1,3", "--cold-mb", "0.05", "--calls", "4")
    expected = 2 + (3 if onednn_available() else 0)  # aten row/column, oneDNN row/column/packed
    assert len(rows) == expected and all(row[0] == "64x32" for row in rows), rows
    for cells in rows:  # shape, kernel and layout, then microseconds at 1 and 3 rows
        assert len(cells) == 4 and all(float(c) > 0 for c in cells[2:]), cells


def test_a_saved_model_loads_with_the_choices_its_program_was_built_with(timing, monkeypatch, tmp_path):
    """Timing cut short on a busy machine keeps F.linear for that model and caches nothing,
    so a load in another process timed the shapes again and could pick another kernel: a
    saved SmolLM2 then gave other logits in the last bits. save() now writes the choices
    the program runs, and a load on the same machine builds the same program from them
    whatever the cache says; a load that asks to measure again does."""
    model, vocab, example = small_llama()
    real = cpu_linear.measure_choices
    monkeypatch.setattr(cpu_linear, "measure_choices", lambda shapes, candidates: real(shapes, candidates, budget_s=0.0))
    fast = fxforge.optimize(model, example)
    first = cpu_linear_stats(fast).details["cpu_linear"]
    assert first["cut_short"] > 0 and first["choices"] == {}  # F.linear everywhere, nothing cached
    fast.save(tmp_path / "saved")
    # the cache now prefers another kernel for every shape (what timing again can give)
    fingerprint = cpu_linear_cache.machine_fingerprint(cpu_linear.timing_method(cpu_linear.timing_candidates()))
    other = next(c for c in cpu_linear.timing_candidates() if tuple(c) != cpu_linear.BASELINE)
    shapes = {tuple(fast.graph.params[n].shape) for n in cpu_linear._linear_weights(fast.graph)}
    decided = {cpu_linear_cache.shape_key(s): cpu_linear_cache.Decision(other[0], other[1], 2.0, {}, 9) for s in shapes}
    cpu_linear_cache.write_decisions(cpu_linear_cache.cache_file(fingerprint), fingerprint,
                                     cpu_linear.timing_candidates() + [cpu_linear.PACKED], decided)
    monkeypatch.setattr(cpu_linear, "measure_choices", real)
    loaded = fxforge.load(tmp_path / "saved")
    assert cpu_linear_stats(loaded).details["cpu_linear"]["choices"] == {}
    ids = torch.randint(0, vocab, (2, 9))
    assert torch.equal(loaded(ids).logits, fast(ids).logits)
    assert cpu_linear_stats(fxforge.optimize(model, example)).details["cpu_linear"]["choices"]  # the cache serves optimize
    remeasured = fxforge.load(tmp_path / "saved", cpu_linear="measure")  # the caller's choice wins
    assert cpu_linear_stats(remeasured).details["cpu_linear"]["timed"] > 0
