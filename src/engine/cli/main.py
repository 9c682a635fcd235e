"""`bench`: run, sweep, serve, doctor, synth, chat, report, compare (click).

Every failure a user can cause ends in one line on stderr and an exit code: 2 bad input (a file,
an option, a name), 3 a device or framework this host cannot run, 1 a failed cell (its row is
written) or an unexpected error. Tracebacks only with --debug.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

from engine.cli import node_cmd, serve_cmd
from engine.cli.options import POSITIVE, MeasureCommand, cells_from_options, measure_options
from engine.errors import BenchError, InputError

RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", "results"))


def run_cells_command(o: dict[str, Any], debug: bool, config: str | None = None) -> int:
    import backends
    from engine.cli import display
    from engine.measure.bandwidth import host_bandwidth
    from engine.results.rows import new_run_id
    from engine.results.writers import ResultWriter, print_rows, read_jsonl
    from engine.sweep.isolation import run_cells
    from engine.sweep.run import run_sweep

    cells = cells_from_options(o, config)
    cluster = o.get("ray_address")
    unavailable = sorted({c.framework for c in cells if not backends.get(c.framework).availability().ok})
    if unavailable and not config and o["framework"] and not cluster:
        from engine.errors import UnavailableError

        reasons = "; ".join(f"{n}: {backends.get(n).availability().reason}" for n in unavailable)
        raise UnavailableError(f"framework not available here ({reasons})")
    if o["resume"] and not o["output"]:
        raise InputError("--resume needs --output naming the results file to continue")
    out = Path(o["output"]) if o["output"] else RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    writer = ResultWriter(out, continuing=o["resume"])  # a file with rows only through --resume
    executor, bw = (_cluster_executor(cluster, debug), math.nan) if cluster else (run_cells, host_bandwidth()["host_gbps"])
    where = f"Ray cluster {cluster}: {executor.describe()}" if cluster else f"host memory bandwidth {bw:.1f} GB/s"
    display.stderr.print(f"{len(cells)} cell(s) -> {out}  ({where})")

    try:
        with display.SweepProgress(len(cells)) as progress:
            outcome = run_sweep(cells, writer, bw, new_run_id(), resume=o["resume"],
                                check_reference=not o["no_check"], delay_s=o["delay"], debug=debug,
                                interleave=o["interleave"], on_cell=progress.finish, on_start=progress.start,
                                executor=executor, on_plan=progress.plan, on_progress=progress.report)
    finally:
        if cluster:
            executor.close()
    if outcome.skipped:
        display.stderr.print(f"resumed: {outcome.skipped} cell(s) already in {out}")
    if o["modes"] == "best":  # over every row of the file: a resumed run's earlier cells too
        from engine.sweep.best import decide_file, decided

        decisions, changes = decide_file(writer)
        outcome.rows = [decided(r, changes) for r in outcome.rows]
    if not (progress.live and o["fmt"] == "table"):  # the live display already shows the table
        print_rows(outcome.rows, o["fmt"], sys.stdout)
    if o["modes"] == "best" and o["fmt"] == "table":
        display.stdout.print(display.best_table(decisions, read_jsonl(writer.jsonl_path)))
    display.stderr.print(f"wrote {len(outcome.rows)} row(s) to {out} and {writer.jsonl_path}")
    if outcome.statuses.get("unavailable"):
        display.stderr.print(f"{outcome.statuses['unavailable']} cell(s) unavailable on this "
                             f"{'cluster (see `bench doctor --ray`)' if cluster else 'host (see `bench doctor`)'}")
    if outcome.failed:
        display.stderr.print(f"[red]{outcome.failed} cell(s) failed:[/] " + ", ".join(
            f"{s}={n}" for s, n in outcome.statuses.items() if s not in ("ok", "unavailable")))
        return 1
    return 0


def _cluster_executor(address: str, debug: bool):
    from engine.sweep.ray_executor import RayExecutor

    return RayExecutor(address, debug)


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


@cli.command(cls=MeasureCommand)
@measure_options
@click.pass_obj
def run(obj, **o) -> int:
    """Benchmark frameworks (no options: every available one, default model)."""
    return run_cells_command(o, obj["debug"])


@cli.command(cls=MeasureCommand)
@click.argument("config")
@measure_options
@click.option("--ray", "ray_address", metavar="HOST:PORT", help="run the load groups on this Ray cluster "
              "(`bench node head` starts one; 'local': a one-node cluster in this process)")
@click.option("--node", multiple=True, help="cluster node name to run on (repeat to compare machines; needs --ray)")
@click.pass_obj
def sweep(obj, config: str, **o) -> int:
    """Run a sweep from a TOML config (configs/*.toml); options given here override it."""
    return run_cells_command(o, obj["debug"], config=config)


@cli.command()
@click.option("--remeasure", is_flag=True, help="measure the memory bandwidth again")
@click.option("--ray", "ray_address", metavar="HOST:PORT", help="list the nodes of this Ray cluster instead")
@click.pass_obj
def doctor(obj, remeasure: bool, ray_address: str | None) -> int:
    """Host bandwidth and every framework's status (or every cluster node's, with --ray)."""
    from rich.table import Table

    if ray_address:
        from engine.cli.node_cmd import doctor_cluster

        return doctor_cluster(ray_address, obj["debug"])

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
@click.option("--threshold", type=float, default=0.05, show_default=True,
              help="relative change counted as a regression: only when the whole CI lies beyond it")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="the CI is at confidence 1 - alpha")
def compare(baseline: str, candidate: str, metric: str, threshold: float, alpha: float) -> int:
    """A/B two results CSVs per cell: CANDIDATE / BASELINE with its CI (Welch's t on the logs of the
    repeats); exit 1 when a cell's whole CI lies beyond --threshold on the worse side, else 0."""
    from engine.analysis.compare import compare as compare_files
    from engine.cli import display
    from engine.cli.display import comparison_table

    if not 0 < alpha < 1:
        raise InputError(f"--alpha must be between 0 and 1, got {alpha}")
    rows, unmatched = compare_files(baseline, candidate, metric, threshold, alpha)
    if not rows:
        raise InputError("no cells in common between the two files")
    display.stdout.print(comparison_table(rows, metric, baseline, candidate, 1 - alpha))
    if unmatched:
        display.stderr.print(f"{len(unmatched)} cell(s) in only one file: not compared")
    regressions = sum(r.regressed for r in rows)
    if regressions:
        display.stderr.print(f"[red]{regressions} cell(s) regressed beyond {threshold:.0%}[/]")
        return 1
    return 0


cli.add_command(node_cmd.node)
cli.add_command(serve_cmd.serve)


def main(argv: list[str] | None = None) -> int:
    return cli.main(args=argv, prog_name="bench")


if __name__ == "__main__":
    sys.exit(main())
