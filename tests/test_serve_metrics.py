"""`bench serve` metric definitions on fixed request logs (no timing noise): vLLM's by hand, the
other tools' where they differ, fresh prompts, and the --find-max search."""

import math

import numpy as np
import pytest

from engine.serve.client import Chunk, RequestRecord
from engine.serve.findmax import FindMax, find_max
from engine.serve.metrics import Slo, level_fields, reference_answer, request_sample, server_token_at

WORDS = lambda text: len(text.split())  # noqa: E731  (the fixed logs' tokens are words)


def record(index, times, texts, end, usage=None, timings=None):
    rec = RequestRecord(index=index, prompt_index=index, ok=True, end_s=end, usage=usage or {}, timings=timings or {})
    rec.chunks = [Chunk(t, x) for t, x in zip(times, texts)]
    return rec


# two requests, 8 tokens each in chunks of 3, 3 and 2 words; the second has no usage and its first
# chunk is empty (a special token's text), so the client counts 7 words for it
LOG = [record(0, [0.20, 0.30, 0.45], ["a b c ", "d e f ", "g h "], 0.50, {"completion_tokens": 8}),
       record(1, [0.25, 0.40, 0.60, 0.70], ["", "a b c ", "d e f ", "g "], 0.80)]
DURATION = 1.6


def samples():
    return [request_sample(r, WORDS, " ".join, None) for r in LOG]


def test_default_metrics_are_vllms_by_hand():
    s = samples()
    # n: usage.completion_tokens where reported (8), else the client's count (7)
    assert [x["output_tokens"] for x in s] == [8, 7] and [x["client_tokens"] for x in s] == [8, 7]
    assert [x["server_tokens"] for x in s] == [8, None]
    assert s[0]["ttft_s"] == 0.20 and s[1]["ttft_s"] == 0.25  # the first chunk, empty text or not (vLLM)
    assert s[0]["e2el_s"] == 0.45 and s[1]["e2el_s"] == 0.70  # the last chunk, not the stream's end
    assert s[0]["itl_s"] == pytest.approx([0.10, 0.15]) and s[1]["itl_s"] == pytest.approx([0.15, 0.20, 0.10])
    tpot = [(0.45 - 0.20) / 7, (0.70 - 0.25) / 6]
    assert [x["tpot_s"] for x in s] == pytest.approx(tpot)
    f = level_fields(s, DURATION, 8, Slo(ttft_s=0.22, tpot_s=0.1))
    itl = [0.10, 0.15, 0.15, 0.20, 0.10]
    expected = {"requests_ok": 2, "request_throughput_rps": 2 / 1.6, "output_tps": 15 / 1.6, "output_tokens_total": 15,
                "output_tokens_client_total": 15, "usage_completion_tokens_total": 8, "short_requests": 1,
                "ttft_mean_s": 0.225, "ttft_p50_s": 0.225, "ttft_p99_s": float(np.percentile([0.2, 0.25], 99)),
                "tpot_mean_s": np.mean(tpot), "tpot_p90_s": float(np.percentile(tpot, 90)),
                "itl_mean_s": np.mean(itl), "itl_p50_s": 0.15, "itl_p99_s": float(np.percentile(itl, 99)),
                "e2el_mean_s": 0.575, "e2el_p50_s": 0.575, "goodput_rps": 1 / 1.6, "goodput_frac": 0.5}
    assert {k: f[k] for k in expected} == pytest.approx(expected)


def test_failed_and_unsent_requests_count_against_goodput():
    failed = RequestRecord(index=2, prompt_index=2, error="timeout: no data for 2 s")
    s = samples() + [request_sample(failed, WORDS, " ".join, None)]
    f = level_fields(s, DURATION, 8, Slo(ttft_s=1.0), not_sent=1)
    assert (f["requests_ok"], f["requests_failed"], f["requests_not_sent"]) == (2, 1, 1)
    assert f["goodput_frac"] == 2 / 4 and f["goodput_rps"] == pytest.approx(2 / 1.6)


def test_guidellm_differs_exactly_where_its_definitions_do():
    s = samples()
    vllm, gl = level_fields(s, DURATION, 8, Slo()), level_fields(s, DURATION, 8, Slo(), "guidellm")
    same = [k for k in vllm if k.startswith("ttft_")] + ["request_throughput_rps", "requests_ok"]
    assert {k: gl[k] for k in same} == {k: vllm[k] for k in same}
    # n without usage: one token per chunk (4), not the tokenizer's 7
    assert gl["output_tokens_total"] == 8 + 4 and gl["output_tps"] == pytest.approx(12 / 1.6)
    assert gl["metrics_definition"] == "guidellm"
    tpot = [0.45 / 8, 0.70 / 4]  # (last token - request start) / n: TTFT included
    itl = [(0.45 - 0.20) / 7, (0.70 - 0.25) / 3]  # one value per request
    assert gl["tpot_mean_s"] == pytest.approx(np.mean(tpot)) and gl["itl_mean_s"] == pytest.approx(np.mean(itl))
    assert gl["e2el_p50_s"] == pytest.approx(np.median([0.50, 0.80]))  # to the stream's end
    assert gl["tpot_mean_s"] != pytest.approx(vllm["tpot_mean_s"])
    assert gl["itl_p50_s"] != pytest.approx(vllm["itl_p50_s"])


def test_aiperf_and_mlperf_definitions():
    s = samples()
    ai = level_fields(s, DURATION, 8, Slo(), "aiperf")
    # TTFT to the first chunk with content (0.40 for the second request); the client's count of tokens
    assert ai["ttft_p50_s"] == pytest.approx(np.median([0.20, 0.40])) and ai["output_tokens_total"] == 15
    itl = [(0.50 - 0.20) / 7, (0.80 - 0.40) / 6]
    assert ai["itl_mean_s"] == pytest.approx(np.mean(itl)) == ai["tpot_mean_s"]
    ml = level_fields(s, DURATION, 8, Slo(), "mlperf")
    assert ml["request_throughput_rps"] == pytest.approx(1 / 1.6) and math.isnan(ml["itl_p50_s"])
    tpot = sorted([(0.50 - 0.20) / 7, (0.80 - 0.25) / 6])
    assert ml["tpot_p50_s"] == tpot[1] and ml["tpot_p99_s"] == tpot[1]  # nearest rank: sorted[floor(2 * p)]


def test_cached_prompt_tokens_come_from_the_server():
    rec = record(0, [0.1], ["a "], 0.2, {"completion_tokens": 1}, {"cache_n": 12})
    vllm_style = record(1, [0.1], ["a "], 0.2, {"completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 3}})
    s = [request_sample(r, WORDS, " ".join, None) for r in (rec, vllm_style, LOG[1])]
    assert [x["cached_prompt_tokens"] for x in s] == [12, 3, None]
    assert level_fields(s, 1.0, 1, Slo())["cached_prompt_tokens_total"] == 15
    assert level_fields(s[2:], 1.0, 1, Slo())["cached_prompt_tokens_total"] == -1  # the server does not say


def test_reference_check_on_ids_and_text():
    ids = RequestRecord(index=0, prompt_index=0, ok=True, end_s=0.3)
    ids.chunks = [Chunk(0.1, "x", [5, 6]), Chunk(0.2, "y", [7])]
    assert request_sample(ids, WORDS, " ".join, [5, 6, 9])["match_tokens"] == 2
    silent = record(1, [0.1], [""], 0.2, {"completion_tokens": 1})  # nothing to compare: not checked
    assert request_sample(silent, WORDS, " ".join, [5])["match_tokens"] == -1


class WordTokens:
    """A tokenizer over four words, each token's text the word and a space."""

    VOCAB = ["a", "b", "c", "d"]

    def encode(self, text, add_bos=True):
        return [self.VOCAB.index(w) for w in text.split()]

    def decode(self, ids):
        return "".join(self.VOCAB[i] + " " for i in ids)


def test_the_servers_token_where_it_left_the_reference():
    tok = WordTokens()
    ids = RequestRecord(index=0, prompt_index=0, ok=True, end_s=0.3)
    ids.chunks = [Chunk(0.1, "x", [0, 1]), Chunk(0.2, "y", [3])]
    assert server_token_at(ids, [0, 1, 2], 2, tok) == 3  # the id it returned
    text = record(1, [0.1, 0.2], ["a b ", "d c "], 0.3)
    assert server_token_at(text, [0, 1, 2], 2, tok) == 3  # the first token of its text beyond "a b "
    assert server_token_at(record(2, [0.1], ["a b "], 0.2), [0, 1, 2], 2, tok) is None  # nothing follows


def test_a_near_tie_is_counted_apart_from_a_divergence():
    tok = WordTokens()
    logs = [record(i, [0.1, 0.2], ["a b ", "d "], 0.3, {"completion_tokens": 3}) for i in range(4)]
    s = [request_sample(r, WORDS, tok.decode, [0, 1, 2]) for r in logs]
    assert [x["match_tokens"] for x in s] == [2, 2, 2, 2]
    s[0]["divergence_gap"], s[1]["divergence_gap"], s[2]["divergence_gap"] = 0.1, 0.49, 2.0  # s[3]: gap unknown
    f = level_fields(s, 1.0, 3, Slo())
    assert f["checked_requests"] == 4 and f["near_tie_requests"] == 2 and f["diverged_requests"] == 2


def test_the_reference_answer_ends_at_its_first_stop_token():
    """Past the reference's EOS, llama-server under ignore_eos had forbidden the token and taken
    another (SmolLM2: the reference's 21st token was <|im_end|>): a server equal to the reference up
    to there has not diverged, though it matched 20 of 32 tokens."""
    assert reference_answer([5, 6, 2, 7, 1], (1, 2)) == [5, 6]
    assert reference_answer([5, 6], (2,)) == [5, 6] and reference_answer([2, 5], (2,)) == []
    tok = WordTokens()
    whole = record(0, [0.1, 0.2], ["a b ", "d "], 0.3, {"completion_tokens": 3})
    s = [request_sample(whole, WORDS, tok.decode, reference_answer([0, 1, 9, 2], (9,))),
         request_sample(whole, WORDS, tok.decode, [0, 1, 2])]
    assert [(x["match_tokens"], x["reference_tokens"]) for x in s] == [(2, 2), (2, 3)]
    f = level_fields(s, 1.0, 3, Slo())
    assert f["checked_requests"] == 2 and f["diverged_requests"] == 1 and f["near_tie_requests"] == 0


@pytest.mark.parametrize("profile,limit,expected_best,expected_tried", [
    ("concurrency", 64, 5, [1, 2, 4, 8, 6, 5]),
    ("concurrency", 4, 4, [1, 2, 4]),
    ("rate", 64, 5.5, [1, 2, 4, 8, 6, 5, 5.5]),
])
def test_find_max_doubles_then_bisects(profile, limit, expected_best, expected_tried):
    result = find_max(FindMax(profile, 1, limit), lambda level: level <= 5.5)
    assert result.best == expected_best and [lv for lv, _ in result.tried] == expected_tried


def test_find_max_stops_when_the_server_is_gone():
    result = find_max(FindMax("concurrency", 1, 64), lambda level: None if level > 2 else True)
    assert result.best == 2 and [lv for lv, _ in result.tried] == [1, 2]
    assert find_max(FindMax("concurrency", 1, 64), lambda level: False).best is None
