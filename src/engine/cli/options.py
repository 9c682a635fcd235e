"""What `run` and `sweep` share: the options saying what to measure, and the cells they make."""

from __future__ import annotations

from typing import Any, Callable

import click

from engine.errors import InputError

POSITIVE = click.IntRange(min=1)
# `bench run` without -r: at least DEFAULT_REPEATS, then more until the CI is narrow, up to the bounds
# (a slow mode's repeats are seconds each: past DEFAULT_MAX_TIME_S of measurement it stops, flagged
# `ci_wide` if its CI is still wide, instead of costing the main job a minute for one cell)
DEFAULT_REPEATS, DEFAULT_MAX_REPEATS, DEFAULT_MAX_TIME_S = 3, 10, 10.0


def _key_value(ctx, param, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for text in values:
        if "=" not in text:
            raise click.BadParameter(f"expected KEY=VALUE, got {text!r}")
        key, value = text.split("=", 1)
        out.append((key.strip(), value))
    return tuple(out)


def _backend_options_help() -> str:
    import backends

    lines = [f"{o.name} ({name}, {o.type.__name__}): {o.help}" for name, cls in backends.registry().items()
             for o in cls.options]
    return "Backend options for -o KEY=VALUE: " + ("; ".join(lines) if lines else "none") + "."


class MeasureCommand(click.Command):
    """`run` and `sweep`: their help ends with the options every backend declares (read when the
    help is shown, so importing the CLI stays cheap)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_paragraph()
        formatter.write_text(_backend_options_help())


def measure_options(fn: Callable) -> Callable:
    """What to measure: shared by `run` and `sweep`. Repeat an option to sweep it."""
    options = [
        click.option("--framework", "-f", multiple=True, help="framework name (default: every one available here)"),
        click.option("--model", "-m", multiple=True,
                     help="GGUF path, a named model (default, gemma3-270m), or synth:SHAPE[:QTYPE[:ARCH]]"),
        click.option("--precision", "-p", multiple=True, help="f32, bf16, f16, or the file's own type such as q4_1"),
        click.option("--device", "-d", multiple=True, help="cpu, cuda, mps, gpu, metal, auto (default: auto)"),
        click.option("--prompt", help="prompt text (instead of --prompt-tokens)"),
        click.option("--prompt-tokens", type=POSITIVE, multiple=True, help="seeded prompt length (default 32)"),
        click.option("--gen-tokens", "-n", type=POSITIVE, multiple=True, help="tokens to generate (default 32)"),
        click.option("--batch-size", "-b", type=POSITIVE, multiple=True,
                     help="sequences prefilled together and decoded in lockstep, each with its own seeded "
                          "prompt (default 1)"),
        click.option("--threads", "-t", type=click.IntRange(min=0), multiple=True,
                     help="threads (default: the framework's own)"),
        click.option("--compile", "compile_", is_flag=True, help="JIT-compile the decode step where the framework can"),
        click.option("--modes", type=click.Choice(["default", "best"]), default="default", show_default=True,
                     help="best: every mode each framework declares (precisions, compile, options); the fastest "
                          "that passes the fidelity bar is flagged `best` where the 95% CI of its ratio to the "
                          "runner-up excludes 1, else the modes it cannot be told from are flagged `tied`"),
        click.option("--option", "-o", multiple=True, callback=_key_value, metavar="KEY=VALUE",
                     help="backend option, checked against what the frameworks declare (see below)"),
        click.option("--repeats", "-r", type=POSITIVE,
                     help="measured generations per cell: exactly this many unless --max-repeats is given "
                          f"(default: {DEFAULT_REPEATS} to {DEFAULT_MAX_REPEATS}, adaptively)"),
        click.option("--max-repeats", type=click.IntRange(min=1),
                     help="keep repeating a cell, up to this many, until the 95% CI of its decode tok/s is "
                          "within --ci-target (a cell that gets there no sooner is flagged `ci_wide`)"),
        click.option("--max-time", type=click.FloatRange(min=0, min_open=True),
                     help="adaptive repeats: start no repeat beyond the least once this many seconds are measured "
                          f"(default {DEFAULT_MAX_TIME_S:g} with the default repeats)"),
        click.option("--ci-target", type=click.FloatRange(min=0, min_open=True),
                     help="relative half-width of the 95% CI that ends an adaptive cell (default 0.05)"),
        click.option("--warmup", type=click.IntRange(min=0), help="warm-up generations per cell, each the prompt and 8 tokens (default 1)"),
        click.option("--min-time", type=float, help="keep repeating until this many seconds are measured"),
        click.option("--seed", type=int, help="seed of the prompt stream and the sampler (default 0)"),
        click.option("--timeout", type=float, help="seconds a cell's load and warm-up, and then its measuring, "
                                                   "may each take before it is killed (default 900)"),
        click.option("--memory-limit-mb", type=click.IntRange(min=0), help="address-space limit of each run's process"),
        click.option("--output", "-O", help="results CSV (a JSONL with raw samples goes beside it); "
                                            "default results/bench-TIMESTAMP.csv"),
        click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl", "markdown"]), default="table",
                     help="stdout format"),
        click.option("--resume", is_flag=True, help="skip cells already in --output"),
        click.option("--no-check", is_flag=True, help="speed only: no checks against the reference (the batch token "
                     "check, the real-text fidelity pass); fidelity columns stay empty and `best` cannot be decided"),
        click.option("--delay", type=float, default=0.0, help="seconds to pause between cells (cool-down)"),
        click.option("--interleave/--no-interleave", default=True, show_default=True,
                     help="take the repeats of all loaded models round-robin, so drift hits every framework alike"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# CLI option -> Cell field: repeated options become sweep axes, single ones apply to every cell
AXES = {"framework": "framework", "precision": "precision", "device": "device", "prompt_tokens": "prompt_tokens",
        "gen_tokens": "gen_tokens", "batch_size": "batch_size", "threads": "threads", "node": "node"}
FIXED = {"repeats": "repeats", "max_repeats": "max_repeats", "max_time": "max_time_s", "ci_target": "ci_target",
         "warmup": "warmup", "min_time": "min_time_s", "seed": "seed", "timeout": "timeout_s",
         "memory_limit_mb": "memory_limit_mb", "prompt": "prompt_text"}


def cells_from_options(o: dict[str, Any], config: str | None = None) -> list:
    import backends
    from engine.model.catalog import resolve_model
    from engine.sweep.cells import apply_options, expand, load_config

    for name in o["framework"]:
        backends.get(name)  # unknown names fail here, listing the known ones
    axes: dict[str, Any] = {key: list(o[opt]) for opt, key in AXES.items() if o.get(opt)}
    if o["model"]:
        axes["model"] = [resolve_model(m) for m in o["model"]]
    fixed: dict[str, Any] = {key: o[opt] for opt, key in FIXED.items() if o.get(opt) is not None}
    if o["compile_"]:
        fixed["compile"] = True
    if o.get("no_check"):
        fixed["fidelity"] = False
    if not config and o["repeats"] is None and o.get("max_repeats") is None:
        fixed["max_repeats"] = DEFAULT_MAX_REPEATS  # adaptive unless -r fixes the count
        fixed.setdefault("max_time_s", DEFAULT_MAX_TIME_S)
    if o["option"]:
        fixed["options"] = tuple(sorted(o["option"]))
    if config:
        cells = load_config(config, resolve_model("default"), {**axes, **fixed}, resolve_model)
    else:
        axes.setdefault("framework", backends.available())
        axes.setdefault("model", [resolve_model("default")])
        cells = expand(axes, fixed)
    if o["modes"] == "best":
        if o["precision"] or o["compile_"]:
            raise InputError("--modes best chooses precisions and compilation itself; drop -p/--compile")
        from engine.model.spec import open_spec
        from engine.sweep.best import with_modes

        cells = with_modes(cells, open_spec)
    cells = apply_options(cells, backends.parse_options)
    _validate(cells, on_cluster=bool(o.get("ray_address")))
    return cells


def _validate(cells: list, on_cluster: bool = False) -> None:
    """Fail before any run on what the parent can check: names, precisions, devices (on a
    cluster the nodes' devices are the nodes' business: a cell no node can run is `unavailable`)."""
    import backends
    from engine.measure.runner import positions_needed
    from engine.model.spec import open_spec

    named = sorted({c.node for c in cells if c.node})
    if named and not on_cluster:
        raise InputError(f"the node setting ({', '.join(named)}) needs a cluster: add --ray HOST:PORT")
    for c in cells:
        cls = backends.get(c.framework)
        spec = open_spec(c.model)
        positions_needed(spec, c)  # every sequence's prompt + generation within the context
        if cls.availability().ok:
            cls.resolve_precision(spec, c.precision)
            if not on_cluster:
                cls.resolve_device(c.device)
