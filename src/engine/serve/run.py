"""`bench serve`: start each server on the same weights, drive every load level at it (or search
for the highest level that meets an SLO), write one ServeResult per (server, level), stop it. A
server that is unavailable, fails to start, dies or stops answering becomes rows with a status and
its log's last lines; the next server still runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.errors import BenchError
from engine.model.spec import ModelSpec
from engine.model.tokenizer import Tokenizer
from engine.results.rows import provenance
from engine.serve.capacity import client_capacity
from engine.serve.findmax import FindMax, find_max
from engine.serve.load import Level, LevelRun, LoadSpec, run_level
from engine.serve.metrics import Slo, level_fields, reference_answer, request_sample, server_token_at
from engine.serve.process import ManagedServer, ServerFailed
from engine.serve.prompts import PromptSource
from engine.serve.reference import Reference
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
    metrics_as: str = "vllm"
    parallel: int = 0  # server slots (llama-server --parallel); 0: the highest concurrency of the run
    find_max: FindMax | None = None
    done_levels: frozenset[str] = frozenset()  # level ids --resume found ok in the file: not run again
    recalibrate: bool = False  # measure the client's capacity again (--calibrate)
    ignore_eos: bool = False  # --url endpoints: send `ignore_eos` (started servers get their kind's fields)

    @property
    def slots(self) -> int:
        if self.parallel:
            return self.parallel
        top = [lv.value for lv in self.levels if lv.profile == "concurrency"]
        if self.find_max and self.find_max.profile == "concurrency":
            top.append(self.find_max.limit)
        return int(max(top, default=1))


def level_id(server: str, model: str, level: Level, plan: ServePlan) -> str:
    what = [server, os.path.basename(model), level.profile, level.value, plan.prompt_tokens, plan.gen_tokens,
            plan.dataset, plan.load.requests, plan.load.duration_s, plan.load.seed, plan.metrics_as]
    return hashlib.sha1(json.dumps(what, default=str).encode()).hexdigest()[:12]


@dataclass
class Context:
    """What every server of the run shares."""

    plan: ServePlan
    spec: ModelSpec
    tok: Tokenizer
    prompts: PromptSource
    reference: Reference | None
    base: dict[str, Any]
    on_status: Callable[[str], None]

    def failed_rows(self, server: str, levels: list[Level], status: str, error: str, **info: Any) -> list[ServeResult]:
        return [ServeResult(**self.base, **info, server=server, status=status, error=error[:1000],
                            level_id=level_id(server, self.plan.model, lv, self.plan), **_level_info(lv))
                for lv in levels]


def run_serve(plan: ServePlan, run_id: str, on_row: Callable[[ServeResult], None],
              on_status: Callable[[str], None] = lambda s: None) -> list[ServeResult]:
    spec = ModelSpec.open(plan.model)
    tok = Tokenizer.from_spec(spec)
    prompts = PromptSource(spec, tok, plan.prompt_tokens, plan.load.seed, plan.dataset)
    reference = Reference(spec, plan.gen_tokens, _longest_checked(plan, prompts, tok)) if plan.check_prompts else None
    base = dict(run_id=run_id, model=spec.name, model_size=spec.size_label, gen_tokens=plan.gen_tokens,
                warmup_requests=plan.load.warmup, **provenance(), **client_capacity(plan.recalibrate, on_status))
    ctx = Context(plan, spec, tok, prompts, reference, base, on_status)
    rows: list[ServeResult] = []
    for server in plan.servers:
        for row in _serve_one(ctx, server):
            rows.append(row)
            on_row(row)
    return rows


def _longest_checked(plan: ServePlan, prompts: PromptSource, tok: Tokenizer) -> int:
    """The longest prompt the reference may be asked for: a text prompt is checked as our tokenizer
    reads the text back, which can be far longer than its seeded ids (16 levels cover a --find-max)."""
    levels = range(max(len(plan.levels), 16))
    texts = [len(tok.encode(prompts.get(lv, i).text)) for lv in levels for i in range(plan.check_prompts)]
    return max([prompts.max_tokens, *texts])


def _level_info(level: Level) -> dict[str, Any]:
    if level.profile == "concurrency":
        return {"profile": "concurrency", "concurrency": int(level.value)}
    return {"profile": "rate", "rate_rps": level.value}


@dataclass
class Session:
    """One server under load: where it answers and how requests to it are made."""

    name: str
    url: str
    headers: dict[str, str]
    kind: ServerKind | None  # None for --url
    managed: ManagedServer | None
    info: dict[str, Any]
    model_name: str = ""
    token_ids: bool = False
    fields: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.managed.alive() if self.managed else True


def _start(ctx: Context, kind: ServerKind) -> tuple[Session | None, list[ServeResult]]:
    """Start a server kind; (its session, []) or (None, the rows that say why it did not start)."""
    plan, name = ctx.plan, kind.name
    reason = kind.availability()
    if reason:
        return None, ctx.failed_rows(name, plan.levels, "unavailable", reason)
    ctx.on_status(f"{name}: preparing")
    kind.prepare()
    weights = plan.model
    if kind.checkpoint:
        from engine.serve.export import export_checkpoint

        weights = str(export_checkpoint(plan.model))
        ctx.on_status(f"{name}: checkpoint exported from {ctx.spec.name}: {weights}")
    # a server that tokenizes our text may read it as far more tokens than its ids: the model's whole context
    context = min(ctx.prompts.max_tokens + plan.gen_tokens + 64, ctx.spec.config.context_length) if kind.token_ids \
        else ctx.spec.config.context_length
    log = plan.log_dir / f"{ctx.base['run_id']}-{name}.log"
    managed = ManagedServer(name, kind.argv(weights, plan.threads, context, plan.slots), log, kind.health_path,
                            kind.env())
    info: dict[str, Any] = dict(server_version=kind.version(), weights=weights, server_log=str(log),
                                server_command=shlex.join(managed.argv))
    ctx.on_status(f"{name}: starting ({info['server_command']})")
    try:
        startup = managed.start(plan.startup_timeout_s)
    except ServerFailed as e:
        return None, ctx.failed_rows(name, plan.levels, e.status, str(e), **info)
    info.update(server_url=managed.url, startup_s=startup)
    ctx.on_status(f"{name}: healthy after {startup:.1f} s on {managed.url}")
    session = Session(name, managed.url, {}, kind, managed, info, model_name=kind.model_name(weights),
                      token_ids=kind.token_ids)
    return session, []


def _connect(ctx: Context, server: Endpoint) -> Session:
    url = server.url.rstrip("/")
    session = Session(server.name, url, server.headers(), None, None, dict(server_url=url, weights="(remote)"))
    session.model_name = _served_model(url, session.headers)
    session.token_ids = _accepts_token_ids(session, ctx.tok.encode("Hello"))  # a prompt no level uses
    return session


def _configure(ctx: Context, s: Session) -> None:
    plan = ctx.plan
    s.model_name = plan.served_model or s.model_name or _served_model(s.url, s.headers)
    if s.kind:
        s.fields, forced = s.kind.request_fields(plan.gen_tokens, ctx.tok.eos_id), s.kind.ignore_eos
    else:  # an unknown server: vLLM, llama-server and SGLang take `ignore_eos`, others may refuse it
        s.fields, forced = ({"ignore_eos": True} if plan.ignore_eos else {}), plan.ignore_eos
    s.info.update(ignore_eos=forced, extra={"request_fields": s.fields},
                  prompt_source=("dataset_ids" if plan.dataset else "token_ids") if s.token_ids else
                  ("dataset" if plan.dataset else "text"),
                  prompt_tokens=plan.prompt_tokens if not plan.dataset else
                  round(sum(map(len, ctx.prompts.row_ids)) / len(ctx.prompts.row_ids)))


def _body_for(ctx: Context, s: Session, level: int):
    def body(i: int) -> tuple[int, dict[str, Any]]:
        index = i if i >= 0 else -1 - i
        p = ctx.prompts.get(level, index, warmup=i < 0)
        return index, {"model": s.model_name, "prompt": p.ids if s.token_ids else p.text,
                       "max_tokens": ctx.plan.gen_tokens, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}, **s.fields}
    return body


def _samples(ctx: Context, s: Session, index: int, run: LevelRun) -> list[dict[str, Any]]:
    tok, ref = ctx.tok, ctx.reference
    samples = []
    for rec in run.records:
        checked = ref is not None and rec.prompt_index < ctx.plan.check_prompts
        p = ctx.prompts.get(index, rec.prompt_index) if checked else None
        ids = (p.ids if s.token_ids else tok.encode(p.text)) if p is not None else None
        expected = reference_answer(ref.tokens(ids), tok.stop_ids) if ids is not None else None
        sample = request_sample(rec, lambda t: len(tok.encode(t, add_bos=False)), tok.decode, expected)
        k = sample["match_tokens"]
        if expected is not None and 0 <= k < min(len(expected), sample["client_tokens"]):
            token = server_token_at(rec, expected, k, tok)
            if token is not None:
                sample["divergence_gap"] = ref.gap(ids + expected[:k], token)
        samples.append(sample)
    return samples


def _status(s: Session, run: LevelRun, f: dict[str, Any], samples: list[dict[str, Any]]) -> tuple[str, str]:
    if s.managed is not None and not s.managed.alive():
        return "crash", s.managed.exit_reason()
    if not f["requests_ok"]:
        timeouts = bool(samples) and all(x["error"].startswith("timeout") for x in samples)
        return ("timeout" if timeouts else "error"), (samples[0]["error"] if samples else "no requests completed")
    if f["requests_failed"]:
        return "ok", next(x["error"] for x in samples if not x["ok"])
    return "ok", ""


def _flags(ctx: Context, run: LevelRun, f: dict[str, Any], index: int) -> list[str]:
    """prefix_cached: more than one cached token a request (every prompt of a BOS model shares its first)."""
    named = [("some_failed", f["requests_failed"]), ("not_sent", run.not_sent), ("short", f["short_requests"]),
             ("prefix_cached", f["cached_prompt_tokens_total"] > f["requests_ok"]),
             ("diverged", f.get("diverged_requests")),
             ("nonce_prefix", ctx.prompts.nonce_prefixed.get(index))]
    return [name for name, on in named if on]


def _level_row(ctx: Context, s: Session, index: int, level: Level) -> ServeResult:
    """Drive one level at a server and make its row."""
    plan = ctx.plan
    ctx.on_status(f"{s.name}: {level.profile} {level.value:g}")
    run = run_level(s.url, level, plan.load, _body_for(ctx, s, index), s.headers, s.alive)
    samples = _samples(ctx, s, index, run)
    f = level_fields(samples, run.duration_s, plan.gen_tokens, plan.slo, plan.metrics_as, run.not_sent)
    status, error = _status(s, run, f, samples)
    if run.not_sent and not error:
        error = f"{run.not_sent} request(s) not sent: {run.stopped}"
    info = {**s.info, "extra": {**s.info.get("extra", {}), **_server_metrics(s)}}
    return ServeResult(**ctx.base, **info, **_level_info(level), **f, server=s.name, status=status, error=error,
                       flags=tuple(_flags(ctx, run, f, index)), level_id=level_id(s.name, plan.model, level, plan),
                       requests=samples)


def _levels(ctx: Context, s: Session) -> Iterator[ServeResult]:
    """The plan's levels in order; after a crash or a hang the rest are rows saying why they did not run."""
    levels = [(i, lv) for i, lv in enumerate(ctx.plan.levels) if not _done(ctx, s.name, lv)]
    while levels:
        index, level = levels.pop(0)
        row = _level_row(ctx, s, index, level)
        yield row
        if row.status in ("crash", "timeout"):  # the server is gone or hung: the rest cannot run
            yield from ctx.failed_rows(s.name, [lv for _, lv in levels], row.status, f"not run: {row.error}",
                                       **s.info)
            return


def _done(ctx: Context, server: str, level: Level) -> bool:
    return level_id(server, ctx.plan.model, level, ctx.plan) in ctx.plan.done_levels


def _search(ctx: Context, s: Session) -> Iterator[ServeResult]:
    """--find-max: a row per level tried, then the result: the best level's row flagged find_max."""
    spec, rows = ctx.plan.find_max, []

    def meets(value: float) -> bool | None:
        level = Level(spec.profile, value)
        row = _level_row(ctx, s, len(rows), level)
        met = row.status == "ok" and row.goodput_frac >= spec.fraction
        rows.append(dataclasses.replace(row, flags=(*row.flags, "slo_met") if met else row.flags))
        return None if row.status in ("crash", "timeout") else met

    result = find_max(spec, meets)
    yield from rows
    tried = {"tried": [lv for lv, _ in result.tried], "met": [m for _, m in result.tried], "best": result.best,
             "fraction": spec.fraction}
    best = next((r for r in rows if "slo_met" in r.flags and _value(r) == result.best), None)
    if best is None:
        last = rows[-1] if rows else None
        stopped = last is not None and last.status != "ok"
        status, error = (last.status, f"search stopped: {last.error}") if stopped else ("ok", "no level met the SLO")
        info = {**s.info, "extra": {**s.info.get("extra", {}), "find_max": tried}}
        yield ServeResult(**ctx.base, **info, server=s.name, status=status, error=error, flags=("find_max",),
                          profile=spec.profile, level_id="find-max")
        return
    yield dataclasses.replace(best, flags=("find_max",), level_id=best.level_id + "-max", requests=[],
                              extra={**best.extra, "find_max": tried})


def _value(row: ServeResult) -> float:
    return row.concurrency if row.profile == "concurrency" else row.rate_rps


def _serve_one(ctx: Context, server: Any) -> Iterator[ServeResult]:
    session, name = None, server.name
    if not ctx.plan.find_max and all(_done(ctx, name, lv) for lv in ctx.plan.levels):
        ctx.on_status(f"{name}: every level already in the file (--resume)")
        return
    try:
        if isinstance(server, Endpoint):
            session = _connect(ctx, server)
        else:
            session, failed = _start(ctx, server)
            if session is None:
                yield from failed
                return
        _configure(ctx, session)
        yield from (_search(ctx, session) if ctx.plan.find_max else _levels(ctx, session))
    except BenchError as e:
        yield from ctx.failed_rows(name, ctx.plan.levels, "unavailable" if e.exit_code == 3 else "error", str(e),
                                   **(session.info if session else {}))
    finally:
        if session is not None and session.managed is not None:
            session.managed.stop()


def _server_metrics(s: Session) -> dict[str, Any]:
    """The server's Prometheus /metrics (llama-server with --metrics, vLLM) after a level: plain
    samples only (no histogram buckets); {} where it has none."""
    import httpx

    try:
        r = httpx.get(s.url + "/metrics", headers=s.headers, timeout=5)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for line in r.text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("#") or not name or "_bucket" in name:
            continue
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return {"server_metrics": dict(list(values.items())[:200])} if values else {}


def _served_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    try:
        data = httpx.get(url + "/v1/models", headers=headers, timeout=10).json().get("data") or []
        return str(data[0]["id"]) if data else ""
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def _accepts_token_ids(s: Session, ids: list[int]) -> bool:
    """Whether a --url server takes `prompt` as token ids (llama-server and vLLM do): one
    one-token request with the ids, answered 200 with a completion."""
    import httpx

    body = {"model": s.model_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "stream": True}
    try:
        r = httpx.post(s.url + "/v1/completions", json=body, headers=s.headers, timeout=60)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and '"choices"' in r.text
