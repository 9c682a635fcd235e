import numpy as np
import pytest

from engine.errors import ModelError
from engine.model.spec import ModelSpec, unpermute_rope_rows
from engine.model.synth import SHAPES, write_synthetic


def test_default_model_config(default_spec):
    c = default_spec.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.head_dim == 64 and c.rope_base == 100000.0 and c.context_length == 8192
    assert abs(c.rms_eps - 1e-5) < 1e-9
    assert default_spec.file_type == "q4_1" and default_spec.tied_embeddings
    assert default_spec.tensor_type("token_embd.weight") == "q8_0"


def test_unpermute_inverts_the_converters_permute():
    rng = np.random.default_rng(0)
    n_heads, hd, cols = 3, 8, 5
    w = rng.standard_normal((n_heads * hd, cols))
    # convert_hf_to_gguf.py's permute
    permuted = w.reshape(n_heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rope_rows(permuted, n_heads), w)


@pytest.mark.parametrize("qtype,tol", [("f32", 0), ("f16", 1e-3), ("q8_0", 2e-2), ("q4_0", 0.2), ("q4_1", 0.2)])
def test_dequantized_weights_match_the_written_ones(tiny_models, tiny_f32, qtype, tol):
    exact = ModelSpec.open(tiny_f32).tensor("blk.0.ffn_up.weight")
    got = ModelSpec.open(tiny_models[qtype]).tensor("blk.0.ffn_up.weight")
    assert got.dtype == np.float32 and got.shape == exact.shape == (128, 64)
    rel = np.abs(got - exact).max() / np.abs(exact).max()
    assert rel <= tol + 1e-7


def test_load_weights_converts_each_tensor_once_and_ties_output(tiny_f32):
    spec = ModelSpec.open(tiny_f32)
    seen = []
    w = spec.load_weights(lambda a: seen.append(a.shape) or a)
    assert w.output is w.tok_embd
    assert len(seen) == 2 + 9 * spec.config.n_layers


def test_untied_output(synth_dir):
    path = write_synthetic(synth_dir / "untied.gguf", "tiny", "f32", tied=False)
    spec = ModelSpec.open(path)
    assert not spec.tied_embeddings
    w = spec.load_weights(lambda a: a)
    assert w.output is not w.tok_embd and w.output.shape == (SHAPES["tiny"].vocab_size, 64)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        ModelSpec.open(tmp_path / "nope.gguf")


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        ModelSpec.open(p)


def test_truncated_file(tmp_path, tiny_f32):
    data = open(tiny_f32, "rb").read()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated|not a readable"):
        ModelSpec.open(p)


def test_unsupported_architecture(tmp_path):
    p = write_synthetic(tmp_path / "gpt2.gguf", "tiny", "f32", architecture="gpt2")
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        ModelSpec.open(p)
