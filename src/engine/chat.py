"""`bench chat`: a multi-turn conversation through the same InferenceEngine as `bench run`, with
one status line of live metrics per reply and slash commands for spot checks."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import psutil

import backends
from backends.base import Backend, LoadOptions
from engine.engine import GenerationConfig, InferenceEngine
from engine.errors import BenchError, InputError
from engine.gguf_model import ModelSpec
from engine.models import resolve_model
from engine.tokenizer import Tokenizer

HELP = """commands:
  /framework NAME  switch backend, keeping the conversation
  /temp T          sampling temperature (0: greedy)
  /reset           clear the conversation and the KV cache
  /stats           a table of this session's turns
  /save FILE.csv   append the turns' metrics as result rows
  /help            this text
  /quit            leave (Ctrl-D too); Ctrl-C stops a reply"""


@dataclass
class Turn:
    framework: str
    precision: str
    device: str
    prompt_tokens: int
    tokens: list[int]
    ttft_s: float
    itl_s: list[float]
    rss_bytes: int

    @property
    def decode_tps(self) -> float:
        return len(self.itl_s) / sum(self.itl_s) if self.itl_s else math.nan


class ChatSession:
    def __init__(self, model: str, framework: str, precision: str, device: str, context: int, max_tokens: int,
                 temperature: float, seed: int):
        self.spec = ModelSpec.open(resolve_model(model))
        self.tok = Tokenizer.from_spec(self.spec)
        self.context = min(context, self.spec.config.context_length)
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.precision_request, self.device_request = precision, device
        self.messages: list[dict] = []
        self.turns: list[Turn] = []
        self.backend: Backend | None = None
        self.switch(framework)

    def switch(self, framework: str) -> None:
        cls = backends.get(framework)
        avail = cls.availability()
        if not avail.ok:
            raise BenchError(f"framework {framework} is unavailable: {avail.reason}")
        precision = cls.resolve_precision(self.spec, self.precision_request if self.backend is None else "auto")
        device = cls.resolve_device(self.device_request if self.backend is None else "auto")
        backend = cls()
        backend.load(self.spec, LoadOptions(precision=precision, device=device, max_seq_len=self.context))
        if self.backend is not None:
            self.backend.close()
        self.backend, self.framework, self.precision, self.device = backend, framework, precision, device
        self.engine = InferenceEngine(backend)
        self.cached: list[int] | None = []  # token ids now in the KV cache; None: unknown

    def reset(self) -> None:
        self.messages.clear()
        self.backend.reset()
        self.cached = []

    def _prompt(self) -> tuple[list[int], int]:
        """The conversation's ids, dropping the oldest turns while it would overflow the context."""
        dropped = 0
        while True:
            ids = self.tok.encode(self.tok.apply_chat_template(self.messages, add_generation_prompt=True))
            if len(ids) + self.max_tokens <= self.context or len(self.messages) <= 1:
                break
            del self.messages[: 2 if len(self.messages) > 2 else 1]
            dropped += 1
        if len(ids) >= self.context:
            raise InputError(f"the message alone ({len(ids)} tokens) does not fit the context of {self.context}")
        return ids, dropped

    def reply(self, text: str, out=sys.stdout) -> Turn | None:
        """Stream a reply; Ctrl-C stops it (the partial reply is kept, or the turn dropped if
        nothing was generated yet) and returns None only when nothing was generated."""
        self.messages.append({"role": "user", "content": text})
        try:
            return self._reply(out)
        except KeyboardInterrupt:  # before the first token: forget the unanswered turn
            self.messages.pop()
            self.cached = None
            out.write(" [stopped]\n")
            return None

    def _reply(self, out) -> Turn:
        ids, dropped = self._prompt()
        if dropped:
            out.write(f"[context full: dropped the {dropped} oldest turn(s)]\n")
        budget = min(self.max_tokens, self.context - len(ids))
        # reuse the KV cache when the new prompt extends what it holds
        reuse = self.cached is not None and len(self.cached) < len(ids) and ids[: len(self.cached)] == self.cached
        feed = ids[len(self.cached):] if reuse else ids
        cfg = GenerationConfig(max_new_tokens=budget, temperature=self.temperature, seed=self.seed,
                               stop_ids=self.tok.stop_ids)
        tokens, itl, ttft, text_so_far = [], [], math.nan, ""
        self.cached = None  # unknown until the reply completes
        try:
            for ev in self.engine.stream(feed, cfg, reset=not reuse):
                tokens.append(ev.token)
                if ev.index == 0:
                    ttft = ev.dt_ns / 1e9
                else:
                    itl.append(ev.dt_ns / 1e9)
                full = self.tok.decode(tokens)
                out.write(full[len(text_so_far):])
                out.flush()
                text_so_far = full
            self.cached = ids + tokens[:-1] if tokens else ids
        except KeyboardInterrupt:
            if not tokens:
                raise
            out.write(" [stopped]")
        out.write("\n")
        self.messages.append({"role": "assistant", "content": text_so_far})
        turn = Turn(self.framework, self.precision, self.device, len(ids), tokens, ttft, itl,
                    psutil.Process().memory_info().rss)
        self.turns.append(turn)
        return turn


def status_line(t: Turn) -> str:
    return (f"[{t.framework} {t.precision} {t.device}] TTFT {t.ttft_s * 1e3:.0f} ms | decode {t.decode_tps:.1f} tok/s | "
            f"{len(t.tokens)} tokens | RSS {t.rss_bytes / 1e6:.0f} MB")


def stats_table(turns: list[Turn]):
    from rich.table import Table

    t = Table(header_style="bold")
    for c in ("turn", "framework", "precision", "prompt", "generated", "TTFT ms", "decode tok/s"):
        t.add_column(c)
    for i, turn in enumerate(turns, 1):
        t.add_row(str(i), turn.framework, turn.precision, str(turn.prompt_tokens), str(len(turn.tokens)),
                  f"{turn.ttft_s * 1e3:.0f}", f"{turn.decode_tps:.1f}")
    return t


def save_turns(session: ChatSession, path: str) -> int:
    from engine.results import BenchmarkResult, ResultWriter, new_run_id, provenance
    from engine.stats import percentile

    run_id = new_run_id()
    rows = []
    for i, t in enumerate(session.turns):
        rows.append(BenchmarkResult(
            run_id=run_id, cell_id=f"chat-{run_id}-{i}", repeat=0, framework=t.framework, precision=t.precision,
            device=t.device, model=session.spec.name, model_size=session.spec.size_label, iterations=1,
            prompt_tokens=t.prompt_tokens, gen_tokens=len(t.tokens), ttft_s=t.ttft_s, first_token_time=t.ttft_s,
            prefill_tps=t.prompt_tokens / t.ttft_s, decode_tps=t.decode_tps, itl_p50_s=percentile(t.itl_s, 50),
            itl_p90_s=percentile(t.itl_s, 90), itl_p99_s=percentile(t.itl_s, 99), sampled_rss_peak_bytes=t.rss_bytes,
            tokens=" ".join(map(str, t.tokens)), optimization_level="chat", itl_s=t.itl_s, **provenance()))
    ResultWriter(path).write(rows)
    return len(rows)


def run_chat(args) -> int:
    from engine import display

    session = ChatSession(args.model, args.framework, args.precision, args.device, args.context, args.max_tokens,
                          args.temperature, args.seed)
    print(f"chatting with {session.spec.name} on {session.framework} ({session.precision}, {session.device}); "
          f"/help for commands")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if not line.startswith("/"):
            turn = session.reply(line)
            if turn is not None:
                print(status_line(turn))
            continue
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if cmd == "/quit":
                return 0
            elif cmd == "/help":
                print(HELP)
            elif cmd == "/reset":
                session.reset()
                print("[conversation and KV cache cleared]")
            elif cmd == "/temp":
                session.temperature = float(arg)
                if session.temperature < 0:
                    raise ValueError
                print(f"[temperature {session.temperature:g}]")
            elif cmd == "/framework":
                session.switch(arg)
                print(f"[now on {session.framework} ({session.precision}, {session.device}); conversation kept]")
            elif cmd == "/stats":
                display.stdout.print(stats_table(session.turns))
            elif cmd == "/save":
                n = save_turns(session, arg)
                print(f"[saved {n} row(s) to {arg}]")
            else:
                print(f"unknown command {cmd}; /help lists them")
        except ValueError:
            print(f"{cmd} needs a number >= 0, got {arg!r}")
        except BenchError as e:
            print(f"error: {e}")
