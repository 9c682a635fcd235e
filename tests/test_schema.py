import re
from pathlib import Path

from engine.results.rows import JSONL_ONLY, BenchmarkResult
from engine.serve.rows import SERVE_JSONL_ONLY, ServeResult

DOC = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"
SERVE_HEADING = "## `bench serve` rows"


def documented_columns(section: str) -> list[str]:
    text = DOC.read_text()
    bench, _, serve = text.partition(SERVE_HEADING)
    cols = []
    for line in (serve if section == "serve" else bench).splitlines():
        m = re.match(r"\| ([a-z0-9_, ]+) \|", line)
        if m and m.group(1) != "column":
            cols += [c.strip() for c in m.group(1).split(",")]
    return cols


def test_every_column_is_documented_and_nothing_else():
    written = BenchmarkResult.csv_columns() + list(JSONL_ONLY)
    assert sorted(documented_columns("bench")) == sorted(written)


def test_every_serve_column_is_documented_and_nothing_else():
    written = ServeResult.csv_columns() + list(SERVE_JSONL_ONLY)
    assert sorted(documented_columns("serve")) == sorted(written)
