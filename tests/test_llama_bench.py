"""llama-bench beside `bench run -f llamacpp`: both measured on the same file in one run, the
table reads their own outputs, and a missing tool or a bad file is one line."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from engine.errors import BenchError, UnavailableError
from engine.measure.llama_bench import SideBySide, llama_bench_tg, markdown, side_by_side


def test_side_by_side_measures_both_on_the_same_file(tiny_models):
    r = side_by_side(tiny_models["q8_0"], threads=1, prompt_tokens=8, gen_tokens=4, repeats=2, rounds=1)
    assert len(r.llama_bench_tps) == len(r.bench_tps) == 1
    assert r.llama_bench_tps[0] > 10 and r.bench_tps[0] > 10  # a 2-layer file decodes in well under 0.1 s a token
    assert r.ratio == pytest.approx(r.bench_tps[0] / r.llama_bench_tps[0])
    assert r.flash_attn in ("0", "False", "false")  # llama-bench as the backend runs: flash attention off
    table = markdown([r]).splitlines()
    assert table[2].startswith("| tiny-q8_0.gguf | 1 | 8 | 4 | ") and table[2].endswith(f"| {r.ratio:.3f} |")


def test_medians_of_rounds():
    r = SideBySide("m.gguf", 2, 32, 16, llama_bench_tps=[10.0, 12.0, 30.0], bench_tps=[9.0, 11.0, 1.0], flash_attn="0")
    assert r.ratio == pytest.approx(9.0 / 12.0)


def test_missing_tool_and_bad_file_are_one_line(tiny_f32, tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(BenchError, match="llama-bench on .*bad.gguf failed"):
        llama_bench_tg(str(bad), 1, 8, 4, 1)
    monkeypatch.setenv("BENCH_LLAMA_TOOLS_DIR", str(tmp_path))
    with pytest.raises(UnavailableError, match="llama-bench is not built here"):
        llama_bench_tg(tiny_f32, 1, 8, 4, 1)


def test_script_prints_the_table(tiny_models):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_bench_side_by_side.py"), tiny_models["q4_0"],
                           "-t", "1", "-p", "8", "-n", "4", "-r", "1", "--rounds", "1"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert "| tiny-q4_0.gguf | 1 | 8 | 4 |" in done.stdout
