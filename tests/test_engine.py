"""The generate loop, the sampler, the memory tracker and the results writer."""

import csv
import json

import numpy as np
import pytest

from conftest import load_backend
from engine.generate.engine import GenerationConfig, InferenceEngine
from engine.errors import InputError
from engine.measure.memory import ProcessSampler
from engine.results.rows import BenchmarkResult, csv_record
from engine.results.writers import ResultWriter, read_jsonl
from engine.generate.sampling import Sampler
from engine.measure.stats import summarize

PROMPT = [5, 17, 99, 42]


def test_greedy_is_argmax_with_first_index_on_ties():
    assert Sampler()(np.array([0.0, 3.0, 3.0, 1.0], np.float32)) == 1


def test_seeded_sampling_repeats_and_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s1, s2 = Sampler(temperature=1.0, seed=7), Sampler(temperature=1.0, seed=7)
    assert [s1(logits) for _ in range(50)] == [s2(logits) for _ in range(50)]
    top2 = Sampler(temperature=1.0, top_k=2, seed=1)
    assert {top2(logits) for _ in range(200)} == {0, 1}
    nucleus = Sampler(temperature=1.0, top_p=0.7, seed=1)  # 0.5 + 0.3 reaches 0.7
    assert {nucleus(logits) for _ in range(200)} == {0, 1}
    counts = np.bincount([Sampler(temperature=1.0, seed=i)(logits) for i in range(2000)], minlength=4) / 2000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


@pytest.mark.parametrize("kw,msg", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                    ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k")])
def test_generation_config_validates(kw, msg):
    with pytest.raises(InputError, match=msg):
        GenerationConfig(**kw)


def test_stream_yields_every_token_with_monotonic_times(tiny_f32):
    eng = InferenceEngine(load_backend("numpy", tiny_f32))
    events = list(eng.stream(PROMPT, GenerationConfig(max_new_tokens=6, ignore_eos=True)))
    assert [e.index for e in events] == list(range(6))
    assert all(e.dt_ns > 0 for e in events)
    assert all(a.t_ns < b.t_ns for a, b in zip(events, events[1:]))
    gen = eng.generate(PROMPT, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert gen.tokens == [e.token for e in events] and len(gen.itl_ns) == 5
    assert gen.total_ns == gen.ttft_ns + sum(gen.itl_ns)


def test_stop_ids_end_the_stream_unless_ignored(tiny_f32):
    eng = InferenceEngine(load_backend("numpy", tiny_f32))
    free = eng.generate(PROMPT, GenerationConfig(max_new_tokens=8, ignore_eos=True)).tokens
    stop = free[3]
    cut = eng.generate(PROMPT, GenerationConfig(max_new_tokens=8, stop_ids=(stop,))).tokens
    assert cut == free[: free.index(stop)]
    assert eng.generate(PROMPT, GenerationConfig(max_new_tokens=8, stop_ids=(stop,), ignore_eos=True)).tokens == free


def test_the_engine_clock_is_the_one_it_is_given(tiny_f32):
    ticks = iter(range(0, 10_000, 10))
    eng = InferenceEngine(load_backend("numpy", tiny_f32), clock=lambda: next(ticks))
    gen = eng.generate(PROMPT, GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert gen.ttft_ns == 10 and gen.itl_ns == [10, 10, 10]


def test_the_parent_samples_a_childs_allocation():
    import subprocess
    import sys
    import time

    code = "import numpy as np, sys; b = np.ones(200 * 2**20 // 8); b.sum(); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        sampler = ProcessSampler(child.pid, uss_cpu_share=1.0)  # a USS read whenever the last one's time has passed
        sampler.sample()
        before = sampler.rss_peak
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        sampler.sample()
        assert sampler.rss_peak - before > 150 * 2**20 and sampler.uss_peak > 150 * 2**20
        sampler.reset()
        assert sampler.rss_peak == 0
        # at the default share, a read that cost t waits 100 t: the next samples read RSS only
        sparing = ProcessSampler(child.pid)
        sparing.sample()
        first = sparing.uss_peak
        due = sparing._uss_due - time.monotonic()
        assert first > 150 * 2**20 and due > 0
        sparing.uss_peak = 0
        sparing.sample()
        assert sparing.uss_peak == 0 and sparing.rss_peak > 150 * 2**20
    finally:
        child.communicate("", timeout=30)
    sampler.sample()  # the process is gone: sampling keeps what it had and does not raise
    time.sleep(0)


def test_summary_statistics():
    s = summarize([10.0, 12.0, 11.0, 9.0, 13.0])
    assert s.mean == 11.0 and s.n == 5 and abs(s.std - 1.5811) < 1e-3
    assert s.ci95_low < 11.0 < s.ci95_high and abs((s.ci95_high - s.ci95_low) / 2 - 2.776 * 1.5811 / 5**0.5) < 1e-3
    # no jump where a hand-written table used to end (df 30 -> 31)
    w30, w31 = (summarize([10.0, 12.0] * (n // 2)) for n in (32, 34))
    assert abs((w30.ci95_high - w30.mean) / w30.std * 32**0.5 - 2.040) < 2e-3
    assert abs((w31.ci95_high - w31.mean) / w31.std * 34**0.5 - 2.035) < 2e-3
    one = summarize([4.0])
    assert one.mean == 4.0 and one.std == 0.0


def test_writer_appends_repairs_a_torn_line_and_refuses_other_columns(tmp_path):
    path = tmp_path / "w.csv"
    w = ResultWriter(path)
    w.write([BenchmarkResult(cell_id="a", framework="numpy", iterations=1, itl_s=[0.1, 0.2], tokens=[5, 7],
                             prompt_ids=[1, 2, 3], flags=("noisy", "diverged"), extra={"beam": 2})])
    with open(path, "a") as f:
        f.write("half,a,line")  # a writer killed mid-row
    w2 = ResultWriter(path)
    w2.write([BenchmarkResult(cell_id="b", framework="torch", iterations=1)])
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[2].split(",")[1] == "b"
    assert [json.loads(x)["cell_id"] for x in path.with_suffix(".jsonl").read_text().splitlines()] == ["a", "b"]
    first = json.loads(path.with_suffix(".jsonl").read_text().splitlines()[0])
    assert first["itl_s"] == [0.1, 0.2] and first["tokens"] == [5, 7] and first["prompt_ids"] == [1, 2, 3]
    assert first["flags"] == ["noisy", "diverged"] and first["extra"] == {"beam": 2}
    assert first["ttft_s"] is None  # not measured: null, not NaN (which is not JSON)
    assert BenchmarkResult.from_dict(first).as_dict() == first
    flat = next(csv.DictReader(open(path)))
    assert flat["tokens"] == "5 7" and flat["prompt_ids"] == "1 2 3" and flat["flags"] == "noisy;diverged"
    assert json.loads(flat["extra"]) == {"beam": 2} and flat["tokens_sha"] == csv_record(first)["tokens_sha"]
    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(InputError, match="exists with other columns"):
        ResultWriter(other)
    with pytest.raises(InputError, match="must name a .csv"):
        ResultWriter(tmp_path / "out.txt")


def test_resume_supersedes_only_the_cells_it_measures_again(tmp_path):
    w = ResultWriter(tmp_path / "c.csv", continuing=False)
    w.write([BenchmarkResult(cell_id="done", run_id="r1", iterations=2, repeat=i, error="two\nlines") for i in range(2)])
    w.write([BenchmarkResult(cell_id="half", run_id="r1", iterations=3, repeat=0)])  # 1 of 3 rows: cut short
    w.write([BenchmarkResult(cell_id="failed", run_id="r1", status="crash", error="boom")])
    w.write([BenchmarkResult(cell_id="elsewhere", run_id="r1", status="timeout")])  # not in the resumed sweep
    before = {p: p.read_bytes() for p in (tmp_path / "c.csv", tmp_path / "c.jsonl")}
    with pytest.raises(InputError, match=r"c.csv already holds 5 row\(s\): add --resume .* another --output"):
        ResultWriter(tmp_path / "c.csv", continuing=False)
    w2 = ResultWriter(tmp_path / "c.csv")
    assert w2.completed_cells() == {"done"}
    assert {p: p.read_bytes() for p in before} == before  # deciding deletes nothing
    w2.write([BenchmarkResult(cell_id="failed", run_id="r2", iterations=1)])
    w2.write([BenchmarkResult(cell_id="half", run_id="r2", iterations=3, repeat=i) for i in range(3)])
    rows = list(csv.DictReader(open(tmp_path / "c.csv", newline="")))
    assert [(r["cell_id"], r["run_id"], r["status"]) for r in rows] == [
        ("done", "r1", "ok"), ("done", "r1", "ok"), ("elsewhere", "r1", "timeout"), ("failed", "r2", "ok"),
        ("half", "r2", "ok"), ("half", "r2", "ok"), ("half", "r2", "ok")]
    assert [x["cell_id"] for x in read_jsonl(tmp_path / "c.jsonl")] == [r["cell_id"] for r in rows]
    for path, old in before.items():  # the rows kept are the very bytes written first
        kept = [line for line in old.decode().splitlines(keepends=True) if "failed" not in line and "half" not in line]
        assert path.read_bytes().startswith("".join(kept).encode())
