"""Sweeps survive anything: faults become rows, kills lose nothing, resume completes exactly once."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import FAULT_ENV, ROOT, TESTS, backend_module_env, bench
from engine.measure.cell import Cell
from engine.sweep.cells import expand, load_config
from engine.errors import InputError



def test_every_fault_becomes_a_row_and_the_sweep_goes_on(tiny_f32, tmp_path):
    cfg = tmp_path / "faults.toml"
    cfg.write_text(f"""
[sweep]
framework = "faulty"
model = "{tiny_f32}"
prompt_tokens = 4
gen_tokens = 4
repeats = 2
warmup = 0
timeout_s = 20
memory_limit_mb = 1500
""")
    csv = tmp_path / "faults.csv"
    codes = {}
    for fault in ("raise", "abort", "hang", "oom", "none"):
        r = bench("sweep", str(cfg), "-o", f"fault={fault}", "-O", str(csv), *(["--resume"] if codes else []),
                  env=FAULT_ENV, timeout=120)
        codes[fault] = r.returncode
    assert codes == {"raise": 1, "abort": 1, "hang": 1, "oom": 1, "none": 0}
    df = pd.read_csv(csv)
    assert df["status"].value_counts().to_dict() == {"ok": 2, "error": 1, "crash": 1, "timeout": 1, "oom": 1}
    assert "injected failure" in df[df.status == "error"].iloc[0].error
    assert "SIGABRT" in df[df.status == "crash"].iloc[0].error
    assert "20 s" in df[df.status == "timeout"].iloc[0].error
    ok = df[df.status == "ok"]
    assert (ok.decode_tps > 0).all() and (ok.match_tokens == 4).all()


def test_a_crash_costs_one_cell_and_its_group_continues_in_a_fresh_child(tiny_f32, monkeypatch):
    from engine.sweep.isolation import run_cells

    for k, v in FAULT_ENV.items():
        monkeypatch.setenv(k, v)
    options = (("fault", "abort"), ("fault_prompt", 5))  # one load group; only the 5-token prompt aborts
    # one shape (9 positions a sequence), so one load key
    cells = [Cell(framework="faulty", model=tiny_f32, prompt_tokens=n, gen_tokens=9 - n, repeats=1, warmup=0,
                  timeout_s=30, options=options) for n in (4, 5, 6, 7)]
    assert len({c.load_key for c in cells}) == 1
    got = [(c.prompt_tokens, rows[0].status) for c, rows in run_cells(cells, 30.0, "t")]
    assert got == [(4, "ok"), (5, "crash"), (6, "ok"), (7, "ok")]


def test_sigkill_mid_sweep_then_resume_gives_every_cell_once(tiny_f32, tmp_path):
    csv = tmp_path / "resume.csv"
    args = [sys.executable, "-m", "engine", "run", "-f", "numpy", "-m", tiny_f32, "--prompt-tokens", "4",
            "-n", "2", "-n", "3", "-n", "4", "-n", "5", "-n", "6", "-n", "7", "-r", "3", "--warmup", "0",
            "--min-time", "0.5", "-O", str(csv)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's sources, as bench() runs them
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some but not all cells are written
        if csv.exists() and 2 <= csv.read_text().count("\n") - 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = pd.read_csv(csv)
    assert 0 < partial.cell_id.nunique() < 6
    r = bench(*args[3:], "--resume")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(csv)
    assert sorted(df.gen_tokens.unique()) == [2, 3, 4, 5, 6, 7]
    per_cell = df.groupby("cell_id").size()
    assert (per_cell == df.groupby("cell_id").iterations.first()).all(), "a cell has missing or duplicate rows"
    jsonl = pd.read_json(csv.with_suffix(".jsonl"), lines=True)
    assert len(jsonl) == len(df) and set(jsonl.cell_id) == set(df.cell_id)


def test_config_expansion_and_order(tmp_path, tiny_f32):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f"""
[sweep]
framework = ["numpy", "torch"]
model = "{tiny_f32}"
precision = ["f32"]
prompt_tokens = [16, 128]
gen_tokens = [8]
repeats = 5
""")
    cells = load_config(cfg, tiny_f32)
    assert len(cells) == 4 and all(c.repeats == 5 for c in cells)
    # cells sharing a loaded model are adjacent
    assert [c.framework for c in cells] == ["numpy", "numpy", "torch", "torch"]
    assert len({c.cell_id for c in cells}) == 4
    assert cells[0].cell_id == load_config(cfg, tiny_f32)[0].cell_id  # stable


def test_config_errors(tmp_path, tiny_f32):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\nframework = ['numpy']\nbogus = 3\n")
    with pytest.raises(InputError, match="unknown sweep setting.*bogus"):
        load_config(bad, tiny_f32)
    bad.write_text("not toml [")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(bad, tiny_f32)
    with pytest.raises(InputError, match="gen_tokens must be at least 1"):
        expand({"framework": ["numpy"]}, {"model": tiny_f32, "gen_tokens": 0})


@pytest.mark.parametrize("config", sorted(p.name for p in (TESTS.parent / "configs").glob("*.toml")))
def test_shipped_configs_expand(config):
    cells = load_config(TESTS.parent / "configs" / config, "default.gguf")
    assert cells and len({c.cell_id for c in cells}) == len(cells)


def test_a_framework_missing_here_is_an_unavailable_row_not_a_failure(tiny_f32, tmp_path):
    cfg = tmp_path / "missing.toml"
    cfg.write_text(f'[sweep]\nframework = ["numpy", "ghost"]\nmodel = "{tiny_f32}"\ngen_tokens = 2\nrepeats = 1\n')
    env = {"BENCH_BACKEND_MODULES": "ghost_backend",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    csv = tmp_path / "missing.csv"
    r = bench("sweep", str(cfg), "-O", str(csv), env=env)
    assert r.returncode == 0, r.stderr
    assert "1 cell(s) unavailable on this host" in r.stderr
    df = pd.read_csv(csv)
    ghost = df[df.framework == "ghost"].iloc[0]
    assert ghost.status == "unavailable" and "pip install ghostframework" in ghost.error


def test_repeats_of_load_groups_are_interleaved_and_a_crash_mid_rotation_costs_only_its_rows(tiny_f32, tmp_path):
    out = tmp_path / "rot.csv"
    cfg = tmp_path / "rot.toml"
    # three load groups: numpy, faulty (healthy), faulty aborting on its second generation
    cfg.write_text(f"""
[sweep]
framework = ["numpy", "faulty"]
model = "{tiny_f32}"
prompt_tokens = 4
gen_tokens = 3
repeats = 3
warmup = 0
timeout_s = 60
""")
    r = bench("sweep", str(cfg), "-O", str(out), env=FAULT_ENV)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert (df.schedule == "interleaved").all() and len(df) == 6
    order = df.sort_values("measured_at").framework.tolist()
    assert order == ["numpy", "faulty"] * 3, order  # A B A B A B, not A A A B B B
    crash = tmp_path / "crash.csv"
    r = bench("run", "-f", "numpy", "-f", "faulty", "-m", tiny_f32, "--prompt-tokens", "4", "-n", "3", "-r", "3",
              "--warmup", "0", "-o", "fault=abort", "-o", "fault_generation=2", "-O", str(crash), env=FAULT_ENV)
    assert r.returncode == 1
    df = pd.read_csv(crash)
    assert df[df.framework == "numpy"].status.tolist() == ["ok"] * 3, "the neighbour keeps every repeat"
    failed = df[df.framework == "faulty"]
    assert failed.status.tolist() == ["crash"] and "SIGABRT" in failed.error.iloc[0]


def test_sequential_when_asked_or_alone(tiny_f32, tmp_path):
    out = tmp_path / "seq.csv"
    r = bench("run", "-f", "numpy", "-f", "torch", "-m", tiny_f32, "--prompt-tokens", "4", "-n", "3", "-r", "2",
              "--no-interleave", "-O", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert (df.schedule == "sequential").all()
    assert df.sort_values("measured_at").framework.tolist() == ["numpy", "numpy", "torch", "torch"]
    from engine.measure.cell import physical_cores

    assert (df.threads == physical_cores()).all(), "without --threads every framework gets every core"


def _run_numpy(tiny_f32, csv, *args):
    return bench("run", "-f", "numpy", "-m", tiny_f32, "--prompt-tokens", "4", "-r", "2", "--warmup", "0",
                 "-O", str(csv), *args)


def test_output_with_rows_refused_without_resume_and_left_untouched(tiny_f32, tmp_path):
    csv = tmp_path / "kept.csv"
    assert _run_numpy(tiny_f32, csv, "-n", "2").returncode == 0
    before = (csv.read_bytes(), csv.with_suffix(".jsonl").read_bytes())
    r = _run_numpy(tiny_f32, csv, "-n", "2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: {csv} already holds 2 row(s): add --resume to continue it, "
                                "or name another --output")
    assert (csv.read_bytes(), csv.with_suffix(".jsonl").read_bytes()) == before


def test_resume_keeps_every_row_of_a_cell_already_measured(tiny_f32, tmp_path):
    """A file holding two runs of a cell (what reusing -O used to leave) keeps both through --resume."""
    first, second, csv = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "both.csv"
    for out in (first, second):
        assert _run_numpy(tiny_f32, out, "-n", "2").returncode == 0
    for suffix in (".csv", ".jsonl"):
        tail = second.with_suffix(suffix).read_text().splitlines(keepends=True)[suffix == ".csv":]
        csv.with_suffix(suffix).write_text(first.with_suffix(suffix).read_text() + "".join(tail))
    before = {s: csv.with_suffix(s).read_bytes() for s in (".csv", ".jsonl")}
    r = _run_numpy(tiny_f32, csv, "-n", "2", "-n", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed: 1 cell(s) already in" in r.stderr
    for s, old in before.items():
        assert csv.with_suffix(s).read_bytes().startswith(old), f"a row of the {s} was changed or lost"
    df = pd.read_csv(csv)
    assert df.groupby("gen_tokens").size().to_dict() == {2: 4, 3: 2}


def test_resume_measures_a_failed_cell_again_and_replaces_only_its_row(tiny_f32, tmp_path):
    csv = tmp_path / "failed.csv"
    assert _run_numpy(tiny_f32, csv, "-n", "2").returncode == 0
    ok_rows = csv.read_text()
    r = _run_numpy(tiny_f32, csv, "-n", "3", "--timeout", "0.001", "--resume")  # the cell is killed
    assert r.returncode == 1 and pd.read_csv(csv).status.tolist() == ["ok", "ok", "timeout"]
    r = _run_numpy(tiny_f32, csv, "-n", "2", "-n", "3", "--resume")  # timeout_s is not in the cell id
    assert r.returncode == 0, r.stderr
    assert csv.read_text().startswith(ok_rows)
    df = pd.read_csv(csv)
    assert df.status.tolist() == ["ok"] * 4 and df.gen_tokens.tolist() == [2, 2, 3, 3]
    assert (df.match_tokens == df.gen_tokens).all()
    jsonl = pd.read_json(csv.with_suffix(".jsonl"), lines=True)
    assert jsonl[["cell_id", "status"]].values.tolist() == df[["cell_id", "status"]].values.tolist()


def _workers() -> list:
    import psutil

    return [p for p in psutil.Process().children() if "engine.sweep.worker" in " ".join(p.cmdline())]


def test_interleaved_children_start_together_before_any_measuring_and_exit_together_at_the_end(tiny_f32):
    from engine.sweep.isolation import run_cells

    # two load groups (9 and 10 positions a sequence), one repeat each
    cells = [Cell(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=n, repeats=1, warmup=0)
             for n in (5, 6)]
    assert len({c.load_key for c in cells}) == 2
    alive_at_start, alive_after_cell = [], []
    results = run_cells(cells, 30.0, "t", on_start=lambda c: alive_at_start.append(len(_workers())))
    for cell, rows in results:
        assert rows[0].status == "ok"
        alive_after_cell.append(len(_workers()))
    assert alive_at_start == [2, 2], "every lane's child was up (imports done) before the first request"
    assert alive_after_cell == [2, 2], "a finished lane's child waits for the end instead of exiting mid-sweep"
    assert _workers() == [], "and all of them are gone once the sweep ends"


def test_every_group_is_prepared_before_the_first_timed_repeat(tiny_f32):
    from engine.sweep.isolation import run_cells

    cells = [Cell(framework="numpy", model=tiny_f32, prompt_tokens=4, gen_tokens=n, repeats=2, warmup=1)
             for n in (5, 6, 7)]  # three load groups
    events = []
    for _ in run_cells(cells, 30.0, "t", on_progress=lambda p: events.append((p.kind, p.cell.gen_tokens))):
        pass
    kinds = [k for k, _ in events]
    assert kinds[:6] == ["loaded", "prepared"] * 3 and set(kinds[6:]) == {"repeat"}, events
    assert [n for k, n in events if k == "repeat"] == [5, 6, 7, 5, 6, 7], "the repeats round-robin"


def test_a_cells_load_and_warm_up_have_a_timeout_of_their_own(tiny_f32, tmp_path):
    """The child's start, load and warm-up (about 2 s of 500 ms steps after the imports) and the three
    repeats (6 s) each within --timeout 8, together beyond it: the cell completes; a warm-up beyond
    the timeout is a `timeout` row."""
    paced = backend_module_env("paced_backend")
    args = ("run", "-f", "paced_apart", "-m", tiny_f32, "--prompt-tokens", "4", "-n", "4", "-r", "3", "--warmup", "1",
            "--no-check", "-o", "step_ms=500")
    ok, slow = tmp_path / "ok.csv", tmp_path / "slow.csv"
    r = bench(*args, "--timeout", "8", "-O", str(ok), env=paced)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(ok).status.tolist() == ["ok"] * 3
    r = bench(*args, "--timeout", "1.0", "-O", str(slow), env=paced)
    assert r.returncode == 1
    assert pd.read_csv(slow).status.tolist() == ["timeout"]


def test_a_group_failing_while_it_prepares_costs_its_cell_only(tiny_f32, monkeypatch):
    """Faults during the side-by-side loads and warm-ups: a crash and a hang become their rows, the
    healthy group is measured, and no child is left."""
    from engine.sweep.isolation import run_cells

    for k, v in FAULT_ENV.items():
        monkeypatch.setenv(k, v)
    faults = [("numpy", ()), ("faulty", (("fault", "abort"),)), ("faulty", (("fault", "hang"),))]
    cells = [Cell(framework=f, model=tiny_f32, prompt_tokens=4, gen_tokens=3, repeats=2, warmup=1, timeout_s=10,
                  options=o) for f, o in faults]
    got = sorted((c.framework, rows[0].status, len(rows)) for c, rows in run_cells(cells, 30.0, "t"))
    assert got == [("faulty", "crash", 1), ("faulty", "timeout", 1), ("numpy", "ok", 2)], got
    assert _workers() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_measuring_children_die_with_the_harness(tiny_f32, tmp_path, sig):
    """`bench run` stopped by SIGTERM (whose default action runs no cleanup) or SIGKILL while a cell
    hangs: the kernel ends its measuring children too (parent-death signal), none is left running."""
    import psutil

    env = {**os.environ, **FAULT_ENV}
    harness = subprocess.Popen([sys.executable, "-m", "engine", "run", "-f", "faulty", "-m", tiny_f32, "-o", "fault=hang",
                                "--no-check", "-n", "2", "-O", str(tmp_path / "h.csv")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while not workers and time.time() < deadline:
        time.sleep(0.2)
        workers = [p for p in psutil.Process(harness.pid).children(recursive=True)
                   if "engine.sweep.worker" in " ".join(p.cmdline())]
    assert workers, "the cell's child never started"
    harness.send_signal(sig)
    harness.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], f"left running after the harness died: {alive}"
