"""`bench serve`: managed servers, the streaming client's timing, faults, the exported checkpoint,
and real servers on the same weights against the reference."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import bench, require_module
from engine.serve.load import Level, LoadSpec, run_level
from engine.serve.metrics import Slo, level_fields, request_sample
from engine.serve.process import ManagedServer, ServerFailed

FAKE = Path(__file__).resolve().parent / "fake_openai_server.py"


def fake(tmp_path, *args, name="fake"):
    return ManagedServer(name, [sys.executable, str(FAKE), "--port", "{port}", *args], tmp_path / f"{name}.log")


def listening(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp"))


def group_alive(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def body_for(i):
    return 0, {"model": "fake", "prompt": "x", "max_tokens": 8, "stream": True}


def test_server_starts_and_stops_with_its_whole_group(tmp_path):
    server = fake(tmp_path, "--child")
    startup = server.start(timeout_s=30)
    assert 0 < startup < 30 and server.healthy() and listening(server.port)
    pgid = server.proc.pid
    deadline = time.time() + 5
    while len(group_alive(pgid)) < 2 and time.time() < deadline:  # the server and its grandchild
        time.sleep(0.05)
    assert len(group_alive(pgid)) == 2
    server.stop()
    assert group_alive(pgid) == [] and not listening(server.port)


def test_client_timing_against_known_delays(tmp_path):
    """TTFT 0.2 s, then a chunk every 0.05 s; 8 tokens in chunks of 3, 3 and 2 (vLLM's chunk ITL)."""
    server = fake(tmp_path, "--ttft", "0.2", "--itl", "0.05", "--tokens", "8", "--chunk-tokens", "3")
    server.start(timeout_s=30)
    try:
        run = run_level(server.url, Level("concurrency", 1), LoadSpec(requests=3, warmup=1), body_for)
    finally:
        server.stop()
    words = lambda text: len(text.split())  # noqa: E731  (the fake's tokens are words)
    samples = [request_sample(r, words, " ".join, None) for r in run.records]
    assert [s["ok"] for s in samples] == [True] * 3 and [s["output_tokens"] for s in samples] == [8] * 3
    for s in samples:
        t = s["chunk_t_s"]
        assert len(t) == 3 and s["chunk_text"][0] == "w0 w1 w2 " and s["server_tokens"] == s["client_tokens"] == 8
        assert s["ttft_s"] == t[0] and 0.2 <= t[0] < 0.3
        assert s["itl_s"] == [t[1] - t[0], t[2] - t[1]] and all(0.045 <= x < 0.12 for x in s["itl_s"])
        assert s["e2el_s"] == t[2] <= s["end_s"] and s["tpot_s"] == pytest.approx((t[2] - t[0]) / 7)
    f = level_fields(samples, run.duration_s, 8, Slo(ttft_s=0.25, tpot_s=1.0))
    assert f["requests_ok"] == 3 and f["output_tokens_total"] == 24 and f["usage_completion_tokens_total"] == 24
    assert 0.2 <= f["ttft_p50_s"] < 0.3 and f["goodput_rps"] == pytest.approx(3 / run.duration_s)
    assert 3 * 0.3 <= run.duration_s < 3 * 0.3 + 0.6 and run.not_sent == 0  # warm-up excluded


def test_concurrent_requests_overlap(tmp_path):
    server = fake(tmp_path, "--ttft", "0.3", "--itl", "0.01")
    server.start(timeout_s=30)
    try:
        run = run_level(server.url, Level("concurrency", 4), LoadSpec(requests=8, warmup=0), body_for)
    finally:
        server.stop()
    assert all(r.ok for r in run.records) and len(run.records) == 8
    assert run.duration_s < 2 * 0.45 + 0.5  # two waves of four, not eight in a row


def test_poisson_rate_sends_on_schedule(tmp_path):
    server = fake(tmp_path, "--ttft", "0.01", "--itl", "0.001")
    server.start(timeout_s=30)
    try:
        run = run_level(server.url, Level("rate", 20.0), LoadSpec(requests=20, warmup=0), body_for)
    finally:
        server.stop()
    starts = [r.start_s for r in run.records]
    assert all(r.ok for r in run.records) and starts == sorted(starts) and 0.2 < starts[-1] < 3.0


def test_open_loop_times_requests_from_their_scheduled_send(tmp_path):
    """A client that falls behind its Poisson schedule (here: 60 ms of blocking work on the event
    loop before each send, at 50 req/s) reports the lag, and TTFT counts from the scheduled send:
    lag + the server's 0.1 s."""
    server = fake(tmp_path, "--ttft", "0.1", "--itl", "0.01", "--tokens", "2")

    def slow_alive():
        time.sleep(0.06)  # blocks the event loop: every later send slips
        return True

    server.start(timeout_s=30)
    try:
        run = run_level(server.url, Level("rate", 50.0), LoadSpec(requests=8, warmup=0), body_for, alive=slow_alive)
        closed = run_level(server.url, Level("concurrency", 2), LoadSpec(requests=4, warmup=0), body_for)
    finally:
        server.stop()
    recs = run.records
    lags = [r.lag_s for r in recs]
    assert all(r.ok for r in recs) and lags[-1] - lags[0] > 0.1  # the backlog grows
    for i, r in enumerate(recs):  # a chunk is read late by the blocking before every later send, too
        assert r.lag_s + 0.1 <= r.chunks[0].t_s < r.lag_s + 0.1 + 0.06 * (len(recs) - 1 - i) + 0.1
    f = level_fields([request_sample(r, lambda t: len(t.split()), " ".join, None) for r in recs], run.duration_s,
                     2, Slo())
    assert f["send_lag_max_s"] == max(lags) and f["send_lag_mean_s"] == pytest.approx(sum(lags) / 8)
    assert f["ttft_p50_s"] > 0.1 + 0.1  # the queueing shows in TTFT, not hidden by a late send
    assert all(r.lag_s == 0.0 for r in closed.records)  # closed loop: a request is due when it is sent


def test_client_capacity_is_measured_once_and_cached(tmp_path, monkeypatch):
    """The client's capacity against the zero-delay mock: measured on first use, then read from
    the cache (no second measurement), and --calibrate measures again."""
    from engine.serve import capacity

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    calls = []
    real = capacity.measure
    monkeypatch.setattr(capacity, "measure", lambda: calls.append(1) or real())
    first = capacity.client_capacity()
    assert calls == [1] and first["client_capacity_rps"] > 20 and first["client_capacity_chunks_per_s"] > 1000
    assert capacity.client_capacity() == first and calls == [1]
    assert json.loads(capacity.cache_file().read_text()) == {capacity._key(): first}
    assert capacity.client_capacity(recalibrate=True) != first and calls == [1, 1]
    r = bench("serve", "--calibrate", env={"BENCH_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.startswith("client capacity: ") and "requests/s" in r.stdout


def test_duration_bounds_a_level(tmp_path):
    server = fake(tmp_path, "--ttft", "0.05", "--itl", "0.01")
    server.start(timeout_s=30)
    try:
        run = run_level(server.url, Level("concurrency", 2), LoadSpec(duration_s=1.0, warmup=0), body_for)
    finally:
        server.stop()
    records = run.records
    assert 6 <= len(records) <= 2 * 1.0 / 0.12 + 2 and all(r.ok for r in records)
    assert 1.0 <= run.duration_s < 1.5 and max(r.start_s for r in records) < 1.0


def test_start_failures_have_a_status_and_the_log(tmp_path):
    with pytest.raises(ServerFailed) as e:
        fake(tmp_path, "--mode", "exit").start(timeout_s=30)
    assert e.value.status == "crash" and "cannot load the model" in str(e.value)
    server = fake(tmp_path, "--mode", "no-health", name="slow")
    with pytest.raises(ServerFailed) as e:
        server.start(timeout_s=3)
    assert e.value.status == "timeout" and group_alive(server.proc.pid) == [] and not listening(server.port)


def test_faults_become_rows_and_the_rest_continue(tmp_path, tiny_f32):
    """One invocation: a server that fails to start, one killed mid-load, one that hangs, a good one."""
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.01 --itl 0.01"
    out = tmp_path / "serve.csv"
    r = bench("serve", "-m", tiny_f32, "--server-command", f"nostart={cmd} --mode exit",
              "--server-command", f"dies={cmd} --mode die-after --after 2", "--server-command", f"hangs={cmd} --mode hang",
              "--server-command", f"good={cmd}", "-c", "1", "-c", "2", "--requests", "4", "--warmup", "0",
              "--request-timeout", "2", "--check", "0", "-O", str(out), "--format", "csv", timeout=120)
    assert r.returncode == 1, r.stderr
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    status = {(x["server"], x["concurrency"]): x["status"] for x in rows}
    assert status == {("nostart", 1): "crash", ("nostart", 2): "crash", ("dies", 1): "crash", ("dies", 2): "crash",
                      ("hangs", 1): "timeout", ("hangs", 2): "timeout", ("good", 1): "ok", ("good", 2): "ok"}
    by = {(x["server"], x["concurrency"]): x for x in rows}
    assert "cannot load the model" in by["nostart", 1]["error"] and "SIGKILL" in by["dies", 1]["error"]
    # killed while streaming its third request: that level's row counts the failure and the request
    # never sent; the next level did not run, and says why
    # (the fourth is sent too when it starts before the harness sees the process gone)
    dies = by["dies", 1]
    assert dies["requests_ok"] == 2 and dies["requests_failed"] >= 1
    assert dies["requests_failed"] + dies["requests_not_sent"] == 2
    assert by["dies", 2]["error"].startswith("not run: dies killed by SIGKILL")
    assert by["hangs", 1]["requests_failed"] == 1 and by["hangs", 1]["requests_not_sent"] == 3
    assert by["good", 2]["requests_ok"] == 4 and by["good", 2]["usage_completion_tokens_total"] == 4 * 8
    assert len(by["good", 2]["requests"]) == 4 and by["good", 1]["server_command"].startswith(sys.executable)
    ports = [int(x["server_url"].rsplit(":", 1)[1]) for x in rows if x["server_url"]]
    assert ports and not any(listening(p) for p in ports)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(FAKE) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_harness_stops_its_server(tmp_path, tiny_f32, sig):
    """Ctrl-C (SIGINT) or SIGTERM mid-load: rows already written stay, the server's group is gone."""
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.3 --itl 0.05"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "-m", tiny_f32, "--server-command", f"f={cmd}",
                             "-c", "1", "-c", "2", "--requests", "3", "--check", "0", "-O", str(tmp_path / "s.csv")],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # wait until the second level is under load
        lines.append(line)
        if "concurrency 2" in line:
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode in (130, 128 + sig), "".join(lines)
    rows = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["status"] == "ok"
    port = int(json.loads(rows[0])["server_url"].rsplit(":", 1)[1])
    assert not listening(port)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(FAKE) in " ".join(p.info["cmdline"] or [])]


def test_servers_die_with_the_harness(tmp_path):
    """SIGKILL the harness while it holds a server: the server goes too (parent-death signal)."""
    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_serve import fake; from pathlib import Path; s = fake(Path({str(tmp_path)!r})); "
              "s.start(30); print(s.proc.pid, s.port, flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    pid, port = map(int, harness.stdout.readline().split())
    assert psutil.pid_exists(pid) and listening(port)
    harness.send_signal(signal.SIGKILL)
    harness.wait()
    deadline = time.time() + 10
    while group_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert group_alive(pid) == [] and not listening(port)


def test_exported_checkpoint_gives_the_reference_logits(tiny_models, tmp_path, monkeypatch):
    torch = require_module("torch")
    transformers = require_module("transformers")
    from conftest import reference_logits
    from engine.model.spec import ModelSpec
    from engine.model.tokenizer import Tokenizer
    from engine.serve.export import export_checkpoint

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    path = tiny_models["q8_0"]
    out = export_checkpoint(path)
    assert export_checkpoint(path) == out  # cached by the file's hash
    config = json.loads((out / "config.json").read_text())  # RoPE base also where pre-5 readers (mlx-lm) look
    assert config["rope_theta"] == ModelSpec.open(path).config.rope_base
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_spec(ModelSpec.open(path))
    assert tok.encode("Hello, world!", add_special_tokens=False) == ours.encode("Hello, world!")
    prompt = [3, 17, 99, 5]
    ref = reference_logits(path, prompt, 0)[0]
    got = model(torch.tensor([prompt])).logits[0, -1].detach().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_a_checked_request_that_leaves_the_reference_carries_the_references_gap_there(tiny_f32, tmp_path):
    """The fake streams words unrelated to the model: every checked request leaves the reference
    at its first token, and its sample has the reference's logit gap to the server's token there,
    as the reference's own logits after the prompt give it."""
    from conftest import reference_logits
    from engine.model.spec import ModelSpec
    from engine.model.tokenizer import Tokenizer
    from engine.serve.prompts import PromptSource

    out = tmp_path / "gap.csv"
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.01 --itl 0.01"
    r = bench("serve", "-m", tiny_f32, "--server-command", f"f={cmd}", "-c", "1", "--requests", "2", "--warmup", "0",
              "-n", "8", "--prompt-tokens", "6", "--check", "2", "-O", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.with_suffix(".jsonl").read_text().splitlines()[0])
    spec = ModelSpec.open(tiny_f32)
    tok = Tokenizer.from_spec(spec)
    prompts = PromptSource(spec, tok, 6, 0)  # the run's: seed 0, level 0
    assert row["checked_requests"] == 2 and row["near_tie_requests"] + row["diverged_requests"] == 2
    for sample in row["requests"]:
        assert sample["match_tokens"] == 0
        p = prompts.get(0, sample["prompt_index"])
        ids = p.ids if row["prompt_source"] == "token_ids" else tok.encode(p.text)
        logits = reference_logits(tiny_f32, ids, 0)[0]
        token = tok.encode(sample["text"], add_bos=False)[0]
        assert sample["divergence_gap"] == pytest.approx(float(logits.max() - logits[token]), abs=1e-4)
    assert ("diverged" in row["flags"]) == (row["diverged_requests"] > 0)


def test_llama_cpp_python_server_streams_the_reference_tokens(tiny_f32, tmp_path):
    require_module("llama_cpp.server.app")
    out = tmp_path / "serve.csv"
    r = bench("serve", "-s", "llama-cpp-python", "-m", tiny_f32, "-c", "1", "-c", "2", "--requests", "6",
              "--prompt-tokens", "12", "-n", "8", "--check", "6", "-O", str(out), "--format", "csv", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(x["server"], x["concurrency"], x["status"]) for x in rows] == [("llama-cpp-python", 1, "ok"),
                                                                            ("llama-cpp-python", 2, "ok")]
    for x in rows:
        # a random tiny model often samples byte tokens that decode to no text: those requests
        # fail ("no text") and are not checked; every one that streamed text equals the reference
        assert x["checked_requests"] >= 2 and x["diverged_requests"] == 0 and x["match_tokens"] == 8
        assert x["startup_s"] > 0 and x["server_version"] and "llama_cpp.server" in x["server_command"]
        assert x["output_tps"] > 0 and x["ttft_p50_s"] > 0 and not math.isnan(x["ttft_p50_s"])
    port = int(rows[0]["server_url"].rsplit(":", 1)[1])
    assert not listening(port)


@pytest.mark.slow
def test_llama_cpp_python_and_vllm_on_the_default_model(tmp_path):
    """The issue's command: one row per server and level, every field, no server left behind."""
    out = tmp_path / "out.csv"
    r = bench("serve", "--server", "llama-cpp-python", "--server", "vllm", "--concurrency", "1", "--concurrency", "4",
              "--requests", "16", "--prompt-tokens", "64", "--gen-tokens", "32", "-O", str(out), timeout=1500)
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(x["server"], x["concurrency"]) for x in rows] == [("llama-cpp-python", 1), ("llama-cpp-python", 4),
                                                               ("vllm", 1), ("vllm", 4)]
    assert r.returncode == 0, r.stderr
    for x in rows:
        # output length by the model's tokenizer: text re-tokenized can merge a token or two (llama.cpp
        # streams text); vLLM returns the ids, so its count is exact
        assert x["status"] == "ok" and x["requests_ok"] == 16 and x["output_tokens_mean"] == pytest.approx(32, abs=1)
        assert x["server"] != "vllm" or (x["output_tokens_mean"] == 32 and x["usage_completion_tokens_total"] == 512)
        assert all(x[f"{m}_p{q}_s"] > 0 for m in ("ttft", "tpot", "itl", "e2el") for q in (50, 90, 99))
        assert x["startup_s"] > 0 and x["server_version"] and x["server_log"] and x["checked_requests"] == 4
        assert x["match_tokens"] >= 0 and len(x["requests"]) == 16  # both leave the f32 reference early
    vllm = {x["concurrency"]: x["output_tps"] for x in rows if x["server"] == "vllm"}
    assert vllm[4] > 1.5 * vllm[1]  # vLLM batches concurrent requests
    ports = [int(x["server_url"].rsplit(":", 1)[1]) for x in rows]
    assert not any(listening(p) for p in ports)
    assert not [p for p in psutil.process_iter(["cmdline"])
                if any(k in " ".join(p.info["cmdline"] or []) for k in ("llama_cpp.server", "vllm.entrypoints"))]


def test_serve_rows_round_trip_and_report(tmp_path):
    require_module("matplotlib")
    from engine.analysis.report import write_report
    from engine.results.writers import ResultWriter, read_jsonl
    from engine.serve.rows import ServeResult

    rows = [ServeResult(run_id="r", level_id=f"{s}{c}", server=s, profile="concurrency", concurrency=c,
                        requests_ok=4, output_tps=10.0 * c * (2 if s == "b" else 1), ttft_p50_s=0.1 * c,
                        tpot_p50_s=0.02, e2el_p50_s=0.5 * c, requests=[{"index": 0, "ttft_s": 0.1}])
            for s in ("a", "b") for c in (1, 4)]
    rows.append(ServeResult(run_id="r", level_id="x", server="c", status="crash", error="exited with code 1"))
    writer = ResultWriter(tmp_path / "serve.csv", ServeResult)
    writer.write(rows)
    back = [ServeResult.from_dict(d) for d in read_jsonl(writer.jsonl_path)]
    assert back == rows
    report = write_report([str(tmp_path / "serve.csv")], tmp_path / "report")
    assert (tmp_path / "report" / "latency_vs_throughput.png").stat().st_size > 0
    text = report.read_text()
    assert "Serving report" in text and "exited with code 1" in text


def jsonl_rows(out):
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


def test_bos_model_counts_output_without_bos(arch_models, tmp_path):
    """A SentencePiece model whose file asks for BOS: the client's count of a request's text is the
    tokenizer's without BOS (it used to read one token too many); the server's usage wins for n."""
    from engine.model.spec import ModelSpec
    from engine.model.tokenizer import Tokenizer

    model = arch_models["gemma3"]
    tok = Tokenizer.from_spec(ModelSpec.open(model))
    assert tok.add_bos
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.01 --itl 0.01 --chunk-tokens 3"
    out = tmp_path / "serve.csv"
    r = bench("serve", "-m", model, "--server-command", f"usage={cmd}", "--server-command", f"nousage={cmd} --no-usage",
              "-c", "2", "--requests", "4", "-n", "8", "--check", "0", "-O", str(out), "--format", "csv", timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {x["server"]: x for x in jsonl_rows(out)}
    for x in rows.values():
        for s in x["requests"]:
            assert s["client_tokens"] == len(tok.encode(s["text"], add_bos=False)) == len(tok.encode(s["text"])) - 1
        assert x["output_tokens_client_total"] == sum(s["client_tokens"] for s in x["requests"])
    assert rows["usage"]["output_tokens_total"] == rows["usage"]["usage_completion_tokens_total"] == 4 * 8
    assert rows["nousage"]["output_tokens_total"] == rows["nousage"]["output_tokens_client_total"]
    assert rows["nousage"]["usage_completion_tokens_total"] == 0


def test_find_max_on_latencies_that_grow_with_load(tiny_f32, tmp_path):
    """TTFT 50 ms x the requests in flight: c <= 3 meets ttft_ms=175, c = 4 does not."""
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.05 --itl 0.005 --tokens 4 --slowdown 1"
    out = tmp_path / "serve.csv"
    slow = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.3 --itl 0.005 --tokens 4"
    r = bench("serve", "-m", tiny_f32, "--server-command", f"f={cmd}", "--server-command", f"slow={slow}", "--find-max",
              "--slo", "ttft_ms=175", "--requests", "8", "--check", "0", "-O", str(out), "--format", "csv", timeout=120)
    assert r.returncode == 0, r.stderr
    rows = jsonl_rows(out)
    assert [(x["concurrency"], "slo_met" in x["flags"]) for x in rows[:4]] == [(1, True), (2, True), (4, False),
                                                                               (3, True)]
    never = rows[-1]  # the slow server misses the SLO at c=1: a result that says so, and the one level tried
    assert (never["server"], never["status"], never["error"], never["flags"]) == ("slow", "ok", "no level met the SLO",
                                                                                  ["find_max"])
    assert never["extra"]["find_max"]["tried"] == [1] and never["extra"]["find_max"]["best"] is None
    result = rows[4]
    assert result["flags"] == ["find_max"] and result["concurrency"] == 3 and result["goodput_frac"] >= 0.9
    assert result["extra"]["find_max"] == {"tried": [1, 2, 4, 3], "met": [True, True, False, True], "best": 3,
                                           "fraction": 0.9}


def test_every_request_gets_a_fresh_prompt_and_cache_and_length_are_read(tiny_f32, tmp_path):
    """Seeded and dataset prompts never repeat across warm-ups and levels (dataset rows that run
    out are reused behind a nonce prefix, flagged); the server's cached prompt tokens and short
    outputs land in the row."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"row {i} of the set"}) + "\n" for i in range(5)))
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.01 --itl 0.01 --tokens 6 --cache-n 3"
    out = tmp_path / "serve.csv"
    r = bench("serve", "-m", tiny_f32, "--server-command", f"f={cmd}", "-c", "1", "-c", "2", "--requests", "3",
              "--warmup", "1", "-n", "8", "--check", "0", "--dataset", str(dataset), "-O", str(out),
              "--format", "csv", timeout=120)
    assert r.returncode == 0, r.stderr
    rows = jsonl_rows(out)
    assert [x["short_requests"] for x in rows] == [3, 3] and all("short" in x["flags"] for x in rows)
    assert [x["cached_prompt_tokens_total"] for x in rows] == [9, 9]
    assert all("prefix_cached" in x["flags"] for x in rows)
    assert "nonce_prefix" not in rows[0]["flags"] and "nonce_prefix" in rows[1]["flags"]  # 1+3+1 rows, then reuse
    from engine.model.spec import ModelSpec
    from engine.model.tokenizer import Tokenizer
    from engine.serve.prompts import PromptSource

    spec = ModelSpec.open(tiny_f32)
    src = PromptSource(spec, Tokenizer.from_spec(spec), 16, seed=0)
    seen = [tuple(src.get(lv, i, warmup=w).ids) for lv in range(3) for w in (True, False) for i in range(300)]
    assert len(set(seen)) == len(seen) and src.get(1, 7).ids == list(seen[300 * 3 + 7])  # stable per (level, request)
    # runs of nearby seeds (an alternation's 1001, 1003, ...) share no prompt either
    nearby = {tuple(PromptSource(spec, Tokenizer.from_spec(spec), 16, seed=sd).get(0, i).ids)
              for sd in (0, 1, 2, 3) for i in range(16)}
    assert len(nearby) == 4 * 16


def test_url_server_gets_token_id_prompts(tiny_f32, tmp_path):
    """A --url server that answers an id prompt gets every prompt as ids (the fake counts a list's
    length as the prompt's tokens), so the reference checks the very prompt the server saw."""
    server = fake(tmp_path, "--ttft", "0.01", "--itl", "0.01")
    server.start(timeout_s=30)
    try:
        out = tmp_path / "serve.csv"
        r = bench("serve", "-m", tiny_f32, "--url", server.url, "-c", "1", "--requests", "3", "--prompt-tokens", "12",
                  "--check", "0", "-O", str(out), "--format", "csv", timeout=120)
    finally:
        server.stop()
    assert r.returncode == 0, r.stderr
    row = jsonl_rows(out)[0]
    assert row["prompt_source"] == "token_ids" and row["input_tokens_total"] == 3 * 12


def test_url_output_length_is_forced_only_with_ignore_eos(tiny_f32, tmp_path):
    """A --url server stops at its EOS unless asked not to: without --ignore-eos the early stops
    are counted and flagged `short`; with it the request carries `ignore_eos` and runs to -n."""
    server = fake(tmp_path, "--ttft", "0.01", "--itl", "0.01", "--eos-at", "3")
    server.start(timeout_s=30)
    rows = {}
    try:
        for flag in ("", "--ignore-eos"):
            out = tmp_path / f"serve{flag}.csv"
            r = bench("serve", "-m", tiny_f32, "--url", server.url, "-c", "1", "--requests", "3", "-n", "6",
                      "--check", "0", "-O", str(out), "--format", "csv", *filter(None, [flag]), timeout=120)
            assert r.returncode == 0, r.stderr
            rows[flag] = jsonl_rows(out)[0]
    finally:
        server.stop()
    free, forced = rows[""], rows["--ignore-eos"]
    assert not free["ignore_eos"] and free["short_requests"] == 3 and "short" in free["flags"]
    assert free["output_tokens_total"] == 3 * 3
    assert forced["ignore_eos"] and forced["extra"]["request_fields"] == {"ignore_eos": True}
    assert forced["short_requests"] == 0 and forced["output_tokens_total"] == 3 * 6 and "short" not in forced["flags"]


def llama_server_or_skip():
    from engine.serve.servers import LlamaServer

    reason = LlamaServer().availability()
    if reason:  # scripts/setup.sh builds it; without the build there is nothing to test
        pytest.fail(reason)


def no_llama_server_left(rows):
    ports = [int(x["server_url"].rsplit(":", 1)[1]) for x in rows if x["server_url"]]
    assert ports and not any(listening(p) for p in ports)
    assert not [p for p in psutil.process_iter(["name"]) if p.info["name"] == "llama-server"]


def test_llama_server_streams_the_reference_tokens_from_token_id_prompts(tiny_f32, tmp_path):
    llama_server_or_skip()
    out = tmp_path / "serve.csv"
    r = bench("serve", "-s", "llama-server", "-m", tiny_f32, "-c", "1", "-c", "2", "--requests", "6",
              "--prompt-tokens", "12", "-n", "8", "--check", "6", "-O", str(out), "--format", "csv", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = jsonl_rows(out)
    assert [(x["server"], x["concurrency"], x["status"]) for x in rows] == [("llama-server", 1, "ok"),
                                                                            ("llama-server", 2, "ok")]
    for x in rows:
        assert x["prompt_source"] == "token_ids" and x["input_tokens_total"] == 6 * 12  # the ids, as sent
        assert x["usage_completion_tokens_total"] == x["output_tokens_total"] == 6 * 8 and not x["short_requests"]
        assert x["checked_requests"] >= 2 and x["diverged_requests"] == 0 and x["match_tokens"] == 8
        assert "--parallel 2" in x["server_command"] and x["server_version"]
        assert all(s["timings"].get("predicted_n") == 8 for s in x["requests"])  # per-response timings kept
        assert x["extra"]["server_metrics"]["llamacpp:tokens_predicted_total"] > 0  # its /metrics
    no_llama_server_left(rows)


@pytest.mark.slow
def test_llama_server_batches_concurrent_requests_on_the_default_model(tmp_path):
    """The issue's command: llama-server's slots make c=4 faster than c=1 (the Python server: 0.96x)."""
    llama_server_or_skip()
    out = tmp_path / "out.csv"
    r = bench("serve", "-s", "llama-server", "-c", "1", "-c", "4", "--requests", "16", "-O", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    rows = jsonl_rows(out)
    tps = {x["concurrency"]: x["output_tps"] for x in rows}
    print(f"llama-server output tok/s: c=1 {tps[1]:.1f}, c=4 {tps[4]:.1f} ({tps[4] / tps[1]:.2f}x)")
    assert tps[4] >= 1.2 * tps[1]
    for x in rows:
        assert x["status"] == "ok" and x["requests_ok"] == 16 and x["usage_completion_tokens_total"] == 16 * 32
        assert x["output_tokens_total"] == 16 * 32 and x["checked_requests"] == 4
    no_llama_server_left(rows)


def test_output_reused_without_resume_is_refused_and_resume_skips_done_levels(tiny_f32, tmp_path):
    """A second `bench serve -O FILE` refuses the file in one line and leaves it as it was;
    --resume continues it, running only the levels it does not hold yet."""
    cmd = f"{sys.executable} {FAKE} --port {{port}} --ttft 0.01 --itl 0.01 --tokens 4"
    out = tmp_path / "serve.csv"
    args = ("serve", "-m", tiny_f32, "--server-command", f"f={cmd}", "--requests", "2", "-n", "4", "--check", "0",
            "-O", str(out))
    assert bench(*args, "-c", "1").returncode == 0
    before = (out.read_text(), out.with_suffix(".jsonl").read_text())
    r = bench(*args, "-c", "1", "-c", "2")
    assert r.returncode == 2 and "already holds 1 row(s): add --resume" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (out.read_text(), out.with_suffix(".jsonl").read_text()) == before
    r = bench(*args, "-c", "1", "-c", "2", "--resume")
    assert r.returncode == 0, r.stderr
    rows = jsonl_rows(out)
    assert [x["concurrency"] for x in rows] == [1, 2]  # c=1 not run again
    assert all(x["client_capacity_rps"] > 0 and x["send_lag_max_s"] == 0.0 for x in rows)  # provenance; closed loop
    r = bench(*args[:-2], "-c", "1", "--resume")
    assert r.returncode == 2 and "--resume needs --output" in r.stderr
