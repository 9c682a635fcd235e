"""Every backend against the numpy reference on tiny synthetic GGUFs the tests write, for every
architecture (llama, llama3, qwen2, qwen3, gemma3)."""

import numpy as np
import pytest

import backends
from conftest import ARCHS, LONG_PROMPT, device_skip, load_backend, rel_err, require_backend, reference_logits
from engine.model.spec import ModelSpec
from engine.generate.engine import GenerationConfig, InferenceEngine

PROMPT = [5, 17, 99, 42, 7, 300, 12, 250]
STEPS = 6
# relative tolerance on logits (max abs diff / max abs reference logit) per compute precision
TOLERANCE = {"f32": 2e-4, "f16": 2e-2, "bf16": 6e-2}


class _F32File:
    file_type = "f32"


def float_cases():
    """(framework, precision) for every float backend and each float precision it runs."""
    return [(name, prec) for name, cls in backends.registry().items() if name not in ("numpy", "llamacpp", "metal")
            for prec in cls.precisions(_F32File()) if prec in TOLERANCE]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,precision", float_cases())
def test_logits_match_reference(arch_models, name, precision, arch):
    require_backend(name)
    path = arch_models[arch]
    ref = reference_logits(path, PROMPT, STEPS)
    b = load_backend(name, path, precision)
    got = [b.prefill(PROMPT)]
    for r in ref[:-1]:
        got.append(b.decode(int(np.argmax(r))))  # follow the reference's tokens
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape and g.dtype == np.float32
        assert rel_err(g, r) < TOLERANCE[precision], f"step {i}: rel err {rel_err(g, r):.2e}"
    b.close()


@pytest.mark.parametrize("name", [n for n, _ in float_cases() if _ == "f32"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
def test_quantized_files_match_reference_on_same_weights(tiny_models, name, qtype):
    require_backend(name)
    path = tiny_models[qtype]
    ref = reference_logits(path, PROMPT, 2)
    b = load_backend(name, path, "f32")
    assert rel_err(b.prefill(PROMPT), ref[0]) < TOLERANCE["f32"]


NATIVE_TOLERANCE = 6e-2  # 8-bit (llama.cpp) or bf16 (torch int4, MLX) activations over the file's own blocks


def native_cases():
    """(framework, qtype) for every backend that declares the file's own type as a precision."""
    return [(name, q) for q in ("q8_0", "q4_0", "q4_1") for name, cls in backends.registry().items()
            if name not in ("numpy", "metal") and q in cls.precisions(type("File", (), {"file_type": q}))]


@pytest.mark.parametrize("name,qtype", native_cases())
def test_the_files_own_quantization_matches_reference(tiny_models, name, qtype):
    """Backends that run a file's blocks natively (precision = the file's type) stay within
    activation-rounding distance of the reference, which runs the same blocks dequantized to f32."""
    require_backend(name)
    path = tiny_models[qtype]
    ref = reference_logits(path, PROMPT, STEPS)
    b = load_backend(name, path, qtype)
    got = [b.prefill(PROMPT)] + [b.decode(int(np.argmax(r))) for r in ref[:-1]]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert rel_err(g, r) < NATIVE_TOLERANCE, f"step {i}: rel err {rel_err(g, r):.2e}"
        assert np.argmax(g) == np.argmax(r), f"step {i}: another greedy token"


def test_torch_int4_unpacks_gguf_blocks_exactly(tiny_models):
    """The nibbles, scales and zeros taken from Q4_0/Q4_1 blocks rebuild the gguf package's own
    dequantization: the int4 path runs the file's weights, not a re-quantization."""
    from engine.model.kquant import affine_groups
    from backends.torch_quant import int4_parts

    for qtype in ("q4_0", "q4_1"):
        spec = ModelSpec.open(tiny_models[qtype])
        name = "blk.0.ffn_up.weight"
        cols, rows = spec.raw_tensor(name).shape
        q, scale, zero = int4_parts(affine_groups(spec.raw_tensor(name).data, qtype, int(rows), int(cols)))
        rebuilt = (q.astype(np.float32) - 8) * np.repeat(scale, 32, axis=1) + np.repeat(zero, 32, axis=1)
        np.testing.assert_allclose(rebuilt, spec.tensor(name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [n for n in backends.names() if n != "metal"])
def test_greedy_tokens_equal_reference(arch_models, name, arch):
    require_backend(name)
    path = arch_models[arch]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    want = InferenceEngine(load_backend("numpy", path)).generate(PROMPT, cfg).tokens
    b = load_backend(name, path, "f32" if name != "llamacpp" else "auto")
    eng = InferenceEngine(b)
    assert eng.generate(PROMPT, cfg).tokens == want
    assert eng.generate(PROMPT, cfg).tokens == want, "a second run after reset differs"


@pytest.mark.parametrize("name", [n for n in backends.names() if n != "metal"])
def test_llama3_rope_past_the_original_context(arch_models, name):
    """Llama 3.x RoPE factors on every backend, at positions past the file's original context (64)."""
    require_backend(name)
    path = arch_models["llama3"]
    ref = load_backend("numpy", path, max_seq=128)
    b = load_backend(name, path, "f32" if name != "llamacpp" else "auto", max_seq=128)
    want = [ref.prefill(LONG_PROMPT)] + [ref.decode(t) for t in (3, 9)]
    got = [b.prefill(LONG_PROMPT)] + [b.decode(t) for t in (3, 9)]
    for i, (g, r) in enumerate(zip(got, want)):
        assert rel_err(g, r) < (1e-3 if name == "llamacpp" else TOLERANCE["f32"]), f"step {i}"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", [n for n in backends.names() if n != "metal"])
def test_incremental_prefill_equals_one_prefill(arch_models, name, arch):
    """Chat appends turns to the KV cache: prefill(a); prefill(b) == prefill(a + b)."""
    require_backend(name)
    b = load_backend(name, arch_models[arch], "f32" if name != "llamacpp" else "auto")
    whole = b.prefill(PROMPT)
    b.reset()
    b.prefill(PROMPT[:3])
    split = b.prefill(PROMPT[3:])
    assert rel_err(split, whole) < 1e-3


def test_context_overflow_is_a_clear_error(tiny_f32):
    from engine.errors import InputError

    b = load_backend("numpy", tiny_f32, max_seq=8)
    with pytest.raises(InputError, match="exceeds the context of 8"):
        b.prefill(list(range(9)))


def _accelerators():
    """(framework, device, why it cannot run here or None) for every accelerator path."""
    import importlib.util

    cases = []
    torch = importlib.util.find_spec("torch") and __import__("torch")
    for name in ("torch", "transformers"):
        for dev, present in (("cuda", torch and torch.cuda.is_available()),
                             ("mps", torch and torch.backends.mps.is_available())):
            cases.append((name, dev, None if present else f"no {dev.upper()} device on this host"))
    mlx_gpu = False
    if importlib.util.find_spec("mlx"):
        from backends.mlx_blas import import_mlx

        mlx_gpu = import_mlx().metal.is_available()
    cases.append(("mlx", "gpu", None if mlx_gpu else "no Metal GPU for MLX on this host"))
    return cases


@pytest.mark.parametrize("name,device,missing", _accelerators())
def test_accelerator_paths_match_reference(tiny_f32, name, device, missing):
    if missing:
        device_skip(missing)
    from backends.base import LoadOptions

    ref = reference_logits(tiny_f32, PROMPT, 2)
    cls = backends.get(name)
    b = cls()
    b.load(ModelSpec.open(tiny_f32), LoadOptions(precision="f32", device=cls.resolve_device(device), max_seq_len=64))
    got = [b.prefill(PROMPT), b.decode(int(np.argmax(ref[0])))]
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-3  # TF32 or fast-math kernels on accelerators: a little looser


@pytest.mark.parametrize("name", ["numpy", "torch", "transformers", "mlx", "tinygrad", "hybrid"])
def test_tied_output_shares_the_embedding(arch_models, name):
    """Gemma's 262k x 640 embedding is the output head too: one float copy, never two."""
    require_backend(name)
    b = load_backend(name, arch_models["gemma3"], "f32")
    if name == "transformers":
        m = b.model
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    else:
        assert b.weights.output is b.weights.tok_embd
