"""`bench serve`: start each server on the same weights, drive every load level at it, write one
ServeResult per (server, level), stop it. A server that is unavailable, fails to start, dies or
stops answering becomes rows with a status and its log's last lines; the next server still runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import BenchError, InputError
from engine.model.spec import ModelSpec
from engine.model.tokenizer import Tokenizer
from engine.results.rows import provenance
from engine.serve.load import Level, LoadSpec, run_level
from engine.serve.metrics import Slo, level_fields, request_sample
from engine.serve.process import ManagedServer, ServerFailed
from engine.serve.rows import ServeResult
from engine.serve.servers import ServerKind


@dataclass(frozen=True)
class Endpoint:
    """A running server given by URL: nothing is started or stopped."""

    url: str
    api_key_env: str = ""

    @property
    def name(self) -> str:
        return "url:" + self.url.split("://", 1)[-1].rstrip("/")

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class ServePlan:
    model: str
    servers: list[Any]  # ServerKind or Endpoint
    levels: list[Level]
    load: LoadSpec = field(default_factory=LoadSpec)
    prompt_tokens: int = 64
    gen_tokens: int = 32
    dataset: str = ""
    slo: Slo = field(default_factory=Slo)
    threads: int = 0
    startup_timeout_s: float = 600.0
    check_prompts: int = 4  # distinct prompts checked against the reference (0: none)
    served_model: str = ""
    log_dir: Path = Path("results/serve-logs")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what the server sees, as our tokenizer counts it
    text: str


def load_prompts(plan: ServePlan, spec: ModelSpec, tok: Tokenizer, level: int) -> list[Prompt]:
    """The prompts of level `level` (-1: the warm-ups). Seeded prompts are fresh for every level,
    so a server's prefix cache never serves a later level from an earlier one's prompts; the same
    level gets the same prompts at every server."""
    if plan.dataset:
        try:
            lines = [json.loads(ln) for ln in Path(plan.dataset).read_text().splitlines() if ln.strip()]
            texts = [str(d["prompt"] if isinstance(d, dict) else d) for d in lines]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"--dataset {plan.dataset}: need JSON lines with a \"prompt\" ({e})") from None
        if not texts:
            raise InputError(f"--dataset {plan.dataset}: no prompts")
        return [Prompt(tok.encode(t), t) for t in texts]
    from engine.generate.prompts import seeded_prompt

    n = max(plan.load.warmup, 1) if level < 0 else plan.load.requests if not plan.load.duration_s else 256
    first = plan.load.seed + 1_000_000 * (level + 1)
    ids = [seeded_prompt(spec, plan.prompt_tokens, first + i) for i in range(n)]
    return [Prompt(i, tok.decode(i)) for i in ids]


class Reference:
    """Greedy tokens of the numpy reference, per prompt ids, from the one reference cache
    (engine.measure.reference); the reference loads here only for prompts it has not answered."""

    def __init__(self, spec: ModelSpec, gen_tokens: int, max_prompt: int):
        self.spec, self.gen_tokens = spec, gen_tokens
        self.max_seq_len = max_prompt + gen_tokens + 8
        self.backend = None

    def tokens(self, ids: list[int]) -> list[int]:
        from engine.measure.reference import greedy_tokens

        return greedy_tokens(self.spec.path, ids, self.gen_tokens, self._open)

    def _open(self):
        if self.backend is None:
            import backends

            self.backend = backends.open_backend(backends.reference().name, self.spec,
                                                 max_seq_len=self.max_seq_len).backend
        return self.backend


def level_id(server: str, model: str, level: Level, plan: ServePlan) -> str:
    what = [server, os.path.basename(model), level.profile, level.value, plan.prompt_tokens, plan.gen_tokens,
            plan.dataset, plan.load.requests, plan.load.duration_s, plan.load.seed]
    return hashlib.sha1(json.dumps(what, default=str).encode()).hexdigest()[:12]


def run_serve(plan: ServePlan, run_id: str, on_row: Callable[[ServeResult], None],
              on_status: Callable[[str], None] = lambda s: None) -> list[ServeResult]:
    spec = ModelSpec.open(plan.model)
    tok = Tokenizer.from_spec(spec)
    prompts = {lv: load_prompts(plan, spec, tok, lv) for lv in range(-1, len(plan.levels))}
    longest = max(len(p.ids) if plan.dataset else len(tok.encode(p.text)) for ps in prompts.values() for p in ps)
    reference = Reference(spec, plan.gen_tokens, longest) if plan.check_prompts else None
    base = dict(run_id=run_id, model=spec.name, model_size=spec.size_label, gen_tokens=plan.gen_tokens,
                warmup_requests=plan.load.warmup, **provenance())
    rows: list[ServeResult] = []
    for server in plan.servers:
        for row in _serve_one(server, plan, spec, tok, prompts, longest, reference, base, on_status):
            rows.append(row)
            on_row(row)
    return rows


def _failed_rows(server: str, plan: ServePlan, levels: list[Level], base: dict, status: str, error: str,
                 **info: Any) -> list[ServeResult]:
    return [ServeResult(**base, **info, server=server, status=status, error=error[:1000],
                        level_id=level_id(server, plan.model, lv, plan), **_level_info(lv)) for lv in levels]


def _level_info(level: Level) -> dict[str, Any]:
    if level.profile == "concurrency":
        return {"profile": "concurrency", "concurrency": int(level.value)}
    return {"profile": "rate", "rate_rps": level.value}


def _serve_one(server, plan, spec, tok, prompts, longest, reference, base, on_status):
    is_url = isinstance(server, Endpoint)
    name = server.name
    managed = None
    info: dict[str, Any] = {}
    try:
        if is_url:
            url, headers, kind = server.url.rstrip("/"), server.headers(), None
            info.update(server_url=url, weights="(remote)")
        else:
            kind: ServerKind = server
            reason = kind.availability()
            if reason:
                yield from _failed_rows(name, plan, plan.levels, base, "unavailable", reason)
                return
            on_status(f"{name}: preparing")
            kind.prepare()
            weights = plan.model
            if kind.checkpoint:
                from engine.serve.export import export_checkpoint

                weights = str(export_checkpoint(plan.model))
                on_status(f"{name}: checkpoint exported from {spec.name}: {weights}")
            context = min(longest + plan.gen_tokens + 64, spec.config.context_length)
            log = plan.log_dir / f"{base['run_id']}-{name}.log"
            managed = ManagedServer(name, kind.argv(weights, plan.threads, context), log, kind.health_path, kind.env())
            info.update(server_version=kind.version(), weights=weights, server_log=str(log))
            on_status(f"{name}: starting ({shlex.join(managed.argv)})")
            try:
                startup = managed.start(plan.startup_timeout_s)
            except ServerFailed as e:
                info["server_command"] = shlex.join(managed.argv)
                yield from _failed_rows(name, plan, plan.levels, base, e.status, str(e), **info)
                return
            url, headers = managed.url, {}
            info.update(server_url=url, startup_s=startup, server_command=shlex.join(managed.argv))
            on_status(f"{name}: healthy after {startup:.1f} s on {url}")
        model_name = plan.served_model or (kind.model_name(weights) if kind else "") or _served_model(url, headers)
        token_ids = bool(kind and kind.token_ids) and not plan.dataset
        fields_ = kind.request_fields(plan.gen_tokens, tok.eos_id) if kind else {}
        info.update(ignore_eos=bool(kind and kind.ignore_eos), extra={"request_fields": fields_},
                    prompt_source="dataset" if plan.dataset else "token_ids" if token_ids else "text",
                    prompt_tokens=plan.prompt_tokens if not plan.dataset else
                    round(sum(len(p.ids) for p in prompts[0]) / len(prompts[0])))

        def body_for(level: int):
            def body(i: int) -> tuple[int, dict[str, Any]]:
                ps = prompts[level if i >= 0 else -1]
                k = i % len(ps)
                return k, {"model": model_name, "prompt": ps[k].ids if token_ids else ps[k].text,
                           "max_tokens": plan.gen_tokens, "temperature": 0.0, "stream": True,
                           "stream_options": {"include_usage": True}, **fields_}
            return body

        alive = managed.alive if managed else (lambda: True)
        levels = list(enumerate(plan.levels))
        while levels:
            index, level = levels.pop(0)
            on_status(f"{name}: {level.profile} {level.value:g}")
            records, duration = run_level(url, level, plan.load, body_for(index), headers, alive)
            samples = []
            for rec in records:
                p = prompts[index][rec.prompt_index]
                ref = (reference.tokens(p.ids if token_ids or plan.dataset else tok.encode(p.text))
                       if reference is not None and rec.prompt_index < plan.check_prompts else None)
                samples.append(request_sample(rec, tok.encode, tok.decode, ref))
            f = level_fields(samples, duration, plan.gen_tokens, plan.slo)
            status, error, flags = "ok", "", []
            died = managed is not None and not managed.alive()
            if died:
                status, error = "crash", managed.exit_reason()
            elif not f["requests_ok"]:
                timeouts = all(s["error"].startswith("timeout") for s in samples)
                status = "timeout" if timeouts else "error"
                error = (samples[0]["error"] if samples else "no requests completed")
            if status == "ok" and f["requests_failed"]:
                flags.append("some_failed")
                error = next(s["error"] for s in samples if not s["ok"])
            if f.get("diverged_requests"):
                flags.append("diverged")
            yield ServeResult(**base, **info, **_level_info(level), **f, server=name, status=status, error=error,
                              flags=tuple(flags), level_id=level_id(name, plan.model, level, plan),
                              requests=samples)
            if status in ("crash", "timeout"):  # the server is gone or hung: the rest cannot run
                yield from _failed_rows(name, plan, [lv for _, lv in levels], base, status, f"not run: {error}", **info)
                return
    except BenchError as e:
        yield from _failed_rows(name, plan, plan.levels, base, "unavailable" if e.exit_code == 3 else "error",
                                str(e), **info)
    finally:
        if managed is not None:
            managed.stop()


def _served_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    try:
        data = httpx.get(url + "/v1/models", headers=headers, timeout=10).json().get("data") or []
        return str(data[0]["id"]) if data else ""
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return ""
