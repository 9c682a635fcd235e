"""`bench node head|join|stop`: this machine as a node of a benchmark cluster (Ray's own `ray start`,
plus what the harness needs: the measuring slot, the node's name, what it can run, its bandwidth).

Each node runs as `ray start ... --block` in its own session, recorded under
`<cache>/nodes/NAME.json`, so `bench node stop` ends exactly the nodes bench started here (never
other Ray processes of the machine) and two nodes can share one machine (give the second a
`--name`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from engine.errors import BenchError, InputError, UnavailableError
from engine.paths import cache_dir

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 45
READY = "block forever"  # what `ray start --block` prints once the node is up


def state_dir() -> Path:
    return cache_dir() / "nodes"


def recorded() -> dict[str, dict]:
    out = {}
    for path in sorted(state_dir().glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def running(pid: int) -> bool:
    """`pid` is still the `ray start` this module launched (not a recycled pid)."""
    import psutil

    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "ray" in cmd and " start" in cmd


def ray_command() -> list[str]:
    from engine.sweep.cluster import import_ray

    import_ray()
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [shutil.which("ray") or "ray"]


def start_node(name: str | None, head_port: int | None, address: str | None, num_cpus: int,
               object_store_mb: int) -> int:
    from engine.cli import display
    from engine.measure.bandwidth import host_bandwidth
    from engine.sweep.cluster import capabilities_in_child, check_node_name, node_resources, thread_env_marker

    name = check_node_name(name or socket.gethostname())
    prior = recorded().get(name)
    if prior and running(prior["pid"]):
        raise InputError(f"node {name!r} already runs here (pid {prior['pid']}); `bench node stop {name}` "
                         f"first, or give this one another --name")
    bw = host_bandwidth()["host_gbps"]  # once per host, before any measurement, cached for the tasks
    frameworks = capabilities_in_child()
    resources = node_resources(name, frameworks)
    cmd = ray_command() + ["start", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
                           "--object-store-memory", str(object_store_mb * 2**20), "--node-name", name,
                           "--disable-usage-stats", "--block"]
    cmd += ["--head", "--port", str(head_port), "--include-dashboard=false"] if address is None \
        else ["--address", address]
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
           **thread_env_marker()}
    state_dir().mkdir(parents=True, exist_ok=True)
    log_path = state_dir() / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if READY in text or proc.poll() is not None:
            break
        time.sleep(0.2)
    if READY not in text:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        tail = " | ".join(ln.strip() for ln in text.splitlines() if ln.strip())[-400:]
        raise UnavailableError(f"ray start failed for node {name!r}: {tail} (log: {log_path})")
    found = re.search(r"--address='([^']+)'", text)
    head = found.group(1) if found else address or f"{socket.gethostname()}:{head_port}"
    (state_dir() / f"{name}.json").write_text(json.dumps({"pid": proc.pid, "name": name, "cluster": head,
                                                          "head": address is None, "log": str(log_path)}))
    can = [f"{fw} ({', '.join(i['devices'])})" for fw, i in frameworks.items() if i["ok"]]
    display.stdout.print(f"node {name} is up ({'head of' if address is None else 'joined'} cluster {head}), "
                         f"memory bandwidth {bw:.1f} GB/s, runs: {', '.join(can) or 'nothing'}")
    if address is None:
        display.stdout.print(f"join other machines: bench node join {head}\nrun a sweep: bench sweep CONFIG --ray {head}")
    display.stdout.print(f"stop it: bench node stop {name}")
    return 0


def stop_nodes(names: tuple[str, ...]) -> int:
    from engine.cli import display

    nodes = recorded()
    unknown = [n for n in names if n not in nodes]
    if unknown:
        raise InputError(f"no node named {', '.join(unknown)} was started here (started: {', '.join(nodes) or 'none'})")
    # workers first: a head stopped first would leave its workers waiting for it
    targets = sorted(names or nodes, key=lambda n: nodes[n].get("head", False))
    for n in targets:
        pid = nodes[n]["pid"]
        if running(pid):
            os.kill(pid, signal.SIGTERM)  # `ray start --block` drains and stops its node's processes
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while running(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if running(pid):
                os.killpg(pid, signal.SIGKILL)
        try:
            os.killpg(pid, signal.SIGKILL)  # anything of that node's session still there
        except (ProcessLookupError, PermissionError):
            pass
        (state_dir() / f"{n}.json").unlink(missing_ok=True)
        display.stdout.print(f"node {n} stopped")
    if not targets:
        display.stdout.print("no node started here")
    return 0


@click.group()
def node() -> None:
    """This machine as a node of a benchmark cluster (Ray): head, join, stop."""


def _common(fn):
    fn = click.option("--name", help="node name for the `node` sweep axis (default: this host's name; "
                                     "a second node on one machine needs its own)")(fn)
    fn = click.option("--num-cpus", type=click.IntRange(min=1), default=1, show_default=True,
                      help="Ray CPUs (measurements use the slot, not these)")(fn)
    fn = click.option("--object-store-mb", type=click.IntRange(min=80), default=200, show_default=True,
                      help="Ray object store size (rows are small)")(fn)
    return fn


@node.command()
@click.option("--port", type=click.IntRange(1, 65535), default=6379, show_default=True, help="the cluster's port")
@_common
def head(port: int, name: str | None, num_cpus: int, object_store_mb: int) -> int:
    """Start a cluster with this machine as its head (and first node)."""
    return start_node(name, port, None, num_cpus, object_store_mb)


@node.command()
@click.argument("address", metavar="HOST:PORT")
@_common
def join(address: str, name: str | None, num_cpus: int, object_store_mb: int) -> int:
    """Join the cluster whose head is at HOST:PORT."""
    if not re.fullmatch(r"[^\s:]+:\d+", address):
        raise InputError(f"expected HOST:PORT of the cluster's head, got {address!r}")
    return start_node(name, None, address, num_cpus, object_store_mb)


@node.command()
@click.argument("names", nargs=-1)
def stop(names: tuple[str, ...]) -> int:
    """Stop the nodes bench started on this machine (all, or those NAMES)."""
    return stop_nodes(names)


def doctor_cluster(address: str, debug: bool) -> int:
    """`bench doctor --ray`: every node, what it runs and its bandwidth."""
    from rich.table import Table

    from engine.cli import display
    from engine.sweep.cluster import connect, disconnect
    from engine.sweep.ray_executor import cluster_facts

    connect(address, debug)
    try:
        facts = cluster_facts()
    except Exception as e:
        raise BenchError(f"asking the nodes failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        disconnect()
    t = Table(header_style="bold", title=f"Ray cluster {address}: {len(facts)} node(s)")
    for col in ("node", "host", "ray node", "cpu", "gpu", "GB/s", "frameworks (version: devices)", "bench commit"):
        t.add_column(col)
    for f in facts:
        fws = [f"{n} {i['version']}: {', '.join(i['devices'])}" for n, i in f["frameworks"].items() if i["ok"]]
        t.add_row(f["node"], f["host"], f["ray_node_id"][:12], f["cpu"], f["node_gpu"] or "-",
                  f"{f['host_gbps']:.1f}", "\n".join(fws), f["git_commit"] or "-")
    display.stdout.print(t)
    return 0
