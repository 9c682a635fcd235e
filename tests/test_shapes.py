"""Synthetic files at shipped models' sizes: the shapes count the real models' weights, files are
streamed (memory near one tensor, not the file), cached once as F16 and quantized from it by
llama-quantize, and the quantized file runs in llama.cpp as in the reference."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import ROOT, bench, load_backend, rel_err
from engine.model import shapes
from engine.model.catalog import resolve_model
from engine.model.shapes import REAL_SHAPES, RealShape
from engine.model.spec import ModelSpec

# parameter counts of the Hugging Face checkpoints (model cards / safetensors metadata)
SHIPPED_PARAMS = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
                  "qwen2.5-1.5b": 1_543_714_304}


@pytest.mark.parametrize("name", SHIPPED_PARAMS)
def test_shapes_hold_the_shipped_models_weights(name):
    assert REAL_SHAPES[name].params() == SHIPPED_PARAMS[name]


def test_llama3_shapes_carry_their_rope_scaling_and_the_moe_shape_is_sparse():
    one, eight = REAL_SHAPES["llama-3.2-1b"].config, REAL_SHAPES["llama-3.1-8b"].config
    assert len(one.rope_freq_factors) == 32 and max(one.rope_freq_factors) == 32.0  # factor 32 (3.2), 8 (3.1)
    assert max(eight.rope_freq_factors) == 8.0 and min(eight.rope_freq_factors) == 1.0
    moe = REAL_SHAPES["qwen3-moe-3b"]
    assert moe.params() > 2e9 and moe.config.n_experts_used * 4 == moe.config.n_experts


def _mini() -> RealShape:
    """The 1B shape cut to 2 layers of width 256 (64-wide heads: the same 32 RoPE factors)."""
    big = REAL_SHAPES["llama-3.2-1b"]
    return replace(big, config=replace(big.config, n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512,
                                       vocab_size=2048))


@pytest.fixture
def mini_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(REAL_SHAPES, "mini", _mini())
    return tmp_path / "synth"


def test_quantized_names_resolve_through_one_cached_f16(mini_cache):
    path = resolve_model("synth:mini:q4_k_m")
    spec, f16 = ModelSpec.open(path), mini_cache / "mini-f16.gguf"
    assert spec.file_type == "q4_k_m" and spec.config.rope_freq_factors == _mini().config.rope_freq_factors
    assert spec.tensor_type("blk.0.ffn_down.weight") in ("q4_k", "q6_k")
    stamp = f16.stat().st_mtime_ns
    assert ModelSpec.open(resolve_model("synth:mini:q8_0")).file_type == "q8_0"
    assert resolve_model("synth:mini") == path  # Q4_K_M unless named
    assert f16.stat().st_mtime_ns == stamp and not list(mini_cache.glob("*partial*"))


def test_f16_weights_are_scaled_like_the_small_synthetic_files(mini_cache):
    spec = ModelSpec.open(resolve_model("synth:mini:f16"))
    assert spec.tensor_type("blk.1.attn_q.weight") == "f16"
    assert np.std(spec.tensor("blk.1.attn_q.weight")) == pytest.approx(256**-0.5, rel=0.02)
    assert np.std(spec.tensor("token_embd.weight")) == pytest.approx(1.0, rel=0.02)


def test_llama_cpp_runs_the_q4_k_m_file_as_the_reference(mini_cache):
    path = resolve_model("synth:mini:q4_k_m")
    ref, cpp = load_backend("numpy", path), load_backend("llamacpp", path)
    prompt = [5, 17, 99, 42, 7, 300, 12]
    r, c = ref.prefill(prompt), cpp.prefill(prompt)
    assert rel_err(c, r) < 2e-2  # llama.cpp rounds activations to 8 bits against K-quant blocks
    assert int(np.argmax(c)) == int(np.argmax(r))


# writes a 159M-weight F16 file (318 MB) and prints the peak RSS gained while writing it
STREAM_SCRIPT = """
import resource, sys
from dataclasses import replace
from pathlib import Path
from engine.model import shapes
big = shapes.REAL_SHAPES["llama-3.2-1b"]
shapes.REAL_SHAPES["mid"] = replace(big, config=replace(big.config, n_layers=8, dim=1024, n_heads=16, ffn_dim=4096,
                                                        vocab_size=32000))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = shapes.write_real_shape("mid", Path(sys.argv[1]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, out.stat().st_size)
"""


def test_writing_streams_tensor_by_tensor(tmp_path):
    done = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(tmp_path / "mid.gguf")], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    gained, size = map(int, done.stdout.split())
    assert size > 300e6 and gained < 0.4 * size, gained  # the largest tensor is 65 MB in f16


def test_real_shape_names_refuse_what_they_cannot_be(tmp_path):
    env = {"BENCH_CACHE_DIR": str(tmp_path)}
    for name, message in (("synth:llama-3.1-8b:f32", "synth:llama-3.1-8b comes in q4_0"),
                          ("synth:llama-3.2-1b:q4_k_m:qwen3", "has its own architecture (llama3)")):
        r = bench("run", "-f", "numpy", "-m", name, env=env)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.rglob("*.gguf"))
