"""Printers and the results files, in the style of llama-bench's printers.

A printer writes `header()` once, `rows(...)` as each cell finishes and `footer()` at the end,
onto any text stream. `table` (rich), `csv`, `jsonl` and `markdown` serve stdout, the results
files and `bench report`; `ResultWriter` appends a cell's rows to FILE.csv and FILE.jsonl with
one flushed, fsynced write each, so a crash or a kill between cells loses nothing written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import numpy as np

from engine.errors import InputError
from engine.results.modes import row_mode
from engine.results.rows import BenchmarkResult, csv_record, json_default


def csv_text(records: Iterable[dict[str, Any]], columns: list[str], header: bool = False) -> str:
    """CSV lines of already-flat records (`csv_record`, or rows read back from a CSV)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for r in records:
        w.writerow([r[c] for c in columns])
    return buf.getvalue()


def markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    return "\n".join([markdown_row(columns), "|" + "---|" * len(columns), *map(markdown_row, rows)])


class Printer:
    """Writes rows to `out`; subclasses override what they print."""

    def __init__(self, out: TextIO):
        self.out = out

    def header(self) -> None:
        pass

    def rows(self, rows: Sequence[BenchmarkResult]) -> None:
        pass

    def footer(self) -> None:
        pass


class CsvPrinter(Printer):
    columns = BenchmarkResult.csv_columns()

    def __init__(self, out: TextIO, columns: list[str] | None = None):
        super().__init__(out)
        self.columns = columns or self.columns

    def header(self) -> None:
        self.out.write(csv_text([], self.columns, header=True))

    def rows(self, rows: Sequence[BenchmarkResult]) -> None:
        self.out.write(csv_text((csv_record(r.as_dict()) for r in rows), self.columns))


class JsonlPrinter(Printer):
    def rows(self, rows: Sequence[BenchmarkResult]) -> None:
        self.out.write("".join(json.dumps(r.as_dict(), default=json_default) + "\n" for r in rows))


# the per-cell summary shared by the terminal table and markdown: (column, right-aligned)
SUMMARY_COLUMNS = (("framework", False), ("mode", False), ("dev", False), ("prompt", True), ("gen", True),
                   ("batch", True), ("decode tok/s (95% CI)", True), ("TTFT ms", True), ("prefill tok/s", True),
                   ("ITL p50/p99 ms", True), ("peak RSS MB", True), ("GB/s", True), ("roofline", True),
                   ("match", True), ("status", False))


def fmt(v: float | None, spec: str = ".1f") -> str:
    """A table cell: "-" for a missing number; a value that rounds to zero never prints as "-0"
    (a KLD of -3e-6 is float16 rounding around an exact match, not a negative divergence)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = format(v, spec)
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text) else text


def by_cell(rows: Iterable[BenchmarkResult]) -> list[list[BenchmarkResult]]:
    cells: dict[str, list[BenchmarkResult]] = {}
    for r in rows:
        cells.setdefault(r.cell_id, []).append(r)
    return list(cells.values())


def pooled_itl_s(cell_rows: Sequence[BenchmarkResult], q: float) -> float:
    """The q-th percentile of every inter-token latency of the cell's repeats together (not the
    mean of each repeat's percentile, which for a p99 of a few dozen samples is near its max)."""
    samples = [x for r in cell_rows for x in r.itl_s]
    return float(np.percentile(samples, q)) if samples else math.nan


def summary_cells(cell_rows: list[BenchmarkResult]) -> tuple[list[str], str]:
    """One cell's summary line (strings in SUMMARY_COLUMNS order, status last) and its status."""
    r = cell_rows[0]
    framework = f"{r.framework} @{r.node}" if r.node else r.framework  # which machine, on a cluster
    what = [framework, row_mode(r), r.device, str(r.prompt_tokens), str(r.gen_tokens), str(r.batch_size)]
    if r.status != "ok":
        return what + ["-"] * 8 + [f"{r.status}: {r.error[:80]}"], r.status
    mean = lambda f: sum(getattr(x, f) for x in cell_rows) / len(cell_rows)  # noqa: E731
    ci = (f" ±{fmt((r.decode_tps_ci95_high - r.decode_tps_ci95_low) / 2)}"
          if not math.isnan(r.decode_tps_ci95_high) else "")
    match = "-" if r.match_tokens < 0 else f"{r.match_tokens}/{r.gen_tokens}"
    return what + [f"{fmt(r.decode_tps_mean)}{ci}", fmt(mean("ttft_s") * 1e3), fmt(mean("prefill_tps"), ".0f"),
                   f"{fmt(pooled_itl_s(cell_rows, 50) * 1e3)}/{fmt(pooled_itl_s(cell_rows, 99) * 1e3)}",
                   fmt(r.peak_rss_bytes / 1e6, ".0f"), fmt(mean("achieved_gbps")),
                   fmt(mean("roofline_frac"), ".2f"), match, " ".join(("ok", *r.flags))], "ok"


class MarkdownPrinter(Printer):
    def header(self) -> None:
        self.out.write(markdown_table([c for c, _ in SUMMARY_COLUMNS], []) + "\n")

    def rows(self, rows: Sequence[BenchmarkResult]) -> None:
        for cell in by_cell(rows):
            self.out.write(markdown_row(summary_cells(cell)[0]) + "\n")


def results_table(rows: Iterable[BenchmarkResult], title: str = ""):
    """The rich table of per-cell summaries (the live sweep view and `--format table`)."""
    from rich.table import Table

    t = Table(title=title or None, header_style="bold")
    for col, right in SUMMARY_COLUMNS:
        t.add_column(col, justify="right" if right else "left")
    for cell in by_cell(rows):
        values, status = summary_cells(cell)
        if status == "ok" and len(values[-1]) > 2:
            values[-1] = f"ok [yellow]{values[-1][3:]}[/]"
        elif status != "ok":
            values[-1] = f"[red]{status}[/]{values[-1][len(status):]}"
        t.add_row(*values)
    return t


class TablePrinter(Printer):
    """A rich table: it needs every row, so it prints at the footer."""

    def __init__(self, out: TextIO):
        super().__init__(out)
        self.collected: list[BenchmarkResult] = []

    def rows(self, rows: Sequence[BenchmarkResult]) -> None:
        self.collected += rows

    def footer(self) -> None:
        from rich.console import Console

        tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        # piped output keeps the table readable instead of folding it to 80 columns
        Console(file=self.out, highlight=False, width=None if tty else 200).print(results_table(self.collected))


PRINTERS: dict[str, type[Printer]] = {"table": TablePrinter, "csv": CsvPrinter, "jsonl": JsonlPrinter,
                                      "markdown": MarkdownPrinter}


def print_rows(rows: Sequence[BenchmarkResult], fmt: str, out: TextIO) -> None:
    printer = PRINTERS[fmt](out)
    printer.header()
    printer.rows(rows)
    printer.footer()


class ResultWriter:
    """Appends rows to FILE.csv and FILE.jsonl beside it; each `write` is one flushed, fsynced
    append per file (an atomic rewrite when a resumed cell replaces its old rows), so a crash or
    a kill between writes loses nothing already written."""

    def __init__(self, csv_path: str | os.PathLike, row_class: type = BenchmarkResult, *, continuing: bool = True):
        """`row_class`: the typed rows written (BenchmarkResult, or ServeResult for `bench serve`).
        `continuing=False`: a file that already holds rows is refused, untouched (a second run of
        the same cells appended to it would mix with the first; `--resume` continues a file)."""
        self.csv_path = Path(csv_path)
        if self.csv_path.suffix != ".csv":
            raise InputError(f"--output must name a .csv file, got {self.csv_path}")
        self.jsonl_path = self.csv_path.with_suffix(".jsonl")
        self.columns = row_class.csv_columns()
        self.superseding = False  # set by `completed_cells`: rewritten cells replace their old rows
        if not continuing:
            _refuse_rows(self.csv_path, self.jsonl_path)
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            with open(self.csv_path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise InputError(f"{self.csv_path} exists with other columns; choose another --output")
            _repair_tail(self.csv_path)
            _repair_tail(self.jsonl_path)
        else:
            self._append(self.csv_path, self._csv, header=True)

    def _csv(self, out: TextIO) -> CsvPrinter:
        return CsvPrinter(out, self.columns)

    @staticmethod
    def _append(path: Path, printer: Callable[[TextIO], Printer], rows: Sequence[Any] = (), header: bool = False) -> None:
        with open(path, "a", encoding="utf-8", newline="") as f:
            p = printer(f)
            if header:
                p.header()
            p.rows(rows)
            f.flush()
            os.fsync(f.fileno())

    def write(self, rows: Sequence[BenchmarkResult]) -> None:
        if not self.superseding:
            self._append(self.jsonl_path, JsonlPrinter, rows)
            self._append(self.csv_path, self._csv, rows)
            return
        # a cell measured again (it had failed, or a kill cut it short) replaces its earlier rows:
        # one atomic rewrite per file, every other line kept byte for byte
        cells = {r.cell_id for r in rows}
        for path, printer in ((self.jsonl_path, JsonlPrinter), (self.csv_path, self._csv)):
            buf = io.StringIO()
            printer(buf).rows(rows)
            _rewrite(path, _without_cells(path, cells) + buf.getvalue())

    def update_cells(self, changes: Mapping[str, Mapping[str, Any]], reset: Mapping[str, Any] | None = None,
                     drop_flags: Iterable[str] = ()) -> None:
        """Verdicts that need the whole file, such as `best`, written onto its rows: every row gets
        `reset`'s fields and loses `drop_flags`, then each row of a cell in `changes` gets that
        change's fields, its `flags` added to the row's own. One atomic rewrite of each file; rows
        and fields the change does not name are kept as they were."""
        reset, drop = dict(reset or {}), set(drop_flags)

        def updated(row: dict[str, Any], flags: list[str]) -> tuple[dict[str, Any], list[str]]:
            change = dict(changes.get(row.get("cell_id"), {}))
            kept = [f for f in flags if f not in drop]  # a verdict decided again replaces the old one
            return {**reset, **change}, kept + [f for f in change.pop("flags", ()) if f not in kept]

        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            fields, flags = updated(r, [x for x in r["flags"].split(";") if x])
            r.update(csv_record({**fields, "flags": flags}))
        _rewrite(self.csv_path, csv_text(rows, self.columns, header=True))
        if not self.jsonl_path.exists():
            return
        rows_j = read_jsonl(self.jsonl_path)
        for r in rows_j:
            fields, r["flags"] = updated(r, list(r.get("flags") or []))
            r.update({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fields.items()})
        _rewrite(self.jsonl_path, "".join(json.dumps(r, default=json_default) + "\n" for r in rows_j))

    def completed_cells(self) -> set[str]:
        """Cell ids measured in full in the CSV: some run (`run_id`) of the cell wrote every repeat,
        status ok. Nothing is deleted here; a cell that failed or was cut short by a kill runs
        again and its new rows supersede its old ones (`write`), so a resumed sweep ends with
        every cell it ran exactly once and every row of any other cell as it was."""
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        runs = Counter((r["cell_id"], r["run_id"]) for r in rows if r["status"] == "ok")
        self.superseding = True
        return {r["cell_id"] for r in rows
                if r["status"] == "ok" and runs[r["cell_id"], r["run_id"]] == int(r["iterations"] or 0)}


def _rewrite(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _repair_tail(path: Path) -> None:
    """Drop a last line left half-written by a killed process, so appends start on a clean line."""
    if not path.exists() or not path.stat().st_size:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line from a killed writer
    return rows


def _refuse_rows(csv_path: Path, jsonl_path: Path) -> None:
    held = max(len(_csv_records(csv_path)) - 1, 0) or len(read_jsonl(jsonl_path) if jsonl_path.exists() else [])
    if held:
        raise InputError(f"{csv_path} already holds {held} row(s): add --resume to continue it, "
                         "or name another --output")


def _csv_records(path: Path) -> list[tuple[str, list[str]]]:
    """Each CSV record (header first) with its exact text, a quoted field's line breaks included."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        lines: list[str] = []

        def read():
            for line in f:
                lines.append(line)
                yield line

        out = []
        for record in csv.reader(read()):  # the reader takes lines only until its record is complete
            out.append(("".join(lines), record))
            lines.clear()
        return out


def _without_cells(path: Path, cells: set[str]) -> str:
    """The text of a results file (CSV or JSONL) without the rows of `cells`, every other line as it was."""
    if path.suffix == ".csv":
        records = _csv_records(path)
        col = records[0][1].index("cell_id")
        return "".join(text for i, (text, rec) in enumerate(records) if i == 0 or rec[col] not in cells)
    if not path.exists():
        return ""
    with open(path, encoding="utf-8", newline="") as f:
        return "".join(line for line in f if _jsonl_cell(line) not in cells)


def _jsonl_cell(line: str) -> str | None:
    try:
        return json.loads(line).get("cell_id")
    except ValueError:
        return None  # a blank or torn line: kept as it was
