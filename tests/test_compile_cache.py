"""Compile caches: kept under BENCH_CACHE_DIR and reused by a later run, which says so."""

import pandas as pd
import pytest

from conftest import bench
from engine.measure.runner import compile_cache_state

MODES = {  # a compiled mode of each framework that compiles, with its smallest real search
    "torch": ("-f", "torch", "-p", "f32", "--compile"),
    "tinygrad": ("-f", "tinygrad", "-o", "beam=1"),
    "hybrid": ("-f", "hybrid"),  # its tinygrad segments' kernels, compiled without a search
}


def run_twice(model, args, cache, tmp_path):
    """The same compiled cell in two fresh processes that share one cache directory."""
    rows = []
    for i in (1, 2):
        csv = tmp_path / f"run{i}.csv"
        r = bench("run", "-m", model, *args, "--prompt-tokens", "4", "-n", "4", "-r", "1", "--no-check",
                  "-O", str(csv), env={"BENCH_CACHE_DIR": str(cache)}, timeout=900)
        assert r.returncode == 0, r.stderr
        rows.append(pd.read_csv(csv, keep_default_na=False).iloc[0])
    return rows


# tinygrad's cold BEAM search takes minutes on two cores: in the slow set; torch's stays in the default run
@pytest.mark.parametrize("framework", [pytest.param(f, marks=pytest.mark.slow) if f == "tinygrad" else f
                                       for f in sorted(MODES)])
def test_a_second_run_reads_the_compile_back_and_says_cached(framework, tiny_f32, tmp_path):
    cache = tmp_path / "cache"
    cold, warm = run_twice(tiny_f32, MODES[framework], cache, tmp_path)
    assert (cold.status, warm.status) == ("ok", "ok")
    assert (cold.compile_cache, warm.compile_cache) == ("cold", "cached")
    print(f"{framework} compile_s cold {cold.compile_s:.2f} s, cached {warm.compile_s:.2f} s")
    assert warm.compile_s < cold.compile_s  # loosely: the host is shared and noisy
    stored = cache / "compile"  # where the frameworks were told to keep it, nothing of the user's
    assert any(p.is_file() for p in stored.rglob("*")), f"nothing cached under {stored}"


def test_an_eager_mode_says_nothing_about_a_compile_cache(tiny_f32, tmp_path):
    r = bench("run", "-m", tiny_f32, "-f", "torch", "-p", "f32", "--prompt-tokens", "4", "-n", "2", "-r", "1",
              "--no-check", "-O", str(tmp_path / "e.csv"), env={"BENCH_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(tmp_path / "e.csv", keep_default_na=False).iloc[0].compile_cache == ""


def test_compile_cache_state_reads_the_change_in_uncached_compiles():
    assert compile_cache_state(0, 3) == "cold"
    assert compile_cache_state(3, 3) == "cached"
    assert compile_cache_state(None, None) == ""


def test_torch_eager_decode_attends_over_the_filled_positions_only(tiny_f32):
    """Only a compiled decode reads the whole static cache (one shape); an eager one stops at the
    last written position."""
    from conftest import load_backend

    b = load_backend("torch", tiny_f32, "f32", max_seq=64)
    b.prefill([1, 2, 3, 4])
    b.decode(5)
    assert b.ops.end == 5
    assert b.uncached_compiles() is None
