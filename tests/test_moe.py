"""Mixture of experts (qwen3moe, and llama with experts as Mixtral files have them): the router's
softmax, top-k, renormalised weights, stacked experts. The reference against llama.cpp and
transformers, every backend against the reference, batches against single sequences."""

import numpy as np
import pytest

import backends
from conftest import MOE_ARCHS, bench, load_backend, rel_err
from engine.model.footprint import float_bytes
from engine.model.spec import ModelSpec

PROMPT = [5, 17, 99, 42, 7, 300, 12, 250, 33, 44]
RUNS_MOE = ("torch", "transformers", "hybrid", "mlx", "tinygrad", "llamacpp")  # besides the numpy reference


def test_experts_read_from_metadata(arch_models):
    q, m = (ModelSpec.open(arch_models[a]) for a in MOE_ARCHS)
    assert (q.config.n_experts, q.config.n_experts_used, q.config.expert_ffn_dim) == (4, 2, 32)
    assert (m.config.n_experts, m.config.n_experts_used, m.config.expert_ffn_dim) == (4, 2, m.config.ffn_dim)
    layer = q.load_weights(lambda a: a).layers[0]
    assert layer.w_gate is None and layer.router.shape == (4, q.config.dim)
    assert layer.gate_exps.shape == (4, 32, q.config.dim) and layer.down_exps.shape == (4, q.config.dim, 32)
    assert q.config.arch.qk_norm and m.config.arch.permuted_qk


def test_decode_reads_only_the_routed_experts(arch_models):
    """bytes_per_token counts 2 of the 4 experts' bytes, every other tensor whole."""
    spec = ModelSpec.open(arch_models["qwen3moe"])
    experts = sum(spec.file_bytes(n) for n in spec.tensor_names if n.endswith("_exps.weight"))
    dense = spec.decode_read_bytes(lambda n: 0 if n.endswith("_exps.weight") else spec.file_bytes(n))
    assert spec.decode_read_bytes(spec.file_bytes) == dense + experts // 2


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_reference_equals_llama_cpp(arch_models, arch):
    ref, cpp = load_backend("numpy", arch_models[arch]), load_backend("llamacpp", arch_models[arch])
    pairs = [(ref.prefill(PROMPT), cpp.prefill(PROMPT))] + [(ref.decode(t), cpp.decode(t)) for t in (3, 9, 100)]
    for i, (r, c) in enumerate(pairs):
        assert rel_err(c, r) < 1e-3, f"step {i}"


def test_routing_picks_and_renormalises(arch_models):
    """One token through the op against the definition written out: top-2 of the softmax,
    weights summing to 1 (as llama.cpp's norm_w and transformers' norm_topk_prob)."""
    ref = load_backend("numpy", arch_models["qwen3moe"])
    layer = ref.weights.layers[1]
    x = np.random.default_rng(3).standard_normal((1, 1, ref.config.dim)).astype(np.float32)
    logits = layer.router @ x[0, 0]
    top = np.argsort(-logits)[:2]
    w = np.exp(logits[top] - logits[top].max())
    w /= w.sum()
    silu = lambda g: g / (1 + np.exp(-g))  # noqa: E731
    want = sum(wi * layer.down_exps[e] @ (silu(layer.gate_exps[e] @ x[0, 0]) * (layer.up_exps[e] @ x[0, 0]))
               for wi, e in zip(w, top))
    np.testing.assert_allclose(ref.ops.moe(x, layer)[0, 0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,name", [(a, n) for a in MOE_ARCHS for n in RUNS_MOE[:5]])
def test_backends_match_reference(arch_models, arch, name):
    """torch (eager: expert by expert), transformers' Qwen3MoeForCausalLM and MixtralForCausalLM,
    hybrid (its blocks run tinygrad's op on torch's buffers), MLX (gather_mm over the stacked experts), tinygrad
    (every expert, the unrouted ones weighted 0)."""
    path = arch_models[arch]
    ref, b = load_backend("numpy", path), load_backend(name, path, "f32")
    pairs = [(b.prefill(PROMPT), ref.prefill(PROMPT))] + [(b.decode(t), ref.decode(t)) for t in (3, 9, 100)]
    for i, (g, r) in enumerate(pairs):
        assert rel_err(g, r) < 2e-4, f"step {i}"


def test_compiled_torch_gathers_experts_and_matches_reference(arch_models):
    """A compiled decode step gathers each token's experts (static shapes, one graph) where eager
    torch loops over the experts in use: both follow the reference."""
    path = arch_models["qwen3moe"]
    ref, b = load_backend("numpy", path), load_backend("torch", path, "f32", compile=True)
    pairs = [(b.prefill(PROMPT), ref.prefill(PROMPT))] + [(b.decode(t), ref.decode(t)) for t in (3, 9)]
    for i, (g, r) in enumerate(pairs):
        assert rel_err(g, r) < 2e-4, f"step {i}"


@pytest.mark.parametrize("name", ["numpy", "torch", "mlx", "tinygrad", "llamacpp"])
def test_batched_logits_equal_unbatched(arch_models, name):
    """Each sequence of a batch is routed on its own: batched prefill and decode = one at a time."""
    path = arch_models["qwen3moe"]
    prompts = [PROMPT, PROMPT[::-1], [t + 1 for t in PROMPT]]
    b = load_backend(name, path, max_batch=3)
    batched = [b.prefill_batch(prompts), b.decode_batch([3, 9, 100])]
    for s, p in enumerate(prompts):
        one = load_backend(name, path)
        alone = [one.prefill(p), one.decode([3, 9, 100][s])]
        for step in range(2):
            assert rel_err(batched[step][s], alone[step]) < 1e-4, f"sequence {s}, step {step}"


@pytest.mark.parametrize("name", ["tinygrad", "hybrid"])
def test_tinygrad_blocks_count_every_expert_they_read(arch_models, name):
    """tinygrad's op computes all experts each step (and so do hybrid's blocks, which run it):
    bytes_per_token counts them all, and says so."""
    spec = ModelSpec.open(arch_models["qwen3moe"])
    b = backends.open_backend(name, spec, "f32", max_seq_len=64)
    f32 = float_bytes(spec, "f32")
    assert b.info.decode_bytes == spec.decode_read_bytes(f32, every_expert=True) > spec.decode_read_bytes(f32)
    assert b.info.details["experts_read"] == "all"
    if name == "hybrid":
        assert b.info.details["fallback_blocks"] == 0
        assert sorted(b.backend.tiny_layers) == list(range(spec.config.n_layers))


def test_every_expert_counted_in_the_layers_named(arch_models):
    """A backend reading every expert in some layers only (hybrid with blocks fallen back to torch):
    those layers' experts whole, the others' routed share."""
    spec = ModelSpec.open(arch_models["qwen3moe"])
    experts = lambda i: sum(spec.file_bytes(n) for n in spec.tensor_names  # noqa: E731
                            if n.startswith(f"blk.{i}.") and n.endswith("_exps.weight"))
    routed = spec.decode_read_bytes(spec.file_bytes)
    assert spec.decode_read_bytes(spec.file_bytes, every_expert=[0]) == routed + experts(0) - experts(0) // 2
    assert spec.decode_read_bytes(spec.file_bytes, every_expert=range(spec.config.n_layers)) == \
        spec.decode_read_bytes(spec.file_bytes, every_expert=True)
    info = backends.base.float_load_info(spec, "f32", "cpu", every_expert=[0])
    assert info.details["experts_read"] == f"all in 1 of {spec.config.n_layers} layers"


def test_moe_run_writes_a_row_per_backend(arch_models, tmp_path):
    """`bench run` on an MoE file: numpy and tinygrad each measure it, tinygrad's row counting every expert."""
    import json

    out = tmp_path / "moe.csv"  # the JSONL beside it holds the typed rows
    r = bench("run", "-f", "numpy", "-f", "tinygrad", "-m", arch_models["qwen3moe"], "-n", "2", "-r", "1",
              "-O", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {row["framework"]: row for row in map(json.loads, out.with_suffix(".jsonl").open())}
    assert rows["numpy"]["status"] == rows["tinygrad"]["status"] == "ok"
    assert rows["tinygrad"]["bytes_per_token"] > rows["numpy"]["bytes_per_token"]
    assert rows["tinygrad"]["extra"]["experts_read"] == "all"
