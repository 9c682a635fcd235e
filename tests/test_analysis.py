"""report, compare and the notebook on output of a small real sweep."""

import os

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from conftest import ROOT, bench
from engine.analysis.compare import compare


@pytest.fixture(scope="module")
def sweep_csv(tiny_f32, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep.csv"
    r = bench("run", "-f", "numpy", "-f", "torch", "-m", tiny_f32, "--prompt-tokens", "8", "--prompt-tokens", "32",
              "-n", "8", "-r", "3", "-O", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_report_writes_figures_and_tables(sweep_csv, tmp_path):
    r = bench("report", str(sweep_csv), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "rep"
    for name in ("decode_tps", "prefill_ttft", "memory_vs_throughput", "roofline", "itl_cdf"):
        png = rep / f"{name}.png"
        assert png.exists() and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    md = (rep / "report.md").read_text()
    for heading in ("## Cells", "## Winner per workload", "## Correctness against the reference", "## Flagged cells"):
        assert heading in md
    assert md.count("| numpy") >= 2 and md.count("| torch") >= 2


def test_report_bad_input(tmp_path):
    r = bench("report", str(tmp_path / "none.csv"), "--out", str(tmp_path))
    assert r.returncode == 2 and "results file not found" in r.stderr


def _rows(path, cell, values, metric="decode_tps"):
    pd.DataFrame({"cell_id": cell, "status": "ok", "framework": "torch", "precision": "f32", "device": "cpu",
                  "prompt_tokens": 32, "gen_tokens": 32, metric: values}).to_csv(path, index=False)


def test_compare_flags_a_significant_regression(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _rows(a, "c1", [100, 101, 99, 100, 100])
    _rows(b, "c1", [80, 81, 79, 80, 80])
    rows, unmatched = compare(str(a), str(b))
    assert len(rows) == 1 and not unmatched
    r = rows[0]
    assert r.ratio == pytest.approx(0.8, rel=1e-4) and r.regressed and r.p_value < 1e-6  # of geometric means
    assert r.ci_low < 0.8 < r.ci_high < 0.85
    res = bench("compare", str(a), str(b))
    assert res.returncode == 1 and "REGRESSION" in res.stdout


def test_compare_noise_is_not_a_regression(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _rows(a, "c1", [100, 60, 140, 100, 100])
    _rows(b, "c1", [90, 50, 130, 95, 95])  # 8% lower on average but well inside the noise
    r = compare(str(a), str(b))[0][0]
    assert not r.regressed and r.p_value > 0.05
    assert bench("compare", str(a), str(b)).returncode == 0


def test_compare_lower_is_better_metric(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _rows(a, "c1", [0.10, 0.11, 0.10, 0.10], metric="ttft_s")
    _rows(b, "c1", [0.20, 0.21, 0.20, 0.20], metric="ttft_s")
    assert compare(str(a), str(b), metric="ttft_s")[0][0].regressed
    assert compare(str(b), str(a), metric="ttft_s")[0][0].improved


def test_notebook_executes_on_real_results(sweep_csv):
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["BENCH_RESULTS"] = str(sweep_csv)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["BENCH_RESULTS"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5
