"""A Ray cluster of benchmark nodes: what each node advertises, how the driver connects, and which
nodes can run a cell.

Each node advertises custom Ray resources computed from the backends registry on that node:

- `bench_slot: 1`: the one measuring slot of the host; every measuring task holds it, so two
  measurements never share a node;
- `bench_node:<name>`: the node's name (`--name`, default its host name), for the `node` axis;
- `bench_fw_<framework>`: the framework is installed there;
- `bench_fw_<framework>@<device>` and `bench_device_<device>`: the framework can use that device.

Tasks ask for the slot and a sliver (0.001) of the others, so the slot alone limits concurrency.
Ray is imported only here and in `ray_executor`, never at module import.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InputError, UnavailableError
from engine.measure.cell import Cell
from engine.sweep.child import THREAD_VARS

SLOT = "bench_slot"
NODE_PREFIX = "bench_node:"
FW_PREFIX = "bench_fw_"
DEVICE_PREFIX = "bench_device_"
SLIVER = 0.001
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20
THREAD_ENV = "BENCH_NODE_THREAD_ENV"  # the node's own thread settings, before Ray's


def install_hint() -> str:
    return "pip install -e '.[ray]' (or scripts/setup.sh)"


def import_ray():
    # one auth mode for every node and driver bench starts: Ray's token auth unless the user chose
    # (RAY_AUTH_MODE=token with the token on every machine: README, "Sweeps across machines")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
    except ImportError:
        raise UnavailableError(f"ray is not installed: {install_hint()}") from None
    return ray


def thread_env_marker() -> dict[str, str]:
    """Put in a node's environment when it starts: its thread variables as the user set them."""
    return {THREAD_ENV: json.dumps({v: os.environ[v] for v in THREAD_VARS if v in os.environ})}


def restore_thread_env() -> None:
    """In a Ray worker: undo Ray's OMP_NUM_THREADS=1 (it sets it for tasks asking no CPUs), so a
    measurement on a cluster sees the same thread settings as one run locally on that machine."""
    own = json.loads(os.environ.get(THREAD_ENV, "{}"))
    for v in THREAD_VARS:
        if v in own:
            os.environ[v] = own[v]
        else:
            os.environ.pop(v, None)


def probe_capabilities() -> dict[str, Any]:
    """On this host: every framework's availability and the devices it can use here."""
    import backends

    frameworks = {}
    for name, cls in backends.registry().items():
        a = cls.availability()
        devices = [d for d in cls.devices if a.ok and not cls.device_missing(d)]
        frameworks[name] = {"ok": a.ok, "version": a.version, "reason": a.reason, "devices": devices}
    return frameworks


def capabilities_in_child() -> dict[str, Any]:
    """`probe_capabilities` in a child process, so probing (which imports every framework) leaves
    this process light."""
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "engine.sweep.cluster"], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0:
        raise UnavailableError(f"probing the frameworks of this host failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_resources(name: str, frameworks: dict[str, Any]) -> dict[str, float]:
    res = {SLOT: 1.0, NODE_PREFIX + name: 1.0}
    for fw, info in frameworks.items():
        if info["ok"]:
            res[FW_PREFIX + fw] = 1.0
            for d in info["devices"]:
                res[f"{FW_PREFIX}{fw}@{d}"] = 1.0
                res[DEVICE_PREFIX + d] = 1.0
    return res


def check_node_name(name: str) -> str:
    if not name or any(c.isspace() or c in ",:@\"'" for c in name):
        raise InputError(f"node name must be non-empty without spaces, quotes or ,:@ ; got {name!r}")
    return name


def gpu_name() -> str:
    """This host's GPU(s) as their driver names them: nvidia-smi, or the Apple chip; '' if none."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if names:
                return f"{names[0]} x{len(names)}" if len(names) > 1 else names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if platform.system() == "Darwin":
        try:
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
            return f"{chip} GPU" if chip.startswith("Apple") else ""
        except (OSError, subprocess.SubprocessError):
            return ""
    return ""


@dataclass
class NodeView:
    """One alive node as the driver sees it in `ray.nodes()`."""

    node_id: str
    name: str
    address: str
    resources: dict[str, float] = field(default_factory=dict)

    def frameworks(self) -> list[str]:
        return sorted(k[len(FW_PREFIX):] for k in self.resources if k.startswith(FW_PREFIX) and "@" not in k)

    def devices(self) -> list[str]:
        return sorted(k[len(DEVICE_PREFIX):] for k in self.resources if k.startswith(DEVICE_PREFIX))

    def summary(self) -> str:
        return f"{self.name} ({', '.join(self.frameworks()) or 'no framework'} on {', '.join(self.devices()) or '-'})"


def alive_nodes() -> list[NodeView]:
    """The cluster's alive bench nodes (those advertising a measuring slot)."""
    ray = import_ray()
    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if not n.get("Alive") or SLOT not in res:
            continue
        name = next((k[len(NODE_PREFIX):] for k in res if k.startswith(NODE_PREFIX)), n["NodeManagerAddress"])
        nodes.append(NodeView(n["NodeID"], name, n["NodeManagerAddress"], dict(res)))
    return sorted(nodes, key=lambda v: v.name)


def requirements(cell: Cell) -> dict[str, float]:
    """The Ray resources a task measuring `cell` asks for."""
    res = {SLOT: 1.0}
    fw = FW_PREFIX + cell.framework
    res[fw if cell.device == "auto" else f"{fw}@{cell.device}"] = SLIVER
    if cell.node:
        res[NODE_PREFIX + cell.node] = SLIVER
    return res


def eligible(cell: Cell, nodes: list[NodeView], exclude: set[str] = frozenset()) -> list[NodeView]:
    need = requirements(cell)
    return [n for n in nodes if n.node_id not in exclude and all(k in n.resources for k in need)]


def no_node_reason(cell: Cell, nodes: list[NodeView]) -> str:
    what = f"{cell.framework}" + ("" if cell.device == "auto" else f" on {cell.device}")
    where = f"node {cell.node!r}" if cell.node else "no node"
    if cell.node and not any(n.name == cell.node for n in nodes):
        where = f"no node named {cell.node!r}"
        return f"{where} in the cluster; nodes: {'; '.join(n.summary() for n in nodes) or 'none'}"
    prefix = f"{where} can run" if not cell.node else f"{where} cannot run"
    return f"{prefix} {what}; nodes: {'; '.join(n.summary() for n in nodes) or 'none'}"


def runtime_env() -> dict[str, Any]:
    """Ray workers import this checkout's `engine` and `backends` (a source checkout's, too)."""
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def connect(address: str, debug: bool = False) -> None:
    """Join the cluster at HOST:PORT as its driver, or `local`: start a one-node cluster in this
    process advertising what this host can run."""
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=debug, logging_level="INFO" if debug else "WARNING", configure_logging=True,
                 runtime_env=runtime_env())
    if address == "local":
        name = check_node_name(socket.gethostname())
        os.environ.update(thread_env_marker())  # the local node's processes inherit it
        ray.init(address="local", num_cpus=1, resources=node_resources(name, capabilities_in_child()),
                 include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray takes HOST:PORT of a running cluster's head (or 'local'), got {address!r}")
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError) as e:
        raise UnavailableError(f"cannot reach a Ray cluster at {address}: {str(e).splitlines()[0]} "
                               f"(start one with `bench node head`)") from None
    if not alive_nodes():
        ray.shutdown()
        raise UnavailableError(f"the Ray cluster at {address} has no bench node (start them with "
                               f"`bench node head` / `bench node join {address}`)")


def disconnect() -> None:
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":  # the capability probe, run in a child by capabilities_in_child()
    print(json.dumps(probe_capabilities()))
