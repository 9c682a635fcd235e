import numpy as np
import pytest

from engine.errors import ModelError
from engine.model.spec import ModelSpec, unpermute_rope_rows
from engine.model.synth import SHAPES, write_synthetic

from conftest import ARCHS, MOE_ARCHS, same_as_ggufs_reader


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


@pytest.mark.parametrize("which", ["f16", "q8_0", "q4_0", "q4_1", *ARCHS, *MOE_ARCHS])
def test_the_header_reader_reads_what_ggufs_reader_reads(tiny_models, arch_models, which):
    same_as_ggufs_reader(tiny_models.get(which) or arch_models[which])


def test_the_header_reader_reads_the_default_model_as_ggufs_reader(default_model):
    same_as_ggufs_reader(default_model)  # 49k tokens and merges; Gemma's 262k: tests/test_gemma.py


@pytest.mark.parametrize("cut,message", [(4, "truncated header"), (0, "GGUF magic invalid")])
def test_a_broken_header_is_one_line(tmp_path, tiny_f32, cut, message):
    data = open(tiny_f32, "rb").read()
    p = tmp_path / "broken.gguf"
    p.write_bytes(data[:cut + 200] if cut else b"GGUX" + data[4:])
    with pytest.raises(ModelError, match=f"not a readable GGUF file \\({message}"):
        ModelSpec.open(p)


def test_a_duplicate_metadata_key_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "dup.gguf"), "llama")
    w.add_uint32("llama.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray((tmp_path / "dup.gguf").read_bytes())
    # the writer refuses duplicates itself: repeat the last key/value by hand, counting it in the header
    start = data.rindex(b"llama.block_count") - 8  # its length prefix
    data += data[start:]
    data[16:24] = (int.from_bytes(data[16:24], "little") + 1).to_bytes(8, "little")
    (tmp_path / "dup.gguf").write_bytes(data)
    with pytest.raises(ModelError, match="duplicate metadata key llama.block_count"):
        ModelSpec.open(tmp_path / "dup.gguf")
