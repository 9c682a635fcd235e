"""llama.cpp's own llama-quantize writes the K-quant files the gguf package cannot: the result is read
back by the harness with the types llama-quantize chose, its weights close to the originals."""

import numpy as np
import pytest

from engine.errors import BenchError, UnavailableError
from engine.model.quantize import llama_quantize
from engine.model.spec import ModelSpec
from engine.model.synth import write_synthetic


@pytest.fixture(scope="module")
def small_f32(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("q") / "small-f32.gguf", "small", "f32", seed=3)


def test_q4_k_m_file_reads_back_close_to_the_source(small_f32, tmp_path):
    out = llama_quantize(small_f32, tmp_path / "small-q4_k_m.gguf", "q4_k_m")
    src, q = ModelSpec.open(small_f32), ModelSpec.open(out)
    assert q.file_type == "q4_k_m" and not (tmp_path / "small-q4_k_m.gguf.partial").exists()
    name = "blk.0.ffn_down.weight"  # 256 columns: one K-quant super-block per row
    assert q.tensor_type(name) in ("q4_k", "q5_k", "q6_k")
    a, b = src.tensor(name), q.tensor(name)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_unknown_type_and_missing_tool_are_one_line_errors(small_f32, tmp_path, monkeypatch):
    with pytest.raises(BenchError, match="no file type 'q3_xx'"):
        llama_quantize(small_f32, tmp_path / "x.gguf", "q3_xx")
    monkeypatch.setenv("BENCH_LLAMA_TOOLS_DIR", str(tmp_path))
    with pytest.raises(UnavailableError, match="llama-quantize is not built here"):
        llama_quantize(small_f32, tmp_path / "x.gguf", "q8_0")
