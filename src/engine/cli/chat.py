"""`bench chat`: a multi-turn conversation through the same InferenceEngine as `bench run`, with
one status line of live metrics per reply and slash commands for spot checks."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import psutil

import backends
from engine.generate.backend import Backend
from engine.generate.engine import Generation, GenerationConfig, InferenceEngine
from engine.errors import BenchError, InputError
from engine.model.spec import ModelSpec
from engine.model.catalog import resolve_model
from engine.model.tokenizer import Tokenizer

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
    prompt_ids: list[int]  # the whole conversation fed so far
    gen: Generation
    rss_bytes: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


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
        first = self.backend is None
        opened = backends.open_backend(framework, self.spec, self.precision_request if first else "auto",
                                       self.device_request if first else "auto", max_seq_len=self.context)
        if self.backend is not None:
            self.backend.close()
        self.backend, self.framework = opened.backend, framework
        self.precision, self.device = opened.precision, opened.info.device
        self.engine = InferenceEngine(self.backend)
        self.cached: list[int] | None = []  # token ids now in the KV cache; None: unknown

    def reset(self) -> None:
        self.messages.clear()
        self.backend.reset()
        self.cached = []

    def _prompt(self) -> tuple[list[int], int]:
        """The conversation's ids, dropping the oldest turns while it would overflow the context."""
        dropped = 0
        while True:
            ids = self.tok.encode_chat(self.messages)
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
        gen, text_so_far = Generation(), ""
        self.cached = None  # unknown until the reply completes
        try:
            for ev in self.engine.stream(feed, cfg, reset=not reuse):
                gen.add(ev)
                full = self.tok.decode(gen.tokens)
                out.write(full[len(text_so_far):])
                out.flush()
                text_so_far = full
            self.cached = ids + fed_tokens(gen.tokens, budget)
        except KeyboardInterrupt:
            if not gen.tokens:
                raise
            out.write(" [stopped]")
        out.write("\n")
        self.messages.append({"role": "assistant", "content": text_so_far})
        turn = Turn(self.framework, self.precision, self.device, ids, gen, psutil.Process().memory_info().rss)
        self.turns.append(turn)
        return turn


def fed_tokens(generated: list[int], budget: int) -> list[int]:
    """The generated ids a reply left in the KV cache. InferenceEngine.stream decodes each token it
    yields before it samples the next: a reply a stop id ended has fed every token it yielded; one
    cut at `budget` tokens has fed all but the last (sampled, never decoded)."""
    return generated if len(generated) < budget else generated[:-1]


def status_line(t: Turn) -> str:
    return (f"[{t.framework} {t.precision} {t.device}] TTFT {t.gen.ttft_s * 1e3:.0f} ms | "
            f"decode {t.gen.decode_tps:.1f} tok/s | {len(t.gen.tokens)} tokens | RSS {t.rss_bytes / 1e6:.0f} MB")


def stats_table(turns: list[Turn]):
    from rich.table import Table

    t = Table(header_style="bold")
    for c in ("turn", "framework", "precision", "prompt", "generated", "TTFT ms", "decode tok/s"):
        t.add_column(c)
    for i, turn in enumerate(turns, 1):
        t.add_row(str(i), turn.framework, turn.precision, str(turn.prompt_tokens), str(len(turn.gen.tokens)),
                  f"{turn.gen.ttft_s * 1e3:.0f}", f"{turn.gen.decode_tps:.1f}")
    return t


def save_turns(session: ChatSession, path: str) -> int:
    from engine.measure.runner import timing_fields
    from engine.results.rows import BenchmarkResult, new_run_id, provenance
    from engine.results.writers import ResultWriter

    run_id = new_run_id()
    rows = [BenchmarkResult(
        run_id=run_id, cell_id=f"chat-{run_id}-{i}", repeat=0, framework=t.framework, precision=t.precision,
        device=t.device, model=session.spec.name, model_size=session.spec.size_label, iterations=1,
        sampled_rss_peak_bytes=t.rss_bytes, optimization_level="chat", **timing_fields(t.gen, [t.prompt_ids]),
        **provenance()) for i, t in enumerate(session.turns)]
    ResultWriter(path).write(rows)
    return len(rows)


def run_chat(model: str, framework: str, precision: str, device: str, context: int, max_tokens: int,
             temperature: float, seed: int) -> int:
    from engine.cli import display

    session = ChatSession(model, framework, precision, device, context, max_tokens, temperature, seed)
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
