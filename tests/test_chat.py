"""`bench chat` driven through a pseudo-terminal, as a person would use it."""

import sys

import numpy as np
import pandas as pd
import pexpect
import pytest

import backends
from conftest import rel_err, require_backend
from engine.cli.chat import ChatSession


def spawn(*args, timeout=120):
    child = pexpect.spawn(sys.executable, ["-m", "engine", "chat", *args], encoding="utf-8", timeout=timeout)
    child.expect(r"/help for commands")
    child.expect_exact(">>> ")
    return child


def test_two_turns_switch_framework_stats_save_quit(tiny_f32, tmp_path):
    c = spawn("-f", "numpy", "-m", tiny_f32, "--max-tokens", "6", "--context", "200")
    c.sendline("hello there")
    c.expect(r"\[numpy f32 cpu\] TTFT \d+ ms \| decode [\d.]+ tok/s \| \d+ tokens \| RSS \d+ MB")
    c.expect_exact(">>> ")
    c.sendline("/framework torch")
    c.expect(r"now on torch \(f32, cpu\); conversation kept")
    c.expect_exact(">>> ")
    c.sendline("and again")
    c.expect(r"\[torch f32 cpu\] TTFT")
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect(r"numpy.*\n.*torch")
    c.expect_exact(">>> ")
    out = tmp_path / "chat.csv"
    c.sendline(f"/save {out}")
    c.expect(r"saved 2 row\(s\)")
    c.expect_exact(">>> ")
    c.sendline("/temp -1")
    c.expect("needs a number")
    c.sendline("/quit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    df = pd.read_csv(out)
    assert df.framework.tolist() == ["numpy", "torch"] and (df.gen_tokens > 0).all()
    assert df.prompt_tokens.iloc[1] > df.prompt_tokens.iloc[0]  # the second turn carries the first


def test_context_overflow_drops_oldest_turns(tiny_f32):
    c = spawn("-f", "numpy", "-m", tiny_f32, "--max-tokens", "4", "--context", "90")
    for _ in range(4):
        c.sendline("the the the the the the the the the the")
        c.expect(r"TTFT")
        c.expect_exact(">>> ")
    c.sendline("the the the the the the the the the the")
    c.expect(r"context full: dropped the \d+ oldest turn")
    c.expect_exact(">>> ")
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_answers_on_the_default_model():
    c = spawn("-f", "numpy", "--max-tokens", "16")
    c.sendline("What is the capital of France?")
    c.expect("Paris")
    c.expect(r"decode [\d.]+ tok/s")
    c.expect_exact(">>> ")
    c.sendline("/reset")
    c.expect("cleared")
    c.sendline("/quit")
    c.expect(pexpect.EOF)


@pytest.mark.parametrize("framework", [n for n in backends.names() if "cpu" in backends.get(n).devices])
def test_every_available_backend_chats_on_the_default_model(framework):
    import io

    require_backend(framework)
    session = ChatSession("default", framework, "auto", "auto", context=256, max_tokens=8, temperature=0.0, seed=0)
    out = io.StringIO()
    first = session.reply("What is the capital of France?", out=out)
    second = session.reply("And of Germany?", out=out)
    assert first.gen.tokens and second.gen.tokens and first.gen.ttft_s > 0
    assert second.prompt_tokens > first.prompt_tokens + len(first.gen.tokens) - 1  # the conversation is carried
    assert "Paris" in out.getvalue() or framework == "llamacpp"  # llama.cpp may take another near-tie path


def test_ctrl_c_stops_a_reply_and_returns_to_the_prompt():
    c = spawn("-f", "numpy", "--max-tokens", "400", "--temperature", "0.8")
    c.sendline("Tell me a very long story about a dragon.")
    c.expect_exact("dragon.\r\n")  # the echo of the input
    c.expect(r"\w+ \w+ \w+ \w+")  # some words of the reply have streamed
    c.sendintr()
    c.expect_exact("[stopped]")
    c.expect(r"\d+ tokens")
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect(r"numpy")
    c.sendline("/quit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


class PrefillRecorder:
    """The backend the engine drives, noting each prefill's length and logits (its own decode
    steps, which may go through its prefill, are not seen)."""

    def __init__(self, backend):
        self.backend, self.prefills = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def prefill_batch(self, prompts):
        logits = self.backend.prefill_batch(prompts)
        self.prefills.append((len(prompts[0]), np.array(logits[0])))
        return logits


@pytest.mark.parametrize("framework,precision", [("numpy", "auto"), ("torch", "f32")])
def test_kv_reused_over_three_turns_equals_a_fresh_prefill(framework, precision):
    """Each turn prefills only what the cache lacks; its logits must equal a fresh prefill of the
    whole conversation, after a reply a stop token ended (turn 1) and one --max-tokens cut (turn 2)."""
    import io

    require_backend(framework)
    max_tokens = 12
    session = ChatSession("default", framework, precision, "auto", context=256, max_tokens=max_tokens,
                          temperature=0.0, seed=0)
    recorder = session.engine.backend = PrefillRecorder(session.backend)
    turns = [session.reply(text, out=io.StringIO()) for text in
             ("What is the capital of France?", "Write a long poem about the sea.", "Thank you!")]
    assert len(turns[0].gen.tokens) < max_tokens, "turn 1 should end on a stop token"
    assert len(turns[1].gen.tokens) == max_tokens, "turn 2 should be cut by --max-tokens"
    assert [fed < t.prompt_tokens for (fed, _), t in zip(recorder.prefills, turns)] == [False, True, True], \
        "turns 2 and 3 should reuse the cache"
    for i, ((_, reused), turn) in enumerate(zip(recorder.prefills, turns), 1):
        session.backend.reset()
        assert rel_err(reused, session.backend.prefill(turn.prompt_ids)) < 1e-4, f"turn {i}"
