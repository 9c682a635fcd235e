"""Architectures as data: llama, qwen2, qwen3 and gemma3 read from GGUF metadata, the numpy
reference against llama.cpp on each, and one-line errors for what is not implemented."""

import numpy as np
import pytest

from conftest import ARCHS, bench, load_backend, require_backend
from engine.errors import ModelError
from engine.model.arch import read_config
from engine.model.spec import ModelSpec
from engine.model.synth import write_synthetic

PROMPT = [5, 17, 99, 42, 7, 300, 12, 250, 33, 44, 55, 66]  # longer than the tiny gemma3 window (4)


def test_configs_read_from_metadata(arch_models):
    cfgs = {a: ModelSpec.open(p).config for a, p in arch_models.items()}
    assert cfgs["llama"].arch.permuted_qk and not cfgs["qwen2"].arch.permuted_qk
    assert cfgs["qwen2"].arch.qkv_bias and cfgs["qwen2"].head_dim == 16
    q3, g = cfgs["qwen3"], cfgs["gemma3"]
    assert q3.arch.qk_norm and q3.head_dim == 32 != q3.dim // q3.n_heads
    assert g.arch.post_norms and g.arch.activation == "gelu_tanh" and g.embed_scale == 8.0
    assert g.local_layers == (True,) * 5 + (False,) and g.window(0) == 4 and g.window(5) == 0
    assert g.rope(0) == (10000.0, 1.0) and g.rope(5) == (1e6, 1.0) and g.scale == 32 ** -0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_its_tensors(arch_models, arch):
    spec = ModelSpec.open(arch_models[arch])
    w = spec.load_weights(lambda a: a)
    layer = w.layers[0]
    assert (layer.bq is not None) == (arch == "qwen2")
    assert (layer.q_norm is not None) == (arch in ("qwen3", "gemma3"))
    assert (layer.post_ffn_norm is not None) == (arch == "gemma3")
    assert layer.wq.shape == (spec.config.n_heads * spec.config.head_dim, spec.config.dim)
    assert w.output is w.tok_embd  # tied: one copy


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_equals_llama_cpp(arch_models, arch):
    """llama.cpp runs each architecture its own way; the numpy reference must agree with it
    (f16 KV cache there: 1e-3 relative), across the sliding window and both RoPE bases."""
    require_backend("llamacpp")
    ref, cpp = load_backend("numpy", arch_models[arch]), load_backend("llamacpp", arch_models[arch])
    pairs = [(ref.prefill(PROMPT), cpp.prefill(PROMPT))]
    for t in (3, 9, 100, 200):
        pairs.append((ref.decode(t), cpp.decode(t)))
    for i, (r, c) in enumerate(pairs):
        assert np.abs(r - c).max() / np.abs(r).max() < 1e-3, f"step {i}"


def _config_with(path, **overrides):
    spec = ModelSpec.open(path)
    arch = spec.field("general.architecture")
    field = lambda key, default=None: overrides.get(key.removeprefix(arch + "."), spec.field(key, default))  # noqa: E731
    return read_config(arch, field, spec._positive, 0)


@pytest.mark.parametrize("key,value,message", [
    ("final_logit_softcapping", 30.0, "final_logit_softcapping = 30.0: logit soft-capping is not supported"),
    ("attn_logit_softcapping", 50.0, "attention logit soft-capping is not supported"),
    ("expert_count", 8, "a mixture of experts is not supported"),
    ("rope.scaling.type", "yarn", "rope.scaling.type = 'yarn' is not supported (supported: none, linear)"),
])
def test_unimplemented_metadata_is_a_clear_error(arch_models, key, value, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config_with(arch_models["gemma3"], **{key: value})


def test_linear_rope_scaling_applies_to_global_layers(arch_models):
    cfg = _config_with(arch_models["gemma3"], **{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0})
    assert cfg.rope(5) == (1e6, 0.125) and cfg.rope(0) == (10000.0, 1.0)


def test_windowed_mask():
    from backends.numpy_ref import attention_mask

    m = attention_mask(start=5, t=2, end=7, window=3)  # queries at 5 and 6 see 3 keys each
    assert m.tolist() == [[True, True, True, False, False, False, True],
                          [True, True, True, True, False, False, False]]


def test_unsupported_architecture_is_one_line_exit_2(tmp_path):
    p = write_synthetic(tmp_path / "moe.gguf", "tiny", "f32", architecture="qwen3moe")
    r = bench("run", "-f", "numpy", "-m", str(p), "-n", "2", "-r", "1", "-O", str(tmp_path / "o.csv"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "unsupported architecture 'qwen3moe' (supported: llama, qwen2, qwen3, gemma3)" in r.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_synth_arch_cli(tmp_path, arch):
    out = tmp_path / f"{arch}.gguf"
    r = bench("synth", "--arch", arch, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ModelSpec.open(out).config.arch.name == arch


def test_synthetic_names_take_an_architecture(tmp_path, monkeypatch):
    from engine.model.catalog import resolve_model

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    assert ModelSpec.open(resolve_model("synth:tiny:f32:qwen3")).config.arch.name == "qwen3"
