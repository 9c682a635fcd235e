"""Compile caches: kept under BENCH_CACHE_DIR and reused by a later run, which says so."""

import os

import numpy as np
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


# a fresh process: tinygrad's program table starts empty there, as in a sweep's measuring child
PROGRAMS_CHILD = """
import json, sys
import numpy as np
import backends
from engine.model.spec import ModelSpec

opened = backends.open_backend(sys.argv[1], ModelSpec.open(sys.argv[2]), "f32", max_seq_len=64)
b = opened.backend
logits = [b.prefill([1, 2, 3, 4])]
for _ in range(3):
    logits.append(b.decode(int(np.argmax(logits[-1]))))
compiled = b.uncached_compiles()
from tinygrad.codegen import to_program_cache
programs = len(to_program_cache)
b.close()
print(json.dumps(dict(restored=opened.info.details["programs_restored"], compiled=compiled, programs=programs,
                      logits=[l.tolist() for l in logits])))
"""


def programs_run(framework, model, cachedb):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "CACHEDB": str(cachedb), "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", PROGRAMS_CHILD, framework, model], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


@pytest.mark.parametrize("framework", ["tinygrad", "hybrid"])
def test_a_fresh_process_restores_tinygrad_programs_and_computes_the_same(framework, tiny_f32, tmp_path):
    """tinygrad lowers every kernel anew in each process; the programs file beside CACHEDB hands
    the next process the finished ones: nothing compiled, the reference's logits."""
    from backends.tinygrad_caches import programs_path
    from conftest import reference_logits

    cachedb = tmp_path / "tinygrad" / "cache.db"
    first, _ = programs_run(framework, tiny_f32, cachedb)
    saved = list(cachedb.parent.glob("programs-*.pkl"))
    assert first["restored"] == 0 and first["compiled"] > 0 and len(saved) == 1
    assert saved[0].name == programs_path().name  # per tinygrad version and instruction set
    second, _ = programs_run(framework, tiny_f32, cachedb)
    assert second["restored"] == second["programs"] == first["programs"] > 0  # every one it ran, restored
    assert second["compiled"] == 0
    for got in (first, second):
        for i, (r, g) in enumerate(zip(reference_logits(tiny_f32, [1, 2, 3, 4], 3), got["logits"])):
            assert np.abs(r - np.array(g)).max() / np.abs(r).max() < 1e-3, f"step {i}"


def test_a_corrupt_programs_file_is_ignored_with_a_warning_and_rewritten(tiny_f32, tmp_path):
    cachedb = tmp_path / "tinygrad" / "cache.db"
    programs_run("tinygrad", tiny_f32, cachedb)
    saved = next(cachedb.parent.glob("programs-*.pkl"))
    saved.write_bytes(saved.read_bytes()[:100])  # truncated mid-write, say
    run, stderr = programs_run("tinygrad", tiny_f32, cachedb)
    assert run["restored"] == 0 and "warning: ignoring tinygrad's saved programs" in stderr
    assert programs_run("tinygrad", tiny_f32, cachedb)[0]["restored"] > 0  # the close rewrote it whole
