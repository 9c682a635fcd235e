"""Batches through the CLI: `bench run -b 1 -b N` rows carry every sequence's prompt, tokens and
reference match; what cannot run is a row with its reason; `bench report` draws the scaling."""

import json
from dataclasses import replace

import pandas as pd

from conftest import FAULT_ENV, bench
from engine.generate.prompts import seeded_prompt
from engine.model.spec import ModelSpec


def _jsonl(csv):
    return [json.loads(line) for line in csv.with_suffix(".jsonl").read_text().splitlines()]


def test_batch_rows_hold_every_sequence_checked_against_the_reference(tiny_f32, tmp_path):
    out = tmp_path / "b.csv"
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "-b", "1", "-b", "3", "-n", "6", "-r", "2", "-O", str(out))
    assert r.returncode == 0, r.stderr
    rows = _jsonl(out)
    assert sorted(x["batch_size"] for x in rows) == [1, 1, 3, 3]
    one = next(x for x in rows if x["batch_size"] == 1)
    spec = ModelSpec.open(tiny_f32)
    for x in (x for x in rows if x["batch_size"] == 3):
        # sequence b runs the prompt a single-sequence cell runs at seed b, and generates what it generates
        assert x["batch_prompt_ids"] == [seeded_prompt(spec, 32, b) for b in range(3)]
        assert x["prompt_ids"] == one["prompt_ids"] == x["batch_prompt_ids"][0]
        assert x["tokens"] == one["tokens"] == x["batch_tokens"][0]
        assert [len(t) for t in x["batch_tokens"]] == [6, 6, 6] and x["gen_tokens"] == 6
        assert x["batch_match_tokens"] == [6, 6, 6] and x["match_tokens"] == 6 and "diverged" not in x["flags"]
        assert abs(x["decode_tps"] - 3 * x["decode_tps_per_seq"]) < 1e-6 * x["decode_tps"]
        assert len(x["itl_s"]) == 5  # per step, not per token
        assert x["bytes_per_token"] < one["bytes_per_token"]  # the weights are read once per step for 3 tokens
    csv = pd.read_csv(out, dtype=str)
    batched = csv[csv.batch_size == "3"].iloc[0]
    assert [s.split() for s in batched.batch_tokens.split("|")] == [[str(t) for t in s] for s in rows[2]["batch_tokens"]]
    assert batched.batch_match_tokens == "6 6 6"
    assert len(next(x for x in rows if x["batch_size"] == 1)["batch_tokens"]) == 1

    report = bench("report", str(out), "--out", str(tmp_path / "rep"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "rep" / "batch_scaling.png").stat().st_size > 10_000
    assert "| gen_tokens | batch_size |" in (tmp_path / "rep" / "report.md").read_text()


def test_a_batch_beyond_the_memory_limit_is_an_oom_row_and_the_rest_runs(tiny_f32, tmp_path):
    out = tmp_path / "m.csv"
    r = bench("run", "-f", "numpy", "-m", tiny_f32, "-b", "1", "-b", "200000", "-n", "8",
              "--memory-limit-mb", "3000", "-O", str(out))
    assert r.returncode == 1
    df = pd.read_csv(out)
    assert dict(zip(df.batch_size, df.status)) == {1: "ok", 200000: "oom"}
    error = df[df.status == "oom"].error.iloc[0]
    assert error == ("a batch of 200000 sequences x 40 positions needs 3906 MB of KV cache, "
                     "beyond the memory limit of 3000 MB")


def test_a_framework_that_cannot_batch_is_unavailable_for_batches(tiny_f32, tmp_path):
    out = tmp_path / "s.csv"
    r = bench("run", "-f", "serial", "-m", tiny_f32, "-b", "1", "-b", "2", "-n", "4", "-O", str(out), env=FAULT_ENV)
    assert r.returncode == 0, r.stderr  # unavailable is not a failure
    df = pd.read_csv(out)
    assert dict(zip(df.batch_size, df.status)) == {1: "ok", 2: "unavailable"}
    assert df[df.status == "unavailable"].error.iloc[0] == "framework serial cannot decode a batch of 2 sequences in one step"


def test_a_cell_gets_the_same_load_alone_or_beside_a_larger_batch(default_model, tmp_path):
    """torch on the default model: the batch-1 cell of `-b 1 -b 8` is the batch-1 cell of `-b 1`."""
    both, alone = tmp_path / "both.csv", tmp_path / "alone.csv"
    common = ("run", "-f", "torch", "-m", default_model, "-n", "16", "-r", "1", "--warmup", "0", "--no-check")
    assert bench(*common, "-b", "1", "-b", "8", "-O", str(both)).returncode == 0
    assert bench(*common, "-b", "1", "-O", str(alone)).returncode == 0
    one_in_sweep, eight = sorted(_jsonl(both), key=lambda x: x["batch_size"])
    [one_alone] = _jsonl(alone)
    assert one_in_sweep["cell_id"] == one_alone["cell_id"]
    assert one_in_sweep["load"] == one_alone["load"]
    assert one_alone["load"]["sequences"] == 1 and one_alone["load"]["positions"] == 32 + 16
    assert eight["load"]["sequences"] == 8 and eight["load"]["positions"] == 32 + 16
    assert {k: v for k, v in eight["load"].items() if k != "sequences"} == \
        {k: v for k, v in one_alone["load"].items() if k != "sequences"}
    assert one_alone["load"]["threads"] == one_alone["threads"] and one_alone["load"]["compile"] is False
    csv = pd.read_csv(alone)
    assert json.loads(csv.load.iloc[0]) == one_alone["load"], "the CSV holds the load as JSON text"


def test_what_sizes_a_load_is_in_its_key_and_nothing_else_changes_a_cell_id(tiny_f32):
    from engine.measure.cell import Cell
    from engine.sweep.isolation import estimated_bytes

    cell = Cell(framework="torch", model=tiny_f32, prompt_tokens=32, gen_tokens=16)
    assert replace(cell, batch_size=8).load_key != cell.load_key
    assert replace(cell, gen_tokens=17).load_key != cell.load_key
    assert replace(cell, prompt_tokens=16, gen_tokens=32).load_key == cell.load_key, "same positions, same load"
    assert replace(cell, seed=5).load_key == cell.load_key
    assert replace(cell, prompt_text="hello").load_key != replace(cell, prompt_text="world").load_key
    # ids from before loads were sized per cell stay valid
    assert Cell(framework="llamacpp", model="/x/default.gguf", gen_tokens=16).cell_id == "469cc2370a69"
    assert Cell(framework="torch", model="/x/default.gguf", gen_tokens=16, batch_size=8).cell_id == "9faaae0f606e"
    # the interleave plan counts each lane's own KV caches (f32, every position of every sequence)
    kv = ModelSpec.open(tiny_f32).config.kv_bytes_per_token(4) * (32 + 16)
    assert estimated_bytes(replace(cell, batch_size=8)) - estimated_bytes(cell) == 7 * kv


def test_a_child_handed_cells_of_two_shapes_loads_each_for_its_own(tiny_f32):
    """The worker never measures a cell on a load sized for another, however the cells were grouped."""
    from engine.measure.cell import Cell
    from engine.sweep.child import GroupChild

    cells = [Cell(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=4, repeats=1, warmup=0, batch_size=b,
                  seed=seed) for b, seed in ((1, 0), (2, 0), (2, 1))]
    child = GroupChild(cells, 30.0, "t", debug=False)
    try:
        replies = [child.request(c, 30.0) for c in cells]
    finally:
        child.close()
    assert [r.kind for r in replies] == ["done"] * 3
    assert [r.rows[0]["load"]["sequences"] for r in replies] == [1, 2, 2]
    assert [r.rows[0]["load_s"] > 0 for r in replies] == [True, True, False], "equal shapes share a load"
