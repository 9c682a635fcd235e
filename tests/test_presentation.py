"""Every table and figure keyed by the full mode; ITL percentiles over pooled samples; `cold` rows."""

import io
import math
import json

import numpy as np
import pandas as pd
import pytest

from conftest import bench
from engine.analysis import frames
from engine.measure.cell import Cell
from engine.measure.runner import CellRun, LoadedModel, cell_prompts, measure, positions_needed
from engine.model.spec import ModelSpec
from engine.results.modes import mode_label
from engine.results.rows import BenchmarkResult
from engine.results.writers import ResultWriter, print_rows, summary_cells


def _cell_rows(cell_id, framework, compiled=False, options=None, tps=10.0, roofline=0.1, seed=0):
    """Three repeats of one cell, each with its own 31 inter-token latencies."""
    rng = np.random.default_rng(seed)
    return [BenchmarkResult(cell_id=cell_id, repeat=i, framework=framework, precision="f32", device="cpu",
                            model="tiny", prompt_tokens=8, gen_tokens=32, iterations=3,
                            optimization_level="compile" if compiled else "eager", options=options or {},
                            decode_tps=tps + i, decode_tps_mean=tps + 1, roofline_frac=roofline + 0.01 * i,
                            itl_s=list(rng.lognormal(-4, 0.5 + i, 31)), itl_p50_s=0.01, itl_p99_s=0.02)
            for i in range(3)]


@pytest.fixture()
def mixed_modes(tmp_path):
    """Two torch f32 cells apart only in compile, two tinygrad f32 cells only in beam, written
    through the writer as a sweep writes them."""
    rows = (_cell_rows("eager", "torch", tps=20) + _cell_rows("comp", "torch", compiled=True, tps=60, seed=1)
            + _cell_rows("beam0", "tinygrad", options={"beam": 0}, roofline=0.1, seed=2)
            + _cell_rows("beam2", "tinygrad", options={"beam": 2}, roofline=0.5, seed=3))
    out = tmp_path / "modes.csv"
    ResultWriter(out).write(rows)
    return rows, out


def test_mode_label_reads_rows_and_csv_cells_alike():
    assert mode_label("f32", "compile", {}) == "f32 compiled"
    assert mode_label("f32", "eager", '{"beam": 2}') == "f32 beam=2"
    assert mode_label("bf16", "eager", float("nan")) == "bf16"
    assert mode_label("f32", "compile", {"b": 1, "a": "x"}) == "f32 compiled a=x b=1"


def test_table_and_markdown_have_a_mode_column_that_tells_the_modes_apart(mixed_modes):
    rows, _ = mixed_modes
    out = io.StringIO()
    print_rows(rows, "markdown", out)
    lines = out.getvalue().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["framework", "mode"]
    modes = {ln.split("|")[1].strip() + " / " + ln.split("|")[2].strip() for ln in lines[2:]}
    assert modes == {"torch / f32", "torch / f32 compiled", "tinygrad / f32 beam=0", "tinygrad / f32 beam=2"}
    table = io.StringIO()
    print_rows(rows, "table", table)
    assert "f32 compiled" in table.getvalue() and "f32 beam=2" in table.getvalue()


def test_summary_itl_is_the_percentile_of_the_pooled_samples(mixed_modes):
    rows, out = mixed_modes
    cell = rows[:3]
    pooled = np.concatenate([r.itl_s for r in cell])
    p50, p99 = np.percentile(pooled, 50), np.percentile(pooled, 99)
    mean_of_p99 = np.mean([np.percentile(r.itl_s, 99) for r in cell])
    assert abs(p99 - mean_of_p99) > 0.01 * p99, "the test data must tell the two apart"
    itl = summary_cells(cell)[0][9]
    assert itl == f"{p50 * 1e3:.1f}/{p99 * 1e3:.1f}"
    df = frames.load_results([out])
    summary = frames.cell_summary(df, frames.load_latencies([out]))
    eager = summary[(summary.framework == "torch") & (summary["mode"] == "f32")].iloc[0]
    assert eager.itl_p50_s == pytest.approx(p50) and eager.itl_p99_s == pytest.approx(p99)
    without_samples = frames.cell_summary(df).set_index("mode").loc["f32"]
    assert without_samples.itl_p99_s == pytest.approx(0.02), "no JSONL: the repeats' own percentiles"


def test_figures_group_by_the_full_mode(mixed_modes):
    _, out = mixed_modes
    df = frames.load_results([out])
    lat = frames.load_latencies([out])
    summary = frames.cell_summary(df, lat)
    roof = frames.roofline_by_mode(summary).set_index(["framework", "mode"]).roofline_frac
    assert roof[("tinygrad", "f32 beam=0")] == pytest.approx(0.11)
    assert roof[("tinygrad", "f32 beam=2")] == pytest.approx(0.51), "beam 2's bar is its own, not a mean with beam 0"
    assert set(lat.groupby(["framework", "mode"]).groups) == {
        ("torch", "f32"), ("torch", "f32 compiled"), ("tinygrad", "f32 beam=0"), ("tinygrad", "f32 beam=2")}
    assert lat.groupby("cell_id").size().to_dict() == {"beam0": 93, "beam2": 93, "comp": 93, "eager": 93}
    import matplotlib

    matplotlib.use("Agg")
    labels = {t.get_text() for t in frames.fig_itl_cdf(lat).axes[0].get_legend().get_texts()}
    assert labels == {"torch f32", "torch f32 compiled", "tinygrad f32 beam=0", "tinygrad f32 beam=2"}
    bars = {t.get_text() for t in frames.fig_roofline(summary).axes[0].get_yticklabels()}
    assert bars == labels
    assert {t.get_text() for t in frames.fig_prefill(summary).axes[0].get_legend().get_texts()} == labels


def test_report_and_compare_name_the_mode(mixed_modes, tmp_path):
    _, out = mixed_modes
    r = bench("report", str(out), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| torch | f32 compiled |" in md and "| tinygrad | f32 beam=2 |" in md
    from engine.analysis.compare import compare

    labels = {c.label for c in compare(str(out), str(out))[0]}
    assert "torch f32 compiled cpu p8 g32" in labels and "tinygrad f32 beam=2 cpu p8 g32" in labels


def _measured(model, framework, warmup, **kw):
    cell = Cell(framework=framework, model=model, prompt_tokens=4, gen_tokens=4, repeats=2, warmup=warmup, **kw)
    spec = ModelSpec.open(model)
    loaded = LoadedModel(cell, spec, positions_needed(spec, cell))
    try:
        return measure(cell, loaded, cell_prompts(spec, cell), 10.0, "t")
    finally:
        loaded.close()


def test_a_compiling_mode_without_warm_up_is_flagged_cold(tiny_f32):
    """tinygrad's TinyJit captures on the first calls: with --warmup 0 that lands in the first
    repeat, which the row says; with the default warm-up it does not, and numpy never compiles."""
    cold = _measured(tiny_f32, "tinygrad", warmup=0)
    assert all("cold" in r.flags for r in cold)
    assert cold[0].total_time > cold[1].total_time, "the first repeat paid the JIT capture"
    assert not any("cold" in r.flags for r in _measured(tiny_f32, "tinygrad", warmup=1))
    assert not any("cold" in r.flags for r in _measured(tiny_f32, "numpy", warmup=0))


def test_cold_reaches_the_results_file(tiny_f32, tmp_path):
    out = tmp_path / "cold.csv"
    r = bench("run", "-f", "tinygrad", "-f", "numpy", "-m", tiny_f32, "--prompt-tokens", "4", "-n", "3", "-r", "2",
              "--warmup", "0", "-O", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    flags = df.groupby("framework").flags.apply(lambda s: {f for v in s.fillna("") for f in v.split(";") if f})
    assert "cold" in flags["tinygrad"] and "cold" not in flags["numpy"]
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert all(("cold" in x["flags"]) == (x["framework"] == "tinygrad") for x in rows)


def test_a_number_that_rounds_to_zero_prints_without_a_sign():
    from engine.results.writers import fmt

    # an exact match's KLD read back from float16 log-probabilities comes out at -3e-6
    assert [fmt(-3e-6, ".4f"), fmt(-0.04, ".1f"), fmt(-0.5, ".1f"), fmt(-2e-9, ".1e"), fmt(math.nan)] == \
        ["0.0000", "0.0", "-0.5", "-2.0e-09", "-"]


def test_a_warm_up_runs_the_prompt_and_its_first_tokens_and_compile_s_is_its_excess(tiny_f32):
    """As llama-bench warms up on its prompt and a token: every shape the repeats call, not a
    whole repeat; compile_s compares it with the same tokens of a steady repeat."""
    from engine.measure.cell import WARMUP_TOKENS
    from engine.measure.runner import warmup_share

    cell = Cell(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=WARMUP_TOKENS + 4, repeats=2, warmup=1)
    spec = ModelSpec.open(tiny_f32)
    loaded = LoadedModel(cell, spec, positions_needed(spec, cell))
    steps = []
    decode = loaded.backend.decode_batch
    loaded.backend.decode_batch = lambda tokens: steps.append(len(tokens)) or decode(tokens)
    try:
        run = CellRun(cell, loaded, cell_prompts(spec, cell), 10.0, "t")
        run.warm_up()
        assert len(steps) == WARMUP_TOKENS - 1  # the prefill gave the first token
        while not run.step():
            pass
        assert len(steps) == WARMUP_TOKENS - 1 + 2 * (cell.gen_tokens - 1)
        share = warmup_share(run.runs, WARMUP_TOKENS)
        assert 0 < share <= max(r.total_ns for r in run.runs) / 1e9  # a part of a repeat (times vary)
        assert run.rows()[0].compile_s == pytest.approx(max(0.0, run.warm[0] - share))
    finally:
        loaded.close()
