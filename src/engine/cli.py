"""`bench`: run, sweep, doctor, synth, chat, report, compare."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from engine.errors import BenchError, InputError

RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", "results"))


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    for cast in (int, float):
        try:
            return k, cast(v)
        except ValueError:
            pass
    return k, v


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def _measure_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure (repeat an option to sweep it)")
    g.add_argument("--framework", "-f", action="append", help="framework name (default: every one available here)")
    g.add_argument("--model", "-m", action="append", help="GGUF path, 'default', or synth:SHAPE[:QTYPE]")
    g.add_argument("--precision", "-p", action="append", help="f32, bf16, f16, or the file's own type such as q4_1")
    g.add_argument("--device", "-d", action="append", help="cpu, cuda, mps, gpu, metal, auto (default: auto)")
    g.add_argument("--prompt", help="prompt text (instead of --prompt-tokens)")
    g.add_argument("--prompt-tokens", type=_positive_int, action="append", help="seeded prompt length (default 32)")
    g.add_argument("--gen-tokens", "-n", type=_positive_int, action="append", help="tokens to generate (default 32)")
    g.add_argument("--threads", "-t", type=int, action="append", help="threads (default: the framework's own)")
    g.add_argument("--compile", action="store_true", help="JIT-compile the decode step where the framework can")
    g.add_argument("--option", "-o", action="append", type=_key_value, default=[],
                   help="backend option KEY=VALUE (e.g. beam=2 for tinygrad)")
    g.add_argument("--repeats", "-r", type=_positive_int, help="measured generations per cell (default 3)")
    g.add_argument("--warmup", type=int, help="warm-up generations per cell (default 1)")
    g.add_argument("--min-time", type=float, help="keep repeating until this many seconds are measured")
    g.add_argument("--seed", type=int, help="seed of the prompt stream and the sampler (default 0)")
    g.add_argument("--timeout", type=float, help="seconds a cell may run before it is killed (default 900)")
    g.add_argument("--memory-limit-mb", type=int, help="address-space limit of each run's process")


def _output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", "-O", help="results CSV (a JSONL with raw samples goes beside it); "
                                          "default results/bench-TIMESTAMP.csv")
    g.add_argument("--format", choices=("table", "csv", "jsonl"), default="table", help="stdout format")
    g.add_argument("--resume", action="store_true", help="skip cells already in --output")
    g.add_argument("--no-check", action="store_true", help="skip the token check against the reference")
    g.add_argument("--delay", type=float, default=0.0, help="seconds to pause between cells (cool-down)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Compare LLM inference frameworks on one GGUF model "
                                "through one identical generate loop.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="benchmark frameworks (no options: every available one, default model)")
    _measure_options(run)
    _output_options(run)

    sweep = sub.add_parser("sweep", help="run a sweep from a TOML config (configs/*.toml)")
    sweep.add_argument("config")
    _measure_options(sweep)
    _output_options(sweep)

    doc = sub.add_parser("doctor", help="host bandwidth and every framework's status")
    doc.add_argument("--remeasure", action="store_true", help="measure the memory bandwidth again")

    syn = sub.add_parser("synth", help="write a random-weight Llama GGUF")
    from engine.synth import QTYPES, SHAPES

    syn.add_argument("--shape", choices=list(SHAPES), default="tiny")
    syn.add_argument("--qtype", choices=QTYPES, default="f32")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--untied", action="store_true", help="write a separate output.weight")
    syn.add_argument("--tokenizer", choices=("gpt2", "llama"), default="gpt2",
                     help="byte-level BPE (gpt2) or SentencePiece (llama) vocabulary")
    syn.add_argument("--out", "-O", required=True)

    chat = sub.add_parser("chat", help="interactive multi-turn chat with live metrics")
    chat.add_argument("--framework", "-f", default="numpy")
    chat.add_argument("--model", "-m", default="default")
    chat.add_argument("--precision", "-p", default="auto")
    chat.add_argument("--device", "-d", default="auto")
    chat.add_argument("--max-tokens", type=_positive_int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--context", type=_positive_int, default=2048, help="KV-cache length of the session")
    chat.add_argument("--seed", type=int, default=0)

    rep = sub.add_parser("report", help="figures (PNG) and a markdown summary of results CSVs")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--out", "-O", required=True, help="output directory")

    cmp = sub.add_parser("compare", help="A/B two results CSVs per cell; non-zero exit on a regression")
    cmp.add_argument("baseline")
    cmp.add_argument("candidate")
    cmp.add_argument("--metric", default="decode_tps")
    cmp.add_argument("--threshold", type=float, default=0.05, help="relative drop counted as a regression")
    cmp.add_argument("--alpha", type=float, default=0.05, help="significance level")
    return p


def cells_from_args(args: argparse.Namespace, config: str | None = None) -> list:
    import backends
    from engine.cells import expand, load_config
    from engine.models import resolve_model

    axes: dict[str, Any] = {}
    if args.framework:
        for name in args.framework:
            backends.get(name)  # unknown names fail here, listing the known ones
        axes["framework"] = args.framework
    if args.model:
        axes["model"] = [resolve_model(m) for m in args.model]
    for opt, key in (("precision", "precision"), ("device", "device"), ("prompt_tokens", "prompt_tokens"),
                     ("gen_tokens", "gen_tokens"), ("threads", "threads")):
        if getattr(args, opt):
            axes[key] = getattr(args, opt)
    fixed: dict[str, Any] = {}
    for opt, key in (("repeats", "repeats"), ("warmup", "warmup"), ("min_time", "min_time_s"), ("seed", "seed"),
                     ("timeout", "timeout_s"), ("memory_limit_mb", "memory_limit_mb"), ("prompt", "prompt_text")):
        if getattr(args, opt) is not None:
            fixed[key] = getattr(args, opt)
    if args.compile:
        fixed["compile"] = True
    if args.option:
        fixed["options"] = tuple(sorted(args.option))
    if config:
        cells = load_config(config, resolve_model("default"), {**axes, **fixed}, resolve_model)
    else:
        if "framework" not in axes:
            axes["framework"] = backends.available()
        axes.setdefault("model", [resolve_model("default")])
        cells = expand(axes, fixed)
    _validate(cells)
    return cells


def _validate(cells: list) -> None:
    """Fail before any run on what the parent can check: names, precisions, explicit frameworks
    that are not installed here."""
    import backends
    from engine.gguf_model import ModelSpec

    specs: dict[str, Any] = {}
    for c in cells:
        cls = backends.get(c.framework)
        if c.model not in specs:
            specs[c.model] = ModelSpec.open(c.model)
        avail = cls.availability()
        if avail.ok:
            cls.resolve_precision(specs[c.model], c.precision)
            cls.resolve_device(c.device)


def cmd_run(args: argparse.Namespace, config: str | None = None) -> int:
    import backends
    from engine import display
    from engine.bandwidth import host_bandwidth
    from engine.results import ResultWriter, new_run_id
    from engine.sweep import run_sweep

    cells = cells_from_args(args, config)
    unavailable = sorted({c.framework for c in cells if not backends.get(c.framework).availability().ok})
    if unavailable and not config and args.framework:
        reasons = "; ".join(f"{n}: {backends.get(n).availability().reason}" for n in unavailable)
        raise BenchError(f"framework not available here ({reasons})")
    out = Path(args.output) if args.output else RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    if args.resume and not args.output:
        raise InputError("--resume needs --output naming the results file to continue")
    writer = ResultWriter(out)
    bw = host_bandwidth()["host_gbps"]
    display.stderr.print(f"{len(cells)} cell(s) -> {out}  (host memory bandwidth {bw:.1f} GB/s)")

    with display.SweepProgress(len(cells)) as progress:
        outcome = run_sweep(cells, writer, bw, new_run_id(), resume=args.resume, check_reference=not args.no_check,
                            delay_s=args.delay, debug=args.debug, on_cell=progress.finish, on_start=progress.start)
    if outcome.skipped:
        display.stderr.print(f"resumed: {outcome.skipped} cell(s) already in {out}")
    if not (progress.live and args.format == "table"):  # the live display already shows the table
        display.write_rows(outcome.rows, args.format)
    display.stderr.print(f"wrote {len(outcome.rows)} row(s) to {out} and {writer.jsonl_path}")
    if outcome.statuses.get("unavailable"):
        display.stderr.print(f"{outcome.statuses['unavailable']} cell(s) unavailable on this host (see `bench doctor`)")
    if outcome.failed:
        display.stderr.print(f"[red]{outcome.failed} cell(s) failed:[/] " + ", ".join(
            f"{s}={n}" for s, n in outcome.statuses.items() if s not in ("ok", "unavailable")))
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.table import Table

    import backends
    from engine import display
    from engine.bandwidth import host_bandwidth
    from engine.results import provenance

    bw = host_bandwidth(remeasure=args.remeasure)
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
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from engine.synth import write_synthetic

    path = write_synthetic(args.out, args.shape, args.qtype, args.seed, tied=not args.untied, tokenizer=args.tokenizer)
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sweep":
            return cmd_run(args, config=args.config)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "synth":
            return cmd_synth(args)
        if args.command == "chat":
            from engine.chat import run_chat

            return run_chat(args)
        if args.command == "report":
            from engine.report import cmd_report

            return cmd_report(args)
        if args.command == "compare":
            from engine.compare import cmd_compare

            return cmd_compare(args)
    except BenchError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rows already written are kept", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected library error: one line, the trace with --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
