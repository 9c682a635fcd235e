import re
from pathlib import Path

from engine.results.rows import JSONL_ONLY, BenchmarkResult

DOC = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"


def documented_columns() -> list[str]:
    cols = []
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| ([a-z0-9_, ]+) \|", line)
        if m and m.group(1) != "column":
            cols += [c.strip() for c in m.group(1).split(",")]
    return cols


def test_every_column_is_documented_and_nothing_else():
    written = BenchmarkResult.csv_columns() + list(JSONL_ONLY)
    assert sorted(documented_columns()) == sorted(written)
