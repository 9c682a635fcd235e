"""Batched generation: B sequences prefilled together and decoded in lockstep give, per sequence,
the logits and greedy tokens the same backend gives that sequence alone, for every backend and
architecture on tiny synthetic files."""

import numpy as np
import pytest

import backends
from conftest import ARCHS, load_backend, rel_err, require_backend
from engine.errors import InputError, UnavailableError
from engine.generate.engine import GenerationConfig, InferenceEngine

PROMPTS = [[5, 17, 99, 42, 7, 300, 12, 250], [9, 8, 7, 6, 5, 4, 3, 2], [1, 200, 30, 40, 11, 12, 13, 14]]
STEPS = 5
BATCHED = [n for n, cls in backends.registry().items() if cls.batched and n != "metal"]


def _precision(name):
    return "auto" if name == "llamacpp" else "f32"


def _unbatched(b, prompt, feed):
    b.reset()
    out = [b.prefill(prompt)]
    out += [b.decode(t) for t in feed]
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", BATCHED)
def test_batched_logits_equal_unbatched_per_sequence(arch_models, name, arch):
    require_backend(name)
    b = load_backend(name, arch_models[arch], _precision(name), max_batch=len(PROMPTS))
    _assert_batched_equals_alone(b)
    b.close()


def _batched_and_alone(b, prompts=PROMPTS, steps=STEPS):
    """Per step, the batch's logits and each sequence's logits alone, over the same token streams."""
    feeds = [[(5 * s + 2 * i) % 250 + 1 for i in range(steps)] for s in range(len(prompts))]
    alone = [_unbatched(b, p, f) for p, f in zip(prompts, feeds)]
    b.reset()
    batched = [b.prefill_batch(prompts)] + [b.decode_batch([f[i] for f in feeds]) for i in range(steps)]
    return batched, [[seq[step] for seq in alone] for step in range(steps + 1)]


def _assert_batched_equals_alone(b, tolerance=1e-3):
    for step, (batch, alone) in enumerate(zip(*_batched_and_alone(b))):
        assert batch.shape == (len(PROMPTS), alone[0].shape[0]) and batch.dtype == np.float32
        for s, logits in enumerate(alone):
            assert rel_err(batch[s], logits) < tolerance, f"step {step} sequence {s}: {rel_err(batch[s], logits):.2e}"


@pytest.mark.parametrize("name", BATCHED)
def test_batched_greedy_tokens_equal_each_sequence_alone(arch_models, name):
    require_backend(name)
    b = load_backend(name, arch_models["llama"], _precision(name), max_batch=len(PROMPTS))
    eng, cfg = InferenceEngine(b), GenerationConfig(max_new_tokens=10, ignore_eos=True)
    alone = [eng.generate(p, cfg).tokens for p in PROMPTS]
    gen = eng.generate_batch(PROMPTS, cfg)
    assert gen.sequences == alone
    assert gen.batch_size == 3 and len(gen.itl_ns) == 9 and gen.decode_tokens == 27
    assert eng.generate(PROMPTS[1], cfg).tokens == alone[1], "a single sequence after a batch differs"
    b.close()


def test_batch_beyond_what_was_loaded_is_a_clear_error(tiny_f32):
    b = load_backend("numpy", tiny_f32, max_batch=2)
    with pytest.raises(InputError, match="batch of 3 sequences exceeds the 2 this model was loaded for"):
        b.prefill_batch(PROMPTS)
    with pytest.raises(InputError, match="must have one length"):
        b.prefill_batch([[1, 2], [3]])
    b.prefill_batch(PROMPTS[:2])
    with pytest.raises(InputError, match="batch of 1 sequences appended to a batch of 2"):
        b.decode_batch([4])


def test_a_backend_that_cannot_batch_says_so(tiny_f32):
    from backends.base import Backend

    class OneAtATime(Backend):
        name = "one"

        def load(self, spec, opts): ...
        def prefill(self, tokens): return np.zeros(4, np.float32)
        def decode(self, token): return np.zeros(4, np.float32)
        def reset(self): ...

    b = OneAtATime()
    assert b.prefill_batch([[1, 2]]).shape == (1, 4)  # a batch of one is a plain sequence
    with pytest.raises(UnavailableError, match="framework one cannot decode a batch of 2 sequences"):
        b.prefill_batch([[1], [2]])


# mlx, transformers

def test_mlx_native_q4_1_batched_equals_unbatched(tiny_models):
    require_backend("mlx")
    b = load_backend("mlx", tiny_models["q4_1"], "q4_1", max_batch=len(PROMPTS))
    _assert_batched_equals_alone(b)
    b.close()


def test_transformers_bf16_batched_equals_unbatched(tiny_f32):
    require_backend("transformers")
    b = load_backend("transformers", tiny_f32, "bf16", max_batch=len(PROMPTS))
    _assert_batched_equals_alone(b)
    b.close()


# llama.cpp


def _llamacpp(path, max_batch, max_seq=64):
    require_backend("llamacpp")
    return load_backend("llamacpp", path, max_seq=max_seq, max_batch=max_batch)


def test_llamacpp_decodes_a_batch_in_one_call_and_chunks_a_long_prefill(arch_models):
    """A step of B sequences is one llama_decode; a batched prefill past the tokens one call
    holds (n_batch) goes in chunks of whole positions, and still equals each sequence alone."""
    b = _llamacpp(arch_models["llama"], max_batch=4, max_seq=200)
    calls = []
    decode = b._ctx.decode
    b._ctx.decode = lambda batch: calls.append(batch.n_tokens()) or decode(batch)
    prompts = [[(31 * s + 7 * i) % 250 + 1 for i in range(150)] for s in range(4)]
    alone = [_unbatched(b, p, [3])[-1] for p in prompts]
    b.reset()
    calls.clear()
    b.prefill_batch(prompts)
    assert len(calls) == 2 and max(calls) <= b.n_batch  # 4 x 150 tokens, n_batch 512
    calls.clear()
    logits = b.decode_batch([3] * 4)
    assert calls == [4]
    for s in range(4):
        assert rel_err(logits[s], alone[s]) < 1e-3
    b.close()


def test_llamacpp_batch_size_may_change_after_reset(arch_models):
    b = _llamacpp(arch_models["qwen2"], max_batch=3)
    alone = [_unbatched(b, p, [])[0] for p in PROMPTS]
    b.reset()
    three = b.prefill_batch(PROMPTS)
    b.reset()
    two = b.prefill_batch(PROMPTS[1:])
    for s in range(3):
        assert rel_err(three[s], alone[s]) < 1e-3
    for s in range(2):
        assert rel_err(two[s], alone[s + 1]) < 1e-3
    b.close()


def test_llamacpp_bounds_are_the_requested_ones(tiny_f32):
    """llama.cpp pads each sequence's KV cells (to 256): the context is still max_seq_len."""
    b = _llamacpp(tiny_f32, max_batch=2, max_seq=8)
    with pytest.raises(InputError, match="batch of 3 sequences exceeds the 2 this model was loaded for"):
        b.prefill_batch(PROMPTS)
    with pytest.raises(InputError, match="exceeds the context of 8"):
        b.prefill_batch([list(range(9))] * 2)
    b.prefill_batch([p[:6] for p in PROMPTS[:2]])
    with pytest.raises(InputError, match="exceeds the context of 8"):
        b.prefill_batch([[1, 2, 3]] * 2)
    b.close()


# torch, tinygrad, hybrid

@pytest.mark.parametrize("file,precision,tolerance", [("q4_1", "q4_1", 1e-3), ("f32", "bf16", 3e-2)])
def test_torch_batched_equals_unbatched_per_sequence(tiny_models, file, precision, tolerance):
    """The int4 kernel takes every sequence's rows in one call; a bf16 batch runs F.linear where
    one sequence runs torch.mv, so bf16 rounding may separate them."""
    require_backend("torch")
    _assert_batched_equals_alone(load_backend("torch", tiny_models[file], precision, max_batch=3), tolerance)


def test_torch_decode_reads_each_weight_once_for_the_batch(tiny_f32):
    """Not a loop over sequences: a batch's decode step makes the linear calls one sequence
    makes, each on B rows."""
    require_backend("torch")
    b = load_backend("torch", tiny_f32, "f32", max_batch=3)
    shapes, linear = [], b.ops.linear
    b.ops.linear = lambda x, w: shapes.append(tuple(x.shape[:-1])) or linear(x, w)
    for batch in (1, 3):
        b.reset()
        b.prefill_batch(PROMPTS[:batch])
        shapes.clear()
        b.decode_batch([4] * batch)
        assert shapes == [(batch, 1)] * (len(b.weights.layers) * 4) + [(batch,)]  # qkv, wo, gate_up, down; head


def test_torch_compiled_decode_batches(tiny_f32):
    """torch.compile (dynamic=False) captures one decode graph per batch size."""
    require_backend("torch")
    b = load_backend("torch", tiny_f32, "f32", max_batch=3, compile=True)
    batch, alone = _batched_and_alone(b, steps=2)
    for step, (got, want) in enumerate(zip(batch, alone)):
        assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-3, f"step {step}"


def _replayed_decode_counts(b, batch):
    """tinygrad's (kernels, bytes) of one replayed decode step of a batch."""
    from tinygrad.helpers import GlobalCounters

    b.reset()
    b.prefill_batch(PROMPTS[:batch])
    for token in range(3):  # capture, then replay
        b.decode_batch([token + 1] * batch)
    GlobalCounters.reset()
    b.decode_batch([9] * batch)
    return GlobalCounters.kernel_count, GlobalCounters.global_mem


@pytest.mark.parametrize("name", ["tinygrad", "hybrid"])
def test_tinygrad_decode_of_a_batch_runs_the_kernels_of_one_sequence(tiny_f32, name):
    """One graph per batch size, not a loop over sequences; the jits are keyed by batch size."""
    require_backend(name)
    b = load_backend(name, tiny_f32, "f32", max_batch=3)
    (kernels_1, _), (kernels_3, _) = _replayed_decode_counts(b, 1), _replayed_decode_counts(b, 3)
    assert kernels_3 <= kernels_1 + 2
    jits = b._decode.jits if name == "tinygrad" else b.segments[0].decode.jits
    assert sorted(jits) == [1, 3]


def test_tinygrad_decode_embeds_rows_not_the_table(tiny_f32):
    """Each sequence's symbolic token id reads its embedding row: an extra sequence costs far less
    than reading the table."""
    require_backend("tinygrad")
    b = load_backend("tinygrad", tiny_f32, "f32", max_batch=3)
    (_, bytes_1), (_, bytes_3) = _replayed_decode_counts(b, 1), _replayed_decode_counts(b, 3)
    assert (bytes_3 - bytes_1) / 2 < b.weights.tok_embd.nbytes() / 2


@pytest.mark.parametrize("name", ["torch", "tinygrad", "hybrid"])
def test_appending_to_a_batch_equals_each_sequence_alone(arch_models, name):
    """prefill_batch after a batch appends a chunk to each sequence (chat turns): positions > 0, T > 1."""
    require_backend(name)
    b = load_backend(name, arch_models["gemma3"], "f32", max_batch=3)
    chunks = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    alone = []
    for prompt, chunk in zip(PROMPTS, chunks):
        b.reset()
        b.prefill(prompt)
        alone.append([b.prefill(chunk), b.decode(7)])
    b.reset()
    b.prefill_batch(PROMPTS)
    batched = [b.prefill_batch(chunks), b.decode_batch([7] * 3)]
    for step, logits in enumerate(batched):
        for s in range(3):
            assert rel_err(logits[s], alone[s][step]) < 1e-3, f"step {step} sequence {s}"
