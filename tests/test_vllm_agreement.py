"""`bench serve --url` against vLLM's own client (`vllm bench serve`, from the environment
scripts/setup-vllm.sh makes) on one deterministic mock server: every chunk due at a fixed time
after its request arrived (sleep-until-deadline, so no delay accumulates), chunks of two tokens,
usage reported. Means, medians and throughputs agree within 2% at c=1 (3% at c=4), or ours is
the one within that of the mock's own schedule; no p99 of ours is above vLLM's client's, no TTFT
or E2EL reads shorter than the mock's schedule, and no TPOT or ITL shorter by more than the bar."""

import sys

import pytest

from engine.serve.agreement import Workload, run_our_client, run_vllm_client, shared_metrics, vllm_python
from test_serve import fake

# the real-server check's metrics: output throughput, TTFT mean/p50/p99, TPOT and ITL mean/p50
CHECKED = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
           "mean_itl_ms", "median_itl_ms")


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 4])
def test_bench_serve_agrees_with_vllm_bench_serve(tiny_f32, tmp_path, concurrency):
    from engine.serve.export import export_checkpoint

    python, tokenizer = vllm_python(), str(export_checkpoint(tiny_f32))
    ttft, gap, tokens, per_chunk = 0.15, 0.03, 16, 2
    server = fake(tmp_path, "--ttft", str(ttft), "--itl", str(gap), "--tokens", str(tokens),
                  "--chunk-tokens", str(per_chunk))
    w = Workload(concurrency, requests=16, prompt_tokens=16, gen_tokens=tokens)
    server.start(timeout_s=30)
    try:
        theirs = run_vllm_client(python, server.url, "fake", tokenizer, w, tmp_path)
        row = run_our_client(server.url, tiny_f32, w, tmp_path)
    finally:
        server.stop()
    table = shared_metrics(theirs, row)
    print("\n".join(f"{k:24s} {a:10.3f} {b:10.3f} {100 * (b / a - 1):+6.2f}%" for k, (a, b) in table.items()),
          file=sys.stderr)
    assert theirs["completed"] == row["requests_ok"] == 16
    assert theirs["total_output_tokens"] == row["output_tokens_total"] == 16 * 16
    # what the mock sends, in ms: the latencies a client without any delay of its own would read
    e2el = ttft + gap * (tokens // per_chunk - 1)
    truth = {"ttft": ttft, "itl": gap, "tpot": (e2el - ttft) / (tokens - 1), "e2el": e2el}
    central, tail = (0.02, 0.02) if concurrency == 1 else (0.03, 0.08)
    for k, (vllm, ours) in table.items():
        if not k.endswith("_ms"):  # throughputs, and the token totals (equal: asserted above)
            assert ours == pytest.approx(vllm, rel=central), k
            continue
        metric = k.split("_")[1]
        t = truth[metric] * 1e3
        # TTFT and E2EL count from the send, so no client reads them shorter than the schedule; TPOT
        # and ITL are differences of arrivals, which a first chunk delivered late shortens (both
        # clients read 13.96-13.98 ms TPOT on the schedule's 14.00 in one run)
        floor = 0.999 if metric in ("ttft", "e2el") else 1 - central
        assert ours >= t * floor, f"{k}: {ours:.2f} ms, shorter than the mock's schedule allows ({t:.2f} ms)"
        if k.startswith("p99"):
            # a p99 of 16 requests is about their largest, and a client's own delay on one request
            # only raises it (vLLM's client, on the fixed 150 ms TTFT: 151.7-156.6 ms in one run, its
            # p99 ITL 39 ms against our 34 on 30 ms gaps in another): ours no higher than vLLM's
            assert ours <= vllm * (1 + tail), f"{k}: {ours:.2f} ms against vLLM's client's {vllm:.2f}"
        else:
            # the same figure by both definitions; where vLLM's client reads further above the
            # mock's schedule than ours, ours must be the one within the bar of it
            closer = vllm > ours and ours <= t * (1 + central)
            assert closer or ours == pytest.approx(vllm, rel=central), f"{k}: {ours:.2f} against {vllm:.2f} ms"


def test_a_vllm_run_that_lost_requests_is_run_again_on_fresh_prompts(monkeypatch, tmp_path, capsys):
    """Both clients must do the same work: a `vllm bench serve` run with failed requests is
    replaced by one on fresh prompts (a seed no other run uses), and three such runs are an error."""
    from engine.serve import agreement

    seeds, completed = [], iter([14, 15, 16])
    monkeypatch.setattr(agreement, "run_vllm_client", lambda python, url, served, tok, w, out: (
        seeds.append(w.seed) or {"completed": next(completed),
                                 "errors": ["Traceback ...\nServerDisconnectedError: x"]}))
    w = Workload(4, requests=16, seed=4002)
    assert agreement.run_vllm_client_complete("py", "url", "m", "tok", w, tmp_path)["completed"] == 16
    assert seeds == [4002, 4502, 4602]
    err = capsys.readouterr().err
    assert "lost 2 of 16 requests (ServerDisconnectedError: x); running it again on fresh prompts" in err
    completed = iter([15, 15, 15])
    with pytest.raises(RuntimeError, match="lost requests in 3 runs in a row at c=4"):
        agreement.run_vllm_client_complete("py", "url", "m", "tok", w, tmp_path)
    # every alternation's own seeds (up to 5 rounds) stay clear of the retries'
    retries = {agreement.retry_seed(4000 + 2 * r, k) for r in range(5) for k in range(2)}
    assert len(retries) == 10 and not {4000 + i for i in range(10)} & retries


@pytest.mark.slow
def test_alternations_on_llama_server_agree_within_ten_percent(default_model, tmp_path):
    """The issue's real-server check: one llama-server, `vllm bench serve` and `bench serve --url`
    back to back (who goes first alternating), 64-token prompts, 32 forced tokens, 16 requests at
    c=1 and c=4: the median of the alternations' paired ratios within 10% of 1, over five
    alternations. Medians of each client taken apart were not a steady figure on this 2-core host:
    single c=1 runs of one client spread 39-63 output tok/s within an hour, and medians of five read
    12-18% apart at c=1 where the paired ratios of the same runs read 2.4% (out tok/s)."""
    import psutil

    from engine.serve.agreement import Workload, alternate, start_server, summarize, table
    from engine.serve.export import export_checkpoint
    from test_serve import listening, llama_server_or_skip

    llama_server_or_skip()
    python, tokenizer = vllm_python(), str(export_checkpoint(default_model))
    server, served = start_server("llama-server", default_model, 4, 64 + 32, tmp_path)
    try:
        summaries = {c: summarize(alternate(server.url, served, default_model, tokenizer, python,
                                            Workload(c, 16, 64, 32, seed=1000 * c), 5, tmp_path)) for c in (1, 4)}
    finally:
        server.stop()
    print(table([("llama-server", c, m) for c, m in summaries.items()]), file=sys.stderr)
    assert not listening(server.port) and not [p for p in psutil.process_iter(["name"]) if p.info["name"] == "llama-server"]
    for c, summary in summaries.items():
        paired = {k: v[2] for k, v in summary.items() if k in CHECKED}
        assert paired == pytest.approx({k: 1.0 for k in paired}, abs=0.10), c


def test_summary_pairs_each_alternation():
    """The paired figure is the median of each alternation's own ratio, not a ratio of medians:
    a host that drifts between alternations moves both clients of a pair together."""
    from engine.serve.agreement import summarize, table

    runs = [{"m": (100.0, 102.0)}, {"m": (50.0, 49.0)}, {"m": (80.0, 84.0)}]  # (vLLM's, ours)
    theirs, ours, paired = summarize(runs)["m"]
    assert (theirs, ours) == (80.0, 84.0) and paired == pytest.approx(1.02)
    assert "| s | 4 | m | 80.00 | 84.00 | +5.0% | +2.0% |" in table([("s", 4, summarize(runs))])
