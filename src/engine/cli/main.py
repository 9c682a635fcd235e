"""`bench`: run, sweep, doctor, synth, chat, report, compare (click).

Every failure a user can cause ends in one line on stderr and an exit code: 2 bad input (a file,
an option, a name), 3 a device or framework this host cannot run, 1 a failed cell (its row is
written) or an unexpected error. Tracebacks only with --debug.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from engine.errors import BenchError, InputError

RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", "results"))
POSITIVE = click.IntRange(min=1)


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
        click.option("--threads", "-t", type=click.IntRange(min=0), multiple=True,
                     help="threads (default: the framework's own)"),
        click.option("--compile", "compile_", is_flag=True, help="JIT-compile the decode step where the framework can"),
        click.option("--option", "-o", multiple=True, callback=_key_value, metavar="KEY=VALUE",
                     help="backend option, checked against what the frameworks declare (see below)"),
        click.option("--repeats", "-r", type=POSITIVE, help="measured generations per cell (default 3)"),
        click.option("--warmup", type=click.IntRange(min=0), help="warm-up generations per cell (default 1)"),
        click.option("--min-time", type=float, help="keep repeating until this many seconds are measured"),
        click.option("--seed", type=int, help="seed of the prompt stream and the sampler (default 0)"),
        click.option("--timeout", type=float, help="seconds a cell may run before it is killed (default 900)"),
        click.option("--memory-limit-mb", type=click.IntRange(min=0), help="address-space limit of each run's process"),
        click.option("--output", "-O", help="results CSV (a JSONL with raw samples goes beside it); "
                                            "default results/bench-TIMESTAMP.csv"),
        click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl", "markdown"]), default="table",
                     help="stdout format"),
        click.option("--resume", is_flag=True, help="skip cells already in --output"),
        click.option("--no-check", is_flag=True, help="skip the token check against the reference"),
        click.option("--delay", type=float, default=0.0, help="seconds to pause between cells (cool-down)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# CLI option -> Cell field: repeated options become sweep axes, single ones apply to every cell
AXES = {"framework": "framework", "precision": "precision", "device": "device", "prompt_tokens": "prompt_tokens",
        "gen_tokens": "gen_tokens", "threads": "threads"}
FIXED = {"repeats": "repeats", "warmup": "warmup", "min_time": "min_time_s", "seed": "seed", "timeout": "timeout_s",
         "memory_limit_mb": "memory_limit_mb", "prompt": "prompt_text"}


def cells_from_options(o: dict[str, Any], config: str | None = None) -> list:
    import backends
    from engine.model.catalog import resolve_model
    from engine.sweep.cells import apply_options, expand, load_config

    for name in o["framework"]:
        backends.get(name)  # unknown names fail here, listing the known ones
    axes: dict[str, Any] = {key: list(o[opt]) for opt, key in AXES.items() if o[opt]}
    if o["model"]:
        axes["model"] = [resolve_model(m) for m in o["model"]]
    fixed: dict[str, Any] = {key: o[opt] for opt, key in FIXED.items() if o[opt] is not None}
    if o["compile_"]:
        fixed["compile"] = True
    if o["option"]:
        fixed["options"] = tuple(sorted(o["option"]))
    if config:
        cells = load_config(config, resolve_model("default"), {**axes, **fixed}, resolve_model)
    else:
        axes.setdefault("framework", backends.available())
        axes.setdefault("model", [resolve_model("default")])
        cells = expand(axes, fixed)
    cells = apply_options(cells, backends.parse_options)
    _validate(cells)
    return cells


def _validate(cells: list) -> None:
    """Fail before any run on what the parent can check: names, precisions, devices."""
    import backends
    from engine.model.spec import ModelSpec

    specs: dict[str, Any] = {}
    for c in cells:
        cls = backends.get(c.framework)
        if c.model not in specs:
            specs[c.model] = ModelSpec.open(c.model)
        if cls.availability().ok:
            cls.resolve_precision(specs[c.model], c.precision)
            cls.resolve_device(c.device)


def run_cells_command(o: dict[str, Any], debug: bool, config: str | None = None) -> int:
    import backends
    from engine.cli import display
    from engine.measure.bandwidth import host_bandwidth
    from engine.results.rows import new_run_id
    from engine.results.writers import ResultWriter, print_rows
    from engine.sweep.run import run_sweep

    cells = cells_from_options(o, config)
    unavailable = sorted({c.framework for c in cells if not backends.get(c.framework).availability().ok})
    if unavailable and not config and o["framework"]:
        from engine.errors import UnavailableError

        reasons = "; ".join(f"{n}: {backends.get(n).availability().reason}" for n in unavailable)
        raise UnavailableError(f"framework not available here ({reasons})")
    if o["resume"] and not o["output"]:
        raise InputError("--resume needs --output naming the results file to continue")
    out = Path(o["output"]) if o["output"] else RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    writer = ResultWriter(out)
    bw = host_bandwidth()["host_gbps"]
    display.stderr.print(f"{len(cells)} cell(s) -> {out}  (host memory bandwidth {bw:.1f} GB/s)")

    with display.SweepProgress(len(cells)) as progress:
        outcome = run_sweep(cells, writer, bw, new_run_id(), resume=o["resume"], check_reference=not o["no_check"],
                            delay_s=o["delay"], debug=debug, on_cell=progress.finish, on_start=progress.start)
    if outcome.skipped:
        display.stderr.print(f"resumed: {outcome.skipped} cell(s) already in {out}")
    if not (progress.live and o["fmt"] == "table"):  # the live display already shows the table
        print_rows(outcome.rows, o["fmt"], sys.stdout)
    display.stderr.print(f"wrote {len(outcome.rows)} row(s) to {out} and {writer.jsonl_path}")
    if outcome.statuses.get("unavailable"):
        display.stderr.print(f"{outcome.statuses['unavailable']} cell(s) unavailable on this host (see `bench doctor`)")
    if outcome.failed:
        display.stderr.print(f"[red]{outcome.failed} cell(s) failed:[/] " + ", ".join(
            f"{s}={n}" for s, n in outcome.statuses.items() if s not in ("ok", "unavailable")))
        return 1
    return 0


class BenchGroup(click.Group):
    """Turns every error into one line and its exit code (click's own usage errors included)."""

    def main(self, args=None, **extra):
        debug = "--debug" in (sys.argv[1:] if args is None else list(args))
        try:
            rv = super().main(args=args, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.Abort:
            print("interrupted; rows already written are kept", file=sys.stderr)
            return 130
        except click.ClickException as e:
            print(f"error: {e.format_message()}", file=sys.stderr)
            return e.exit_code
        except BenchError as e:
            if debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted; rows already written are kept", file=sys.stderr)
            return 130
        except Exception as e:  # a bug or an unexpected library error: one line, the trace with --debug
            if debug:
                traceback.print_exc()
            print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
            return 1
        return rv if isinstance(rv, int) else 0


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compare LLM inference frameworks on one GGUF model through one identical generate loop."""
    ctx.obj = {"debug": debug}


@cli.command(epilog=_backend_options_help)
@measure_options
@click.pass_obj
def run(obj, **o) -> int:
    """Benchmark frameworks (no options: every available one, default model)."""
    return run_cells_command(o, obj["debug"])


@cli.command(epilog=_backend_options_help)
@click.argument("config")
@measure_options
@click.pass_obj
def sweep(obj, config: str, **o) -> int:
    """Run a sweep from a TOML config (configs/*.toml); options given here override it."""
    return run_cells_command(o, obj["debug"], config=config)


@cli.command()
@click.option("--remeasure", is_flag=True, help="measure the memory bandwidth again")
def doctor(remeasure: bool) -> int:
    """Host bandwidth and every framework's status."""
    from rich.table import Table

    import backends
    from engine.cli import display
    from engine.measure.bandwidth import host_bandwidth
    from engine.results.rows import provenance

    bw = host_bandwidth(remeasure=remeasure)
    prov = provenance()
    display.stdout.print(f"host {prov['host']}: {prov['cpu']}, {prov['os']}, Python {prov['python']}")
    display.stdout.print(f"memory bandwidth: {bw['host_gbps']:.1f} GB/s (threaded read {bw['read_gbps']:.1f}, "
                         f"f32 GEMV {bw['gemv_gbps']:.1f})")
    t = Table(header_style="bold")
    for col in ("framework", "status", "version", "devices", "notes"):
        t.add_column(col)
    for name, cls in backends.registry().items():
        a = cls.availability()
        notes = a.reason if not a.ok else (getattr(cls, "build_info", lambda: "")() or cls.description)
        t.add_row(name, "[green]ok[/]" if a.ok else "[red]unavailable[/]", a.version or "-",
                  ", ".join(cls.devices), notes)
    display.stdout.print(t)
    display.stdout.print(_models_table())
    return 0


def _models_table():
    from rich.table import Table

    from engine.model.catalog import NAMED_MODELS

    t = Table(header_style="bold")
    for col in ("model", "status", "what", "install"):
        t.add_column(col)
    for m in NAMED_MODELS.values():
        t.add_row(m.name, "[green]installed[/]" if m.installed else "[red]not installed[/]", m.description, m.install)
    return t


def _synth_choices(name: str) -> list[str]:
    from engine.model import synth

    return list(getattr(synth, name))


@cli.command()
@click.option("--shape", type=click.Choice(_synth_choices("SHAPES")), default="tiny", show_default=True)
@click.option("--qtype", type=click.Choice(_synth_choices("QTYPES")), default="f32", show_default=True)
@click.option("--seed", type=int, default=0)
@click.option("--untied", is_flag=True, help="write a separate output.weight")
@click.option("--arch", type=click.Choice(_synth_choices("ARCH_TOKENIZER")), default="llama", show_default=True,
              help="architecture (tiny shapes get its features at test size: head size, window, layers)")
@click.option("--tokenizer", type=click.Choice(_synth_choices("TOKENIZERS")), default=None,
              help="byte-level BPE (gpt2, qwen2) or SentencePiece (llama, gemma); default: the architecture's kind")
@click.option("--out", "-O", required=True)
def synth(shape: str, qtype: str, seed: int, untied: bool, arch: str, tokenizer: str | None, out: str) -> int:
    """Write a random-weight GGUF of any supported architecture."""
    from engine.model.synth import write_synthetic

    click.echo(write_synthetic(out, shape, qtype, seed, tied=not untied, architecture=arch, tokenizer=tokenizer))
    return 0


@cli.command()
@click.option("--framework", "-f", default="numpy", show_default=True)
@click.option("--model", "-m", default="default", show_default=True)
@click.option("--precision", "-p", default="auto", show_default=True)
@click.option("--device", "-d", default="auto", show_default=True)
@click.option("--max-tokens", type=POSITIVE, default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--context", type=POSITIVE, default=2048, show_default=True, help="KV-cache length of the session")
@click.option("--seed", type=int, default=0)
def chat(**o) -> int:
    """Interactive multi-turn chat with live metrics."""
    from engine.cli.chat import run_chat

    return run_chat(**o)


@cli.command()
@click.argument("results", nargs=-1, required=True)
@click.option("--out", "-O", required=True, help="output directory")
def report(results: tuple[str, ...], out: str) -> int:
    """Figures (PNG) and a markdown summary of results CSVs."""
    from engine.analysis.report import write_report

    click.echo(write_report(list(results), Path(out)))
    return 0


@cli.command()
@click.argument("baseline")
@click.argument("candidate")
@click.option("--metric", default="decode_tps", show_default=True)
@click.option("--threshold", type=float, default=0.05, show_default=True, help="relative drop counted as a regression")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="significance level")
def compare(baseline: str, candidate: str, metric: str, threshold: float, alpha: float) -> int:
    """A/B two results CSVs per cell; exit 1 on a significant regression."""
    from engine.analysis.compare import compare as compare_files
    from engine.cli import display
    from engine.cli.display import comparison_table

    rows, unmatched = compare_files(baseline, candidate, metric, threshold, alpha)
    if not rows:
        raise InputError("no cells in common between the two files")
    display.stdout.print(comparison_table(rows, metric))
    if unmatched:
        display.stderr.print(f"{len(unmatched)} cell(s) in only one file: not compared")
    regressions = sum(r.regressed for r in rows)
    if regressions:
        display.stderr.print(f"[red]{regressions} cell(s) regressed beyond {threshold:.0%}[/]")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(args=argv, prog_name="bench")


if __name__ == "__main__":
    sys.exit(main())
