"""Memory that fits: bounded dequantization, each backend's estimate checked before loading (an
`oom` row naming the bytes needed, never a killed process), and the reference streaming its layers
when its f32 copy would not fit."""

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest

import backends
from conftest import bench
from engine.model import dequant
from engine.model.footprint import float_need
from engine.model.spec import ModelSpec
from engine.model.synth import SHAPES, write_synthetic

# one layer and a 65536 x 256 embedding: a tensor of 64 MB of floats, many chunks of the dequantizer
WIDE = SHAPES["tiny"].__class__(1, 256, 4, 2, 512, 65536, 256, 10000.0, 1e-5)
# six layers of 4 MB of floats each beside a small head: room to hold some and stream the rest
DEEP = SHAPES["tiny"].__class__(6, 256, 4, 2, 1024, 512, 256, 10000.0, 1e-5)


@pytest.fixture(scope="module")
def wide_q8(synth_dir):
    return str(write_synthetic(synth_dir / "wide-q8_0.gguf", WIDE, "q8_0", seed=3))


@pytest.fixture(scope="module")
def deep_q4(synth_dir):
    return str(write_synthetic(synth_dir / "deep-q4_0.gguf", DEEP, "q4_0", seed=4))


def _peak_allocated(fn):
    """numpy's allocations are traced: the most held at once while `fn` runs, and its result."""
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_a_tensor_dequantized_in_chunks_equals_the_whole_and_holds_about_its_floats(wide_q8, tiny_models, monkeypatch):
    import gguf

    spec = ModelSpec.open(wide_q8)
    t = spec.raw_tensor("token_embd.weight")
    whole_peak, whole = _peak_allocated(lambda: gguf.quants.dequantize(t.data, t.tensor_type))
    monkeypatch.setattr(dequant, "CHUNK_BYTES", 4 << 20)
    peak, chunked = _peak_allocated(lambda: spec.tensor("token_embd.weight"))
    assert chunked.dtype == np.float32 and np.array_equal(chunked, whole)
    assert chunked.nbytes == 65536 * 256 * 4
    assert whole_peak > 1.8 * chunked.nbytes, "whole, the dequantizer holds every group of rows beside its result"
    assert peak < chunked.nbytes + 4 * (4 << 20), "one chunk's temporaries beside the result"
    for q, path in tiny_models.items():  # every stored type, several chunks each
        monkeypatch.setattr(dequant, "CHUNK_BYTES", 1024)
        s = ModelSpec.open(path)
        for name in ("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"):
            r = s.raw_tensor(name)
            assert np.array_equal(s.tensor(name), gguf.quants.dequantize(r.data, r.tensor_type)), (q, name)


def test_float_estimates_count_the_weights_as_held_and_the_kv_caches(wide_q8):
    spec = ModelSpec.open(wide_q8)
    n = spec.n_params
    f32, bf16 = (float_need(spec, p, positions=100, sequences=2, runtime=0) for p in ("f32", "bf16"))
    assert f32.weights == 4 * n and bf16.weights == 2 * n
    assert f32.kv == 2 * 100 * spec.config.kv_bytes_per_token(4) and bf16.kv == f32.kv // 2
    embd = 65536 * 256 * 4
    assert 0 < f32.transient < bf16.transient, "bf16 converts from an f32 copy; f32 keeps the dequantized array"
    assert bf16.transient >= embd, "the embedding's f32 copy while its bf16 one is made"
    opts = backends.LoadOptions(precision="bf16", max_seq_len=100, max_batch=2)
    torch_need = backends.get("torch").estimate_bytes(spec, opts)
    assert torch_need.weights == bf16.weights and torch_need.runtime > 0
    llama = backends.get("llamacpp").estimate_bytes(spec, backends.LoadOptions(precision="q8_0"))
    assert llama.weights == sum(spec.file_bytes(n) for n in spec.tensor_names) < f32.weights / 3


def _logits(backend, prompt, steps):
    out = [backend.prefill(prompt)]
    for _ in range(steps):
        out.append(backend.decode(int(np.argmax(out[-1]))))
    return np.stack(out)


def test_the_reference_streams_layers_beyond_its_budget_with_the_same_logits(deep_q4):
    spec = ModelSpec.open(deep_q4)
    full = backends.get("numpy").estimate_bytes(spec, backends.LoadOptions(precision="f32", max_seq_len=32))
    layer = full.weights // 7  # the six layers' floats are most of it
    budget = full.total - 2 * layer
    prompt = [(5 * i + 3) % 500 for i in range(12)]

    def run(budget_bytes):
        opened = backends.open_backend("numpy", spec, "f32", max_seq_len=32, memory_budget_bytes=budget_bytes)
        return opened.info, _logits(opened.backend, prompt, 6)

    whole_peak, (whole_info, whole) = _peak_allocated(lambda: run(0))
    streamed_peak, (info, streamed) = _peak_allocated(lambda: run(budget))
    assert "streamed_layers" not in whole_info.details
    assert 0 < info.details["resident_layers"] < 6 and info.details["streamed_layers"] >= 3
    assert np.array_equal(streamed, whole), "the same arithmetic on the same floats"
    assert streamed_peak < whole_peak - 2 * layer, "the streamed layers are never all held"
    need = backends.get("numpy").estimate_bytes(spec, backends.LoadOptions(max_seq_len=32, memory_budget_bytes=budget))
    assert need.total <= budget < full.total


def test_a_mode_beyond_the_limit_is_an_oom_row_naming_its_bytes_and_one_under_it_runs(tiny_f32, tmp_path):
    out = tmp_path / "fit.csv"
    common = ("run", "-f", "torch", "-m", tiny_f32, "-n", "4", "-r", "1", "--warmup", "0", "--no-check", "-O", str(out))
    first = bench(*common, "--memory-limit-mb", "8000")
    assert first.returncode == 0, first.stderr
    ok = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[0])
    assert ok["status"] == "ok" and ok["memory_limit_bytes"] == 8000 * 2**20
    needed = ok["memory_needed_bytes"]
    assert 0.5 * ok["peak_rss_bytes"] < needed < 2 * ok["peak_rss_bytes"], "an estimate of the process's peak"

    for limit_mb in (1, needed // 2**20 - 16):  # far under, and just under the estimate
        r = bench(*common, "--memory-limit-mb", str(limit_mb), "--resume")  # another cell: its limit differs
        assert r.returncode == 1, r.stderr  # a failed cell, as a crash or an error is
        row = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[-1])
        assert row["status"] == "oom" and row["memory_limit_bytes"] == limit_mb * 2**20
        assert row["memory_needed_bytes"] > row["memory_limit_bytes"]
        assert f"beyond the memory limit of {limit_mb} MB" in row["error"] and "torch f32" in row["error"]
        assert "weights" in row["error"] and "KV cache" in row["error"]
    df = pd.read_csv(out)
    assert list(df.status) == ["ok", "oom", "oom"], "nothing already written is lost"
    assert df.memory_needed_bytes.iloc[1] > 2**20


def test_a_mode_beyond_the_hosts_memory_is_refused_before_loading(tiny_f32, monkeypatch):
    from engine.measure import fit
    from engine.measure.cell import Cell
    from engine.measure.runner import LoadedModel

    class Host:
        total, available = 8 << 30, 700 << 20  # a margin of 512 MB leaves ~190 MB beside what is held

    monkeypatch.setattr(fit.psutil, "virtual_memory", lambda: Host)
    spec = ModelSpec.open(tiny_f32)
    cell = Cell(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=4, batch_size=4096)
    with pytest.raises(fit.MemoryShortfall, match="beyond this host's available memory") as e:
        LoadedModel(cell, spec, max_seq_len=256, max_batch=4096)  # 4096 x 256 positions of f32 KV: ~1 GB
    assert e.value.fields["memory_needed_bytes"] > e.value.fields["memory_limit_bytes"] > 0
    loaded = LoadedModel(cell, spec, max_seq_len=8)
    assert loaded.fit.needed_bytes <= loaded.fit.limit_bytes
    loaded.close()


def test_a_streamed_reference_scores_a_window_in_one_pass_as_step_by_step(deep_q4):
    from engine.measure import corpus, fidelity

    spec = ModelSpec.open(deep_q4)
    full = backends.get("numpy").estimate_bytes(spec, backends.LoadOptions(max_seq_len=corpus.WINDOW))
    streamed = backends.open_backend("numpy", spec, max_seq_len=corpus.WINDOW,
                                     memory_budget_bytes=full.total - full.weights // 3).backend
    whole = backends.open_backend("numpy", spec, max_seq_len=corpus.WINDOW).backend
    window = [(11 * i + 7) % 500 for i in range(corpus.WINDOW)]
    assert whole.every_position_logits(window[:-1]) is None, "offered only where it saves passes"
    one_pass = next(fidelity.teacher_forced(streamed, [window])).astype(np.float32)
    stepped = next(fidelity.teacher_forced(whole, [window])).astype(np.float32)
    assert one_pass.shape == stepped.shape == (corpus.SCORED_PER_WINDOW, spec.config.vocab_size)
    # float16 log-probabilities (down to -200 on random weights: an ulp of 0.125 there), sums in another order
    assert np.allclose(one_pass, stepped, rtol=2e-3, atol=2e-2)


def test_a_fidelity_pass_without_room_beside_the_cell_releases_it_first(tiny_f32, tmp_path, monkeypatch):
    """The pass loads the mode again for the corpus windows when the cell's load is shorter; where
    the two would not fit together, the cell's is released (the next cell loads afresh)."""
    from engine.measure import corpus, fidelity_pass, fit
    from engine.measure.cell import Cell
    from engine.measure.runner import LoadedModel

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    cell = Cell(framework="numpy", model=tiny_f32, gen_tokens=4)
    loaded = LoadedModel(cell, ModelSpec.open(tiny_f32), max_seq_len=8)  # shorter than a corpus window
    refusals = []
    real = fit.admit

    def admit_once_released(cls, spec, opts, limit_mb=0):
        if not loaded.released:
            refusals.append(opts.max_seq_len)
            raise fit.MemoryShortfall("no room beside the cell's load", 2, 1)
        return real(cls, spec, opts, limit_mb)

    monkeypatch.setattr(fidelity_pass, "admit", admit_once_released)
    checked = fidelity_pass.run_pass(cell, loaded)
    assert len(refusals) == 1 and refusals[0] >= corpus.WINDOW and loaded.released and loaded.backend is None
    assert checked.fidelity.kld_mean == 0 and checked.match_tokens == 4, "the pass ran on its own load"
