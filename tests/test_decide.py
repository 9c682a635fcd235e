"""Decisions with confidence: the ratio CIs, the `best`/`tied`/`unchecked` rule, its write-back
over the whole results file, `bench compare`'s verdicts and adaptive repeats."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import backend_module_env, bench
from engine.measure.decide import decide, passes, row_changes
from engine.measure.stats import paired_ratio, welch_ratio
from engine.results.rows import BenchmarkResult
from engine.results.writers import ResultWriter, read_jsonl

PACED_ENV = backend_module_env("paced_backend")


def test_ratio_intervals_match_scipy_on_the_logs():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(40, 60, 7), rng.uniform(30, 50, 7)
    paired = paired_ratio(a, b)
    ci = stats.ttest_rel(np.log(a), np.log(b)).confidence_interval()
    assert (paired.low, paired.high) == pytest.approx((math.exp(ci.low), math.exp(ci.high)))
    assert paired.ratio == pytest.approx(np.exp(np.mean(np.log(a / b))))
    welch = welch_ratio(a, b[:5])
    res = stats.ttest_ind(np.log(a), np.log(b[:5]), equal_var=False)
    assert (welch.low, welch.high) == pytest.approx(tuple(map(math.exp, res.confidence_interval())))
    assert welch.p_value == pytest.approx(res.pvalue)
    assert math.isnan(paired_ratio([2.0], [1.0]).low)  # one round: no interval to claim


def rows(cell, speeds, *, framework="x", precision="f32", kl=0.0, top1=1.0, run="r1", node="", options=None,
         schedule="interleaved"):
    return [BenchmarkResult(cell_id=cell, run_id=run, repeat=i, framework=framework, precision=precision, model="m",
                            device="cpu", prompt_tokens=8, gen_tokens=8, prompt_ids=[1, 2], decode_tps=s,
                            kld_mean=kl, kld_p99=kl, same_top_p=top1, node=node, schedule=schedule,
                            options=options or {}, iterations=len(speeds)) for i, s in enumerate(speeds)]


def only(decisions):
    assert len(decisions) == 1
    return decisions[0]


def test_clearly_apart_is_best_with_a_ci_excluding_one():
    d = only(decide(rows("fast", [50, 52, 49, 51]) + rows("slow", [20, 22, 19, 21], precision="bf16")))
    assert d.verdict == "best" and d.top.cell_id == "fast" and d.runner_up.label == "bf16"
    assert d.ratio.low > 1 and d.ratio.method == "paired" and d.ratio.ratio == pytest.approx(2.45, rel=0.05)


def test_overlapping_speeds_are_tied_naming_every_tied_mode():
    # the top mode by median; the second overlaps it; the third is clearly slower and not in the tie
    d = only(decide(rows("a", [50, 30, 52, 31]) + rows("b", [31, 51, 30, 50], precision="bf16")
                    + rows("c", [10, 11, 10, 11], precision="q4_1")))
    assert d.verdict == "tied" and d.ratio.low <= 1 <= d.ratio.high
    assert {c.cell_id for c in d.tied} == {"a", "b"}
    changes = row_changes([d])
    assert changes["a"]["flags"] == ("tied",) and changes["a"]["tied_modes"] == changes["b"]["tied_modes"]
    assert "c" not in changes and changes[d.top.cell_id]["runner_up"]


def test_nan_fidelity_is_unchecked_and_never_best():
    assert passes(BenchmarkResult()) is None and passes(BenchmarkResult(kld_mean=0.0, kld_p99=0.0, same_top_p=1.0))
    assert not passes(BenchmarkResult(kld_mean=0.01, kld_p99=0.6, same_top_p=0.95))  # a heavy tail fails alone
    d = only(decide(rows("fast-unchecked", [90, 91, 90], kl=math.nan, top1=math.nan)
                    + rows("fast-broken", [80, 81, 80], kl=2.3, top1=0.2) + rows("ok", [20, 21, 20])))
    assert d.verdict == "best" and d.top.cell_id == "ok" and d.ratio is None  # the one passing mode
    assert row_changes([d])["fast-unchecked"] == {"flags": ("unchecked",)}
    d = only(decide(rows("u", [90, 91, 90], kl=math.nan, top1=math.nan)))
    assert d.verdict == "none" and d.top is None


def test_nodes_are_decided_apart():
    ds = decide(rows("a1", [50, 51, 50], node="n1") + rows("b1", [20, 21, 20], node="n1", precision="bf16")
                + rows("a2", [10, 11, 10], node="n2") + rows("b2", [40, 41, 40], node="n2", precision="bf16"))
    assert sorted((d.key[-1], d.top.cell_id, d.verdict) for d in ds) == [("n1", "a1", "best"), ("n2", "b2", "best")]


def test_cells_of_different_runs_are_compared_unpaired():
    d = only(decide(rows("old", [50, 52, 49], run="r1") + rows("new", [20, 22, 19], run="r2", precision="bf16")))
    assert d.verdict == "best" and d.ratio.method == "welch" and d.ratio.low > 1


def test_decision_is_written_onto_every_row_of_both_files_losing_nothing(tmp_path):
    from engine.sweep.best import decide_file

    w = ResultWriter(tmp_path / "r.csv")
    w.write([r.with_flags(("noisy",)) for r in rows("slow", [20, 21, 20], precision="bf16")])
    w.write(rows("fast", [50, 51, 50]) + [BenchmarkResult(cell_id="failed", status="error", error="boom")])
    before_csv, before_j = pd.read_csv(w.csv_path), read_jsonl(w.jsonl_path)
    decide_file(w)
    df, jl = pd.read_csv(w.csv_path), read_jsonl(w.jsonl_path)
    assert len(df) == len(before_csv) == len(jl) == 7
    untouched = [c for c in df.columns if c not in ("flags", "runner_up", "ratio_to_runner_up", "ratio_ci95_low",
                                                    "ratio_ci95_high", "ratio_method", "tied_modes")]
    pd.testing.assert_frame_equal(df[untouched], before_csv[untouched])
    fast = df[df.cell_id == "fast"]
    assert (fast["flags"] == "best").all() and (fast.runner_up == "bf16").all() and (fast.ratio_ci95_low > 1).all()
    assert (df[df.cell_id == "slow"]["flags"] == "noisy").all()  # its own flag kept, no verdict
    assert [r["flags"] for r in jl if r["cell_id"] == "fast"] == [["best"]] * 3
    assert all(r["ratio_method"] == "paired" for r in jl if r["cell_id"] == "fast")
    assert [r["extra"] for r in jl] == [r["extra"] for r in before_j]
    decide_file(w)  # decided again unchanged: the same verdict, not dropped
    assert (pd.read_csv(w.csv_path).query("cell_id == 'fast'")["flags"] == "best").all()
    # decided again after a faster mode arrives: the old verdict and its ratio are replaced
    w.write(rows("faster", [200, 201, 200], precision="q4_1"))
    decide_file(w)
    df = pd.read_csv(w.csv_path)
    fast = df[df.cell_id == "fast"]
    assert (fast["flags"].fillna("") == "").all() and fast.runner_up.isna().all()
    assert (df[df.cell_id == "faster"]["flags"] == "best").all()


def _best_run(out, framework, *extra):
    r = bench("run", "--modes", "best", "-f", framework, *extra, "-n", "6", "--prompt-tokens", "4",
              "-r", "3", "--warmup", "1", "-O", str(out), env=PACED_ENV)
    assert r.returncode == 0, r.stderr
    return r


def test_modes_best_end_to_end_apart_tied_and_resumed(tiny_f32, tmp_path):
    out = tmp_path / "apart.csv"
    r = _best_run(out, "paced_apart", "-m", tiny_f32)
    df = pd.read_csv(out)
    best = df[df["flags"].fillna("").str.contains("best")]
    assert best.cell_id.nunique() == 1 and (best.options.str.contains('"step_ms": 2.0')).all()
    assert (best.ratio_ci95_low > 1).all() and (best.runner_up == "f32 step_ms=12.0").all()
    assert "best" in r.stdout and "f32 step_ms=12.0" in r.stdout  # the --modes best table
    # resume: the fast mode's rows come from the first run, the slow mode's from the second
    slow = df[df.options.str.contains('"step_ms": 12.0')].cell_id.iloc[0]
    for path in (out, out.with_suffix(".jsonl")):
        keep = [line for line in path.read_text().splitlines(keepends=True) if slow not in line]
        path.write_text("".join(keep))  # as if the first run had been killed before the slow mode
    r = bench("run", "--modes", "best", "-f", "paced_apart", "-m", tiny_f32, "-n", "6", "--prompt-tokens", "4",
              "-r", "3", "-O", str(out), "--resume", env=PACED_ENV)
    assert r.returncode == 0 and "resumed: 1 cell(s)" in r.stderr, r.stderr
    df = pd.read_csv(out)
    assert df.run_id.nunique() == 2
    best = df[df["flags"].fillna("").str.contains("best")]
    # decided again over both runs' rows: unpaired now (the first run's verdict was paired)
    assert best.cell_id.nunique() == 1 and (best.ratio_method == "welch").all() and (best.ratio_ci95_low > 1).all()

    tied_out = tmp_path / "tied.csv"
    r = _best_run(tied_out, "paced_tied", "-m", tiny_f32)
    df = pd.read_csv(tied_out)
    assert not df["flags"].fillna("").str.contains("best").any()
    assert df["flags"].str.split(";").map(lambda f: "tied" in f).all()  # beside `noisy`: the swing is the point
    assert df.tied_modes.nunique() == 1 and df.cell_id.nunique() == 2
    top = df[df.runner_up.notna()]
    assert (top.ratio_ci95_low <= 1).all() and (top.ratio_ci95_high >= 1).all()
    assert "tied:" in r.stdout


def _csv(path, cell, values):
    pd.DataFrame({"cell_id": cell, "status": "ok", "framework": "torch", "precision": "f32", "device": "cpu",
                  "prompt_tokens": 32, "gen_tokens": 32, "decode_tps": values}).to_csv(path, index=False)


def test_compare_prints_the_ratio_with_its_ci_and_gates_on_the_whole_ci(tmp_path):
    from engine.analysis.compare import compare

    a, b = tmp_path / "before.csv", tmp_path / "after.csv"
    _csv(a, "c1", [100, 104, 96, 101, 99, 102, 98])
    _csv(b, "c1", [93, 97, 89, 94, 92, 95, 91])  # 7% slower, significantly, but the CI reaches past 0.95
    r = compare(str(a), str(b))[0][0]
    assert r.p_value < 0.01 and r.ratio < 0.95 < r.ci_high and not r.regressed
    res = bench("compare", str(a), str(b))
    assert res.returncode == 0, res.stderr
    assert f"after {r.ratio:.2f}x before [{r.ci_low:.2f}, {r.ci_high:.2f}]" in res.stdout
    assert bench("compare", str(a), str(b), "--threshold", "0.01").returncode == 1  # the whole CI is below 0.99


def test_adaptive_repeats_stop_at_the_target_or_flag_ci_wide(tiny_f32):
    from engine.measure.cell import Cell
    from engine.measure.runner import LoadedModel, cell_prompts, measure
    from engine.model.spec import ModelSpec

    spec = ModelSpec.open(tiny_f32)
    base = dict(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=6, warmup=0)
    steady = Cell(**base, repeats=3, max_repeats=8, ci_target=0.5)
    swinging = Cell(**base, repeats=3, max_repeats=5, ci_target=0.05)
    assert steady.cell_id == Cell(**base, repeats=3).cell_id  # effort knobs stay out of the id
    loaded = LoadedModel(steady, spec, 16)
    step = loaded.backend.step
    loaded.backend.step = _padded(step)  # a sleep dominates each call: a shared host's hiccups stay small beside it
    got = measure(steady, loaded, cell_prompts(spec, steady), 10.0, "r")
    # it stops as soon as the CI is inside the target (3 repeats unless the host hiccuped), never at the bound
    assert 3 <= len(got) < steady.max_repeats and "ci_wide" not in got[0].flags
    assert got[0].decode_tps_mean - got[0].decode_tps_ci95_low <= 0.5 * got[0].decode_tps_mean
    loaded.backend.step = _swinging(step)
    got = measure(swinging, loaded, cell_prompts(spec, swinging), 10.0, "r")
    assert len(got) == 5 and all("ci_wide" in r.flags for r in got) and got[0].decode_tps_ci95_low < 0.95 * \
        got[0].decode_tps_mean


def _padded(step):
    import time

    def padded(tokens, start):
        time.sleep(0.005)
        return step(tokens, start)

    return padded


def _swinging(step):
    """Every other generation 4 ms a forward call slower: a spread no 5 repeats narrow to 5%."""
    import time

    state = {"generation": 0}

    def slowed(tokens, start):
        state["generation"] += start == 0
        if state["generation"] % 2:
            time.sleep(0.004)
        return step(tokens, start)

    return slowed


def test_report_winners_obey_the_rule(tmp_path):
    from engine.analysis.frames import load_results
    from engine.analysis.report import winners

    w = ResultWriter(tmp_path / "r.csv")
    w.write(rows("t", [50, 30, 52, 31], framework="torch") + rows("l", [31, 51, 30, 50], framework="llamacpp")
            + rows("u", [99, 98, 99, 97], framework="mlx", kl=math.nan, top1=math.nan)
            + rows("n", [40, 41, 40, 41], framework="numpy", node="other"))
    table = winners(load_results([w.csv_path])).set_index("node")
    assert table.loc["", "verdict"] == "tied: torch f32, llamacpp f32"  # mlx is faster but unchecked
    assert table.loc["other", "winner"] == "numpy f32" and table.loc["other", "verdict"] == "best"


def test_adaptive_repeats_stop_at_the_time_bound_with_the_least_repeats_kept(tiny_f32):
    from engine.measure.cell import Cell
    from engine.measure.runner import LoadedModel, cell_prompts, measure
    from engine.model.spec import ModelSpec

    spec = ModelSpec.open(tiny_f32)
    base = dict(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=6, warmup=0, repeats=3,
                max_repeats=6, ci_target=0.05)
    bounded = Cell(**base, max_time_s=1e-6)  # measured past the bound after any repeat
    assert bounded.cell_id == Cell(**base).cell_id  # an effort knob, outside the id
    loaded = LoadedModel(bounded, spec, 16)
    loaded.backend.step = _swinging(loaded.backend.step)
    got = measure(bounded, loaded, cell_prompts(spec, bounded), 10.0, "r")
    assert len(got) == 3 and "ci_wide" in got[0].flags, "the least repeats, then the bound; still flagged"
    got = measure(Cell(**base), loaded, cell_prompts(spec, bounded), 10.0, "r")
    assert len(got) == 6, "without the bound the same spread runs to --max-repeats"
