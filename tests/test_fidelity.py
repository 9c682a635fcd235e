"""Fidelity on natural text: llama-perplexity's statistics against hand computation, the
reference exactly 0 / 1 / 0 on itself, a perturbed mode caught, the pass cached per mode, the
corpus long enough for both real models, and the one reference cache serve shares."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import FAULT_ENV, bench
from engine.measure import corpus, fidelity, fidelity_pass, reference
from engine.measure.cell import Cell
from engine.model.catalog import resolve_model
from engine.model.spec import ModelSpec
from engine.model.tokenizer import Tokenizer


def _rows(*probs):
    return fidelity.log_probs16(np.log(np.asarray(probs, dtype=np.float64)))


def test_statistics_equal_hand_computation():
    ref = _rows([0.5, 0.5, 1e-9], [0.9, 0.1, 1e-9], [0.2, 0.8, 1e-9])
    mode = _rows([0.25, 0.75, 1e-9], [0.9, 0.1, 1e-9], [0.4, 0.6, 1e-9])
    kld, same, dp = fidelity.position_stats(ref, mode, [1, 0, 1])
    # KL = sum p ln(p/q); the 1e-9 token has ln p below -16, so llama-perplexity leaves it out
    hand = [0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), 0.0, 0.2 * math.log(0.5) + 0.8 * math.log(0.8 / 0.6)]
    assert kld == pytest.approx(hand, abs=2e-3)
    assert same.tolist() == [False, True, True]  # a tie goes to the first token, as in llama-perplexity
    assert dp == pytest.approx([0.25, 0.0, -0.2], abs=2e-3)
    s = fidelity.summarize(kld, same, dp)
    assert s.kld_mean == pytest.approx(sum(hand) / 3, abs=2e-3)
    top, second = sorted(hand)[2], sorted(hand)[1]
    assert s.kld_p99 == pytest.approx(second + 0.98 * (top - second), abs=2e-3)  # at 0.99 x (n - 1) = 1.98
    assert s.same_top_p == pytest.approx(2 / 3) and s.same_top_p_err == pytest.approx(math.sqrt(2 / 9 / 2))
    assert s.rms_dp == pytest.approx(math.sqrt((0.25**2 + 0.2**2) / 3), abs=2e-3)
    assert s.positions == 3


def test_a_token_below_the_floor_is_left_out_of_the_kld():
    ref = np.array([[0.0, -20.0]], dtype=np.float16)
    mode = np.array([[-0.1, -2.0]], dtype=np.float16)
    kld, _, _ = fidelity.position_stats(ref, mode, [0])
    assert kld[0] == pytest.approx(0.1, abs=1e-3)  # only the kept token: 1 x (0 - (-0.1))


@pytest.mark.parametrize("model", ["default", "gemma3-270m"])
def test_the_corpus_gives_every_real_model_its_positions(model):
    spec = ModelSpec.open(resolve_model(model))
    windows = corpus.windows(spec)
    assert len(windows) == corpus.N_WINDOWS and all(len(w) == corpus.WINDOW for w in windows)
    assert corpus.POSITIONS >= 512
    starts = [w[1:9] for w in windows]
    assert len(set(starts)) == len(windows), "windows must not repeat text"
    ids = Tokenizer.from_spec(spec).encode(corpus.corpus_text(), add_bos=False)
    assert len(ids) >= corpus.N_WINDOWS * corpus.WINDOW
    assert list(windows[-1][1:]) == ids[-corpus.WINDOW + 1:], "the windows reach the end (the code and prose)"


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.csv"
    env = {**FAULT_ENV, "BENCH_CACHE_DIR": str(tmp_path / "cache")}
    r = bench("run", *args, "-n", "6", "-O", str(out), env=env)
    assert r.returncode == 0, r.stderr
    return pd.read_csv(out), [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]


def test_reference_is_exact_on_itself_and_a_noisy_mode_is_not(tiny_f32, tmp_path):
    ref, ref_jsonl = _run(tmp_path, "ref", "-f", "numpy", "-m", tiny_f32, "-r", "2")
    assert (ref.kld_mean == 0).all() and (ref.kld_p99 == 0).all() and (ref.rms_dp == 0).all()
    assert (ref.same_top_p == 1).all() and (ref.same_top_p_err == 0).all() and (ref.match_tokens == 6).all()
    assert all(x["same_top_p"] == 1 and isinstance(x["fidelity_s"], float) for x in ref_jsonl)
    noisy, _ = _run(tmp_path, "noisy", "-f", "faulty", "-o", "fault=noise", "-m", tiny_f32, "-r", "2")
    assert (noisy.kld_mean > 0.05).all() and (noisy.same_top_p < 1).all() and (noisy.rms_dp > 0).all()
    assert (noisy.kld_p99 > noisy.kld_mean).all() and (noisy.same_top_p_err > 0).all()
    both = pd.concat([ref, noisy])
    assert (both.fidelity_positions == corpus.POSITIONS).all()
    assert (both.kl_vs_reference == both.kld_mean).all() and (both.top1_agreement == both.same_top_p).all()


def test_no_check_runs_no_fidelity_pass_and_keeps_the_cell_id(tiny_f32, tmp_path):
    """--no-check is speed only: no pass (nothing cached, nothing computed), empty fidelity columns,
    no `best` decided on them; the same cell checked later is the same cell."""
    fast, fast_jsonl = _run(tmp_path, "fast", "-f", "numpy", "-m", tiny_f32, "-r", "1", "--no-check")
    assert fast.kld_mean.isna().all() and fast.same_top_p.isna().all() and (fast.match_tokens == -1).all()
    assert fast_jsonl[0]["kld_mean"] is None and fast_jsonl[0]["fidelity_s"] == 0.0
    assert not list((tmp_path / "cache").glob("fidelity/*.json")) and not list((tmp_path / "cache").glob("reference/*.npy"))
    checked, _ = _run(tmp_path, "checked", "-f", "numpy", "-m", tiny_f32, "-r", "1")
    assert (checked.kld_mean == 0).all() and (checked.cell_id == fast.cell_id.iloc[0]).all()


def _loaded(path):
    from engine.measure.runner import LoadedModel

    cell = Cell(framework="numpy", model=path, gen_tokens=4)
    spec = ModelSpec.open(path)
    return cell, LoadedModel(cell, spec, max_seq_len=corpus.WINDOW)


def test_the_pass_is_computed_once_per_mode(tiny_f32, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    calls = []
    real = fidelity.teacher_forced
    monkeypatch.setattr(fidelity, "teacher_forced", lambda b, w: calls.append(1) or real(b, w))
    cell, loaded = _loaded(tiny_f32)
    first = fidelity_pass.run_pass(cell, loaded)
    assert calls == [1] and first.fidelity.kld_mean == 0 and first.match_tokens == 4
    second = fidelity_pass.run_pass(cell, loaded)
    assert calls == [1], "the second pass must read the cache"
    assert second.fidelity == first.fidelity and second.match_tokens == 4
    assert reference.distributions(tiny_f32).shape == (corpus.POSITIONS, loaded.spec.config.vocab_size)
    assert reference.distributions(tiny_f32).dtype == np.float16
    loaded.close()


def test_the_caches_follow_the_file_content_not_its_path(tiny_f32, tmp_path, monkeypatch):
    """A fresh clone's environment holds the same model bytes at a new path (and mtime): its
    passes and reference answers are found; a file whose bytes differ is computed afresh."""
    import shutil

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = fidelity.teacher_forced
    monkeypatch.setattr(fidelity, "teacher_forced", lambda b, w: calls.append(1) or real(b, w))
    prompt = [5, 9, 12, 40]
    cell, loaded = _loaded(tiny_f32)
    first = fidelity_pass.run_pass(cell, loaded)
    tokens = reference.greedy_tokens(tiny_f32, prompt, 5, lambda: loaded.backend)
    loaded.close()
    moved = tmp_path / "clone" / "model.gguf"
    moved.parent.mkdir()
    shutil.copyfile(tiny_f32, moved)  # a new path and a new mtime
    cell, loaded = _loaded(str(moved))
    assert fidelity_pass.run_pass(cell, loaded).fidelity == first.fidelity and calls == [1]
    assert reference.greedy_tokens(str(moved), prompt, 5) == tokens
    loaded.close()
    changed = bytearray(moved.read_bytes())
    changed[-1] ^= 1  # the last byte of the last tensor's data
    moved.write_bytes(bytes(changed))
    assert reference.greedy_tokens(str(moved), prompt, 5) is None, "other bytes must not match"


def test_a_mode_measured_before_any_reference_is_computed_later(tiny_f32, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    cell, loaded = _loaded(tiny_f32)
    monkeypatch.setattr(type(loaded.backend), "is_reference", False)
    early = fidelity_pass.run_pass(cell, loaded)
    assert math.isnan(early.fidelity.kld_mean) and early.match_tokens == -1
    monkeypatch.undo()
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    fidelity_pass.run_pass(cell, loaded)  # the reference itself saves what modes compare with
    later = fidelity_pass.run_pass(cell, loaded)
    assert later.fidelity.kld_mean == 0 and later.match_tokens == 4
    loaded.close()


def test_a_batch_that_breaks_a_sequence_is_flagged(tiny_f32, tmp_path):
    _, jsonl = _run(tmp_path, "b", "-f", "faulty", "-o", "fault=break_batch", "-m", tiny_f32, "-b", "1", "-b", "2")
    rows = {x["batch_size"]: x for x in jsonl}
    assert rows[1]["batch_match_tokens"] == [6] and "batch_diverged" not in rows[1]["flags"]
    assert rows[2]["batch_match_tokens"][0] == 6 and rows[2]["batch_match_tokens"][1] < 6
    assert "batch_diverged" in rows[2]["flags"]
    assert rows[1]["match_tokens"] == 6 and "diverged" not in rows[1]["flags"]  # one sequence: text check passes


def test_serve_reference_reads_the_shared_cache(tiny_f32, tmp_path, monkeypatch):
    from engine.serve.reference import Reference

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    spec = ModelSpec.open(tiny_f32)
    prompt = [5, 9, 12, 40]
    tokens = Reference(spec, 5, len(prompt)).tokens(prompt)
    assert len(tokens) == 5 and reference.greedy_tokens(tiny_f32, prompt, 5) == tokens
    again = Reference(spec, 5, len(prompt))
    assert again.tokens(prompt) == tokens and again.backend is None, "a cached answer must not load the reference"


def test_leading_matches():
    assert reference.leading_matches([1, 2, 3], [1, 2, 4]) == 2
    assert reference.leading_matches([1, 2], [1, 2, 3]) == 2 and reference.leading_matches([], [1]) == 0
