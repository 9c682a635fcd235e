"""Architectures as data: llama (with Llama 3.x RoPE factors too), qwen2, qwen3, gemma2 and gemma3 read from
GGUF metadata, the numpy reference against llama.cpp (and transformers) on each, and one-line
errors for what is not implemented."""

import numpy as np
import pytest

from conftest import ARCHS, LONG_PROMPT, MOE_ARCHS, bench, load_backend, rel_err, require_backend
from engine.errors import ModelError
from engine.model.arch import read_config
from engine.model.forward import rope_frequencies
from engine.model.spec import ModelSpec
from engine.model.synth import LLAMA3_BASE, SHAPES, Llama3Rope, gguf_architecture, llama3_rope, write_synthetic

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
    assert (layer.bq is not None) == (arch == "qwen2") and layer.wv is not None
    assert (layer.q_norm is not None) == (arch in ("qwen3", "gemma3"))
    assert (layer.post_ffn_norm is not None) == arch.startswith("gemma")
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


def test_phi3_fused_tensors_split_at_load(arch_models):
    """Phi-3 files hold Q/K/V as one attn_qkv and gate/up as one ffn_up; the layers get the row
    blocks, in that order (as llama.cpp's build_qkv and swiglu split them)."""
    spec = ModelSpec.open(arch_models["phi3"])
    c = spec.config
    assert "blk.0.attn_qkv.weight" in spec.tensor_names and "blk.0.attn_q.weight" not in spec.tensor_names
    layer = spec.load_weights(lambda a: a).layers[1]
    qkv, up = spec.tensor("blk.1.attn_qkv.weight"), spec.tensor("blk.1.ffn_up.weight")
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    np.testing.assert_array_equal(layer.wk, qkv[q:q + kv])
    np.testing.assert_array_equal(np.concatenate([layer.wq, layer.wk, layer.wv]), qkv)
    np.testing.assert_array_equal(np.concatenate([layer.w_gate, layer.w_up]), up)
    assert layer.w_up.shape == (c.ffn_dim, c.dim)


def test_phi3_long_rope_is_one_line(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "phi3-128k.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.add_tensor("rope_factors_long.weight", np.ones(2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = bench("run", "-f", "numpy", "-m", str(tmp_path / "phi3-128k.gguf"), "-n", "2", "-O", str(tmp_path / "o.csv"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "rope_factors_long/short.weight (LongRoPE, Phi-3 128k) are not supported" in r.stderr


def test_partial_rope_is_a_clear_error(arch_models):
    with pytest.raises(ModelError, match="rope.dimension_count = 12: RoPE over part of the 16-wide head"):
        _config_with(arch_models["phi3"], **{"rope.dimension_count": 12})


def test_gemma2_config_read_from_metadata(arch_models):
    g = ModelSpec.open(arch_models["gemma2"]).config
    assert g.local_layers == (True, False) and g.window(0) == 4 and g.window(1) == 0  # alternating
    assert g.attn_softcap == 2.0 and g.final_softcap == 10.0
    assert g.rope(0) == g.rope(1) == (1e6, 1.0) and g.scale == 16 ** -0.5  # one RoPE base; 1/sqrt(head size)
    assert g.arch.post_norms and g.embed_scale == 8.0 and not g.arch.qk_norm


def test_gemma2_soft_caps_bite_and_match_llama_cpp(arch_models):
    """The tiny file's caps change its logits, and the reference caps as llama.cpp does."""
    from dataclasses import replace

    path = arch_models["gemma2"]
    cpp = load_backend("llamacpp", path).prefill(PROMPT)
    ref = load_backend("numpy", path)
    assert rel_err(ref.prefill(PROMPT), cpp) < 1e-3
    capped = ref.config
    for caps in ({"attn_softcap": 0.0}, {"final_softcap": 0.0}):
        ref.reset()
        ref.config = ref.ops.cfg = replace(capped, **caps)
        assert rel_err(ref.prefill(PROMPT), cpp) > 1e-2, f"{caps}: the caps make no difference"


def test_llama3_rope_factors_read_from_the_file(arch_models):
    """rope_freqs.weight holds convert_hf_to_gguf's llama3 divisors; the frequencies every backend
    uses are the base's divided by them."""
    cfg = ModelSpec.open(arch_models["llama3"]).config
    factors = np.asarray(cfg.rope_freq_factors)
    np.testing.assert_array_equal(factors, Llama3Rope(8.0, 1.0, 4.0, 64).factors(cfg.head_dim, LLAMA3_BASE))
    assert factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).sum() == 1  # all three bands
    half = np.arange(cfg.head_dim // 2)
    np.testing.assert_allclose(rope_frequencies(cfg, 1), LLAMA3_BASE ** (-2 * half / cfg.head_dim) / factors)
    assert not ModelSpec.open(arch_models["llama"]).config.rope_freq_factors


def test_llama3_reference_equals_llama_cpp_past_the_original_context(arch_models):
    """Positions 0..82 of a file whose original context is 64: llama.cpp applies rope_freqs as
    freq_factors; the reference must agree at every step."""
    path = arch_models["llama3"]
    ref, cpp = load_backend("numpy", path, max_seq=128), load_backend("llamacpp", path, max_seq=128)
    pairs = [(ref.prefill(LONG_PROMPT), cpp.prefill(LONG_PROMPT))]
    pairs += [(ref.decode(t), cpp.decode(t)) for t in (3, 9, 100)]
    for i, (r, c) in enumerate(pairs):
        assert rel_err(c, r) < 1e-3, f"step {i}"


def test_llama3_reference_equals_transformers_llama3_rope(arch_models):
    """transformers' own rope_type "llama3", computed from the parameters (not from the file's
    factors), on the file's weights: the same logits past the original context."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from backends.transformers_hf import build_hf_model, hf_config

    spec = ModelSpec.open(arch_models["llama3"])
    model = build_hf_model(spec, "f32", "cpu")

    def logits(config):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
        with torch.no_grad():
            return model(input_ids=torch.tensor([LONG_PROMPT])).logits[0, -1].numpy()

    llama3 = hf_config(spec)
    llama3.rope_parameters = llama3_rope(SHAPES["tiny"]).hf_parameters(LLAMA3_BASE)
    ref = load_backend("numpy", spec.path, max_seq=128).prefill(LONG_PROMPT)
    assert rel_err(logits(llama3), ref) < 2e-4
    assert rel_err(logits(hf_config(spec)), ref) > 1e-2, "unscaled RoPE agrees too: the test could not tell"


def _config_with(path, factors=(), **overrides):
    spec = ModelSpec.open(path)
    arch = spec.field("general.architecture")
    field = lambda key, default=None: overrides.get(key.removeprefix(arch + "."), spec.field(key, default))  # noqa: E731
    return read_config(arch, field, spec._positive, 0, factors)


@pytest.mark.parametrize("key,value,message", [
    ("final_logit_softcapping", 30.0, "final_logit_softcapping = 30.0: logit soft-capping is not supported"),
    ("attn_logit_softcapping", 50.0, "attention logit soft-capping is not supported"),
    ("expert_count", 8, "a mixture of experts is not supported"),
    ("rope.scaling.type", "yarn", "rope.scaling.type = 'yarn' is not supported (supported: none, linear)"),
    ("rope.scaling.type", "longrope", "rope.scaling.type = 'longrope' is not supported (supported: none, linear)"),
])
def test_unimplemented_metadata_is_a_clear_error(arch_models, key, value, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config_with(arch_models["gemma3"], **{key: value})


@pytest.mark.parametrize("arch,factors,message", [
    ("qwen2", (1.0,) * 8, "tensor rope_freqs.weight (RoPE frequency factors) is not supported for qwen2"),
    ("llama", (1.0,) * 7, "must hold 8 positive factors (one per rotated pair), got 7 with minimum 1.0"),
    ("llama", (1.0,) * 7 + (0.0,), "got 8 with minimum 0.0"),
])
def test_bad_rope_factors_are_a_clear_error(arch_models, arch, factors, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config_with(arch_models[arch], factors)


def test_linear_rope_scaling_applies_to_global_layers(arch_models):
    cfg = _config_with(arch_models["gemma3"], **{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0})
    assert cfg.rope(5) == (1e6, 0.125) and cfg.rope(0) == (10000.0, 1.0)


def test_windowed_mask():
    from backends.numpy_ref import attention_mask

    m = attention_mask(start=5, t=2, end=7, window=3)  # queries at 5 and 6 see 3 keys each
    assert m.tolist() == [[True, True, True, False, False, False, True],
                          [True, True, True, True, False, False, False]]


def test_unsupported_architecture_is_one_line_exit_2(tmp_path):
    p = write_synthetic(tmp_path / "ds.gguf", "tiny", "f32", architecture="deepseek2")
    r = bench("run", "-f", "numpy", "-m", str(p), "-n", "2", "-r", "1", "-O", str(tmp_path / "o.csv"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "unsupported architecture 'deepseek2' (supported: llama, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3)" in r.stderr


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_synth_arch_cli(tmp_path, arch):
    out = tmp_path / f"{arch}.gguf"
    r = bench("synth", "--arch", arch, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ModelSpec.open(out).config.arch.name == gguf_architecture(arch)
    assert bool(ModelSpec.open(out).config.rope_freq_factors) == (arch == "llama3")
    assert bool(ModelSpec.open(out).config.n_experts) == (arch in MOE_ARCHS)


def test_synthetic_names_take_an_architecture(tmp_path, monkeypatch):
    from engine.model.catalog import resolve_model

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    assert ModelSpec.open(resolve_model("synth:tiny:f32:qwen3")).config.arch.name == "qwen3"
    assert ModelSpec.open(resolve_model("synth:tiny:f32:llama3")).config.rope_freq_factors
