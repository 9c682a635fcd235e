"""Sweeps on a real two-node Ray cluster on this machine (`bench node head` + `bench node join`):
every cell exactly once with its node's columns, a node killed mid-sweep loses nothing, a cell no
node can run is `unavailable`, a killed driver resumes; nothing of Ray is left running."""

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import ROOT, bench, require_module
from engine.measure.bandwidth import cache_name

require_module("ray")

RAY_DAEMONS = ("raylet", "gcs_server")
NODE_GBPS = {"a": 11.0, "b": 22.0}  # each node's own bandwidth figure, told apart in the rows


def ray_daemons() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_DAEMONS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Nodes started with `bench node`, each with its own cache folder (bandwidth figure, state)."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.before = ray_daemons()

    def env(self, name: str) -> dict:
        cache = self.tmp / f"cache-{name}"
        cache.mkdir(exist_ok=True)
        (cache / cache_name()).write_text(json.dumps(
            {"read_gbps": NODE_GBPS[name], "gemv_gbps": 1.0, "host_gbps": NODE_GBPS[name], "measured_at": 0}))
        return {"BENCH_CACHE_DIR": str(cache)}

    def start(self, name: str) -> None:
        args = ["node", "head", "--port", str(self.port)] if name == "a" else ["node", "join", self.address]
        r = bench(*args, "--name", name, "--object-store-mb", "100", env=self.env(name), timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"node {name} is up" in r.stdout

    def node_pgid(self, name: str) -> int:
        return json.loads((self.tmp / f"cache-{name}" / "nodes" / f"{name}.json").read_text())["pid"]

    def kill_raylet(self, name: str) -> None:
        """The machine gone, as far as Ray can tell: its raylet SIGKILLed."""
        pgid = self.node_pgid(name)
        raylets = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet" and os.getpgid(p.pid) == pgid]
        assert raylets, f"no raylet of node {name}"
        for p in raylets:
            p.kill()

    def stop(self) -> None:
        for name in ("b", "a"):
            if (self.tmp / f"cache-{name}" / "nodes" / f"{name}.json").exists():
                r = bench("node", "stop", env=self.env(name), timeout=120)
                assert r.returncode == 0, r.stderr
        deadline = time.time() + 30
        while ray_daemons() - self.before and time.time() < deadline:
            time.sleep(0.5)
        assert not ray_daemons() - self.before, "Ray daemons left running"

    def sweep(self, cfg: Path, csv: Path, *extra: str, timeout: int = 300):
        return bench("sweep", str(cfg), "--ray", self.address, "-O", str(csv), *extra, timeout=timeout)


def two_nodes(tmp: Path):
    c = Cluster(tmp)
    try:
        c.start("a")
        c.start("b")
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = two_nodes(tmp_path_factory.mktemp("ray"))
    yield c
    c.stop()


def config(tmp_path: Path, model: str, body: str) -> Path:
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'[sweep]\nframework = "numpy"\nmodel = "{model}"\nprompt_tokens = 4\nrepeats = 2\nwarmup = 0\n'
                   f'timeout_s = 60\n{body}\n')
    return cfg


def exactly_once(df: pd.DataFrame) -> None:
    per_cell = df.groupby("cell_id").size()
    expected = df.groupby("cell_id").apply(lambda g: g.iterations.iloc[0] if g.status.iloc[0] == "ok" else 1)
    assert (per_cell == expected).all(), "a cell has missing or duplicate rows"


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def test_a_sweep_spreads_over_both_nodes_once_each_with_node_columns(cluster, tiny_f32, tmp_path):
    cfg = config(tmp_path, tiny_f32, 'node = ["a", "b"]\ngen_tokens = [2, 3]')
    csv = tmp_path / "spread.csv"
    r = cluster.sweep(cfg, csv)
    assert r.returncode == 0, r.stderr
    assert "on a:" in r.stderr and "on b:" in r.stderr  # progress names the node
    df = pd.read_csv(csv)
    assert len(df) == 8 and df.cell_id.nunique() == 4 and (df.status == "ok").all()
    exactly_once(df)
    assert sorted(df.node.unique()) == ["a", "b"]
    assert df.ray_node_id.nunique() == 2 and df.host.notna().all() and df.cpu.notna().all()
    for name, gbps in NODE_GBPS.items():  # each node's own bandwidth, so roofline is per machine
        mine = df[df.node == name]
        assert (mine.host_gbps == gbps).all()
        assert (abs(mine.roofline_frac - mine.achieved_gbps / gbps) < 1e-9).all()
    assert (df.match_tokens == df.gen_tokens).all()  # the reference gate ran on the cluster too
    assert set(df.git_commit.astype(str)) == {head_commit()}  # workers import this checkout's code
    jsonl = pd.read_json(csv.with_suffix(".jsonl"), lines=True)
    assert len(jsonl) == len(df) and set(jsonl.node) == {"a", "b"}


def test_a_cell_no_node_can_run_is_unavailable_with_the_reason(cluster, tiny_f32, tmp_path):
    cfg = tmp_path / "cuda.toml"
    cfg.write_text(f'[sweep]\nframework = "torch"\ndevice = "cuda"\nmodel = "{tiny_f32}"\nprompt_tokens = 4\n'
                   f'gen_tokens = 2\nrepeats = 1\nwarmup = 0\n')
    csv = tmp_path / "cuda.csv"
    r = cluster.sweep(cfg, csv, "--no-check")
    assert r.returncode == 0, r.stderr
    assert "1 cell(s) unavailable on this cluster" in r.stderr
    row = pd.read_csv(csv).iloc[0]
    assert row.status == "unavailable" and "torch on cuda" in row.error and "a (" in row.error

    r = cluster.sweep(config(tmp_path, tiny_f32, 'node = "nowhere"\ngen_tokens = 2'), csv, "--resume")
    assert r.returncode == 0, r.stderr
    row = pd.read_csv(csv).iloc[-1]
    assert row.status == "unavailable" and "no node named 'nowhere'" in row.error


def test_doctor_lists_every_node_with_its_bandwidth(cluster):
    r = bench("doctor", "--ray", cluster.address)
    assert r.returncode == 0, r.stderr
    assert "2 node(s)" in r.stdout and "11.0" in r.stdout and "22.0" in r.stdout and "numpy" in r.stdout


def test_bad_addresses_and_node_without_cluster_are_one_line(tiny_f32, tmp_path):
    cfg = config(tmp_path, tiny_f32, 'node = "a"\ngen_tokens = 2')
    r = bench("sweep", str(cfg), "-O", str(tmp_path / "x.csv"))
    assert r.returncode == 2 and "needs a cluster: add --ray" in r.stderr
    r = bench("sweep", str(cfg), "--ray", "nohost", "-O", str(tmp_path / "x.csv"))
    assert r.returncode == 2 and "HOST:PORT" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_driver_killed_then_resume_completes_every_cell_once(cluster, tiny_f32, tmp_path):
    cfg = config(tmp_path, tiny_f32, 'gen_tokens = 4\nseed = [0, 1, 2, 3, 4, 5]\nthreads = [1, 2]\nmin_time_s = 0.5')
    csv = tmp_path / "resume.csv"
    args = [sys.executable, "-m", "engine", "sweep", str(cfg), "--ray", cluster.address, "-O", str(csv)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (csv.exists() and csv.read_text().count("\n") - 1 >= 4):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = pd.read_csv(csv)
    assert 0 < partial.cell_id.nunique() < 12
    r = cluster.sweep(cfg, csv, "--resume")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(csv)
    assert df.cell_id.nunique() == 12 and (df.status == "ok").all()
    exactly_once(df)


@pytest.mark.slow
def test_a_node_killed_mid_sweep_loses_nothing_and_duplicates_nothing(tiny_f32, tmp_path):
    c = two_nodes(tmp_path)
    try:
        # two load groups (threads 1 and 2; seeds share a load), one per node's slot; each cell ~0.5 s
        cfg = config(tmp_path, tiny_f32, 'gen_tokens = 4\nseed = [0, 1, 2, 3, 4, 5]\nthreads = [1, 2]\nmin_time_s = 0.5')
        csv = tmp_path / "kill.csv"
        args = [sys.executable, "-m", "engine", "sweep", str(cfg), "--ray", c.address, "-O", str(csv)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:  # kill node b once it has finished a cell and is in the next
            try:
                if "b" in set(pd.read_csv(csv).node.astype(str)):
                    break
            except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError, AttributeError):
                pass
            time.sleep(0.1)
        c.kill_raylet("b")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        df = pd.read_csv(csv)
        assert df.cell_id.nunique() == 12 and (df.status == "ok").all(), df[["node", "status", "error"]]
        exactly_once(df)
        assert {"a", "b"} <= set(df.node)
        b_group = df[df.threads == df[df.node == "b"].threads.iloc[0]]
        assert set(b_group.node) == {"a", "b"}  # b's unfinished cells finished on a
    finally:
        c.stop()


@pytest.mark.slow
def test_ray_local_measures_what_a_local_run_measures(tiny_f32, tmp_path):
    """`--ray local`: a one-node cluster in the driver; the measuring child sees this host's thread
    settings (not the OMP_NUM_THREADS=1 Ray gives its workers), and Ray leaves nothing running."""
    before = ray_daemons()
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[sweep]\nframework = "torch"\nmodel = "{tiny_f32}"\nprompt_tokens = 4\ngen_tokens = 2\n'
                   f'repeats = 1\nwarmup = 0\n')
    extras = {}
    for mode in ("local", "ray"):
        csv = tmp_path / f"{mode}.csv"
        r = bench("sweep", str(cfg), "-O", str(csv), "--no-check", *(["--ray", "local"] if mode == "ray" else []))
        assert r.returncode == 0, r.stderr
        row = pd.read_csv(csv).iloc[0]
        assert row.status == "ok" and (row.node == platform.node() if mode == "ray" else pd.isna(row.node))
        extras[mode] = json.loads(row.extra)
    assert extras["ray"]["torch_threads"] == extras["local"]["torch_threads"]
    deadline = time.time() + 30
    while ray_daemons() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_daemons() - before


@pytest.mark.slow
def test_a_cell_pinned_to_a_node_that_dies_is_lost_and_the_rest_unavailable(tiny_f32, tmp_path):
    c = two_nodes(tmp_path)
    try:
        cfg = config(tmp_path, tiny_f32, 'node = "b"\ngen_tokens = 4\nseed = [0, 1, 2, 3, 4, 5]\nmin_time_s = 0.5')
        csv = tmp_path / "pinned.csv"
        args = [sys.executable, "-m", "engine", "sweep", str(cfg), "--ray", c.address, "-O", str(csv)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline and not (csv.exists() and csv.read_text().count("\n") >= 2):
            time.sleep(0.1)
        c.kill_raylet("b")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err  # a lost cell is a failed cell
        df = pd.read_csv(csv)
        assert df.cell_id.nunique() == 6
        exactly_once(df)
        per_cell = df.groupby("cell_id").status.first().value_counts().to_dict()
        assert per_cell.get("lost") == 1 and per_cell.get("ok", 0) >= 1, per_cell
        assert per_cell["ok"] + 1 + per_cell.get("unavailable", 0) == 6
        lost = df[df.status == "lost"].iloc[0]
        assert lost.node == "b" and "lost mid-cell" in lost.error
    finally:
        c.stop()
