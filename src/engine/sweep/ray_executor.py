"""Run a sweep's load groups as Ray tasks on the nodes that can run them; rows stream back.

Each load group becomes one streaming Ray task holding its node's measuring slot. On the node the
task reads the node's own bandwidth figure and runs the group through `isolation.run_cells`
(children, timeouts, crash rows: exactly as locally), yielding one event per finished cell. The
driver alone writes rows. A node lost mid-cell (raylet killed, machine gone) gets the cell retried
once on another eligible node, else a `lost` row; a cell no node can run is `unavailable`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import backends
from engine.measure.cell import Cell
from engine.measure.runner import failure_row
from engine.results.rows import BenchmarkResult
from engine.sweep import cluster

POLL_S = 1.0  # how often the driver re-checks that queued tasks still have a node to run on
NODE_ID = re.compile(r"node ID: ([0-9a-f]{16,})")


# ---- on the node ---------------------------------------------------------------------------

def node_identity() -> dict[str, str]:
    """Who this node is: its bench name, Ray node id, host, CPU and GPU."""
    import ray

    from engine.results.rows import provenance

    node_id = ray.get_runtime_context().get_node_id()
    res = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
    name = next((k[len(cluster.NODE_PREFIX):] for k in res if k.startswith(cluster.NODE_PREFIX)), "")
    prov = provenance()
    return {"node": name or prov["host"], "ray_node_id": node_id, "node_gpu": cluster.gpu_name(),
            "host": prov["host"], "cpu": prov["cpu"]}


def localize(cell: Cell) -> Cell:
    """The cell with its model path as this node has it: the driver's path, or the same file
    name among this node's synthetic models or shipped default (`cell_id` keys on the name)."""
    if os.path.exists(cell.model):
        return cell
    from engine.model.catalog import resolve_model
    from engine.model.spec import default_model_path

    name = os.path.basename(cell.model)
    stem = name.removesuffix(".gguf")
    if name == os.path.basename(default_model_path()):
        return replace(cell, model=default_model_path())
    if stem.count("-") == 1:
        shape, qtype = stem.split("-")
        try:
            return replace(cell, model=resolve_model(f"synth:{shape}:{qtype}"))
        except Exception:  # not a synthetic model's name: the worker reports the missing file
            return cell
    return cell


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One measurement per machine, even with several nodes on it (the node's slot covers one node):
    an exclusive lock on a file every node of this machine sees."""
    import fcntl

    path = os.path.join(tempfile.gettempdir(), "llm-bench-measuring.lock")
    try:
        f = open(path, "a")
    except OSError:  # another user's file
        f = open(f"{path}.{os.getuid()}", "a")
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def missing_references(cells: list[Cell]) -> list[Cell]:
    """The cells whose reference answers (tokens, corpus distributions) this node has not cached:
    they are keyed by the model file as this node has it, so each node runs the reference itself."""
    from engine.sweep.run import ReferenceTokens

    check = ReferenceTokens(0.0, "")
    return [c for c in cells if c.framework != backends.reference().name and check.ready(c) is False]


def measure_group(cells: list[dict[str, Any]], run_id: str, debug: bool) -> Iterator[dict[str, Any]]:
    """The Ray task (a streaming generator): one load group on this node."""
    from engine.measure.bandwidth import host_bandwidth
    from engine.sweep.isolation import run_cells
    from engine.sweep.run import ReferenceTokens

    cluster.restore_thread_env()
    me = node_identity()
    with machine_lock():
        gbps = host_bandwidth()["host_gbps"]  # measured once per host, then cached
        yield {"event": "node", **me, "host_gbps": gbps}
        mine = [localize(Cell.from_json(c)) for c in cells]
        ReferenceTokens(gbps, run_id, run_cells).prefetch(missing_references(mine))
        stamp = {k: me[k] for k in ("node", "ray_node_id", "node_gpu")}
        for cell, rows in run_cells(mine, gbps, run_id, debug):
            yield {"event": "done", "cell_id": cell.cell_id, "rows": [replace(r, **stamp).as_dict() for r in rows]}


def node_facts() -> dict[str, Any]:
    """The Ray task behind `bench doctor --ray`: this node's identity, bandwidth and frameworks."""
    from engine.measure.bandwidth import host_bandwidth
    from engine.results.rows import provenance

    prov = provenance()
    return {**node_identity(), "os": prov["os"], "python": prov["python"], "git_commit": prov["git_commit"],
            "host_gbps": host_bandwidth()["host_gbps"], "frameworks": cluster.capabilities_in_child()}


def cluster_facts() -> list[dict[str, Any]]:
    """`node_facts` of every alive bench node, each pinned to its node (no slot: it measures nothing
    unless the node's bandwidth was never measured)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(node_facts)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
            for n in cluster.alive_nodes()]
    return ray.get(refs, timeout=600)


# ---- on the driver -------------------------------------------------------------------------

@dataclass
class Job:
    """A load group's cells not yet reported, and where its attempts ran and were lost."""

    cells: list[Cell]
    node: dict[str, Any] = field(default_factory=dict)  # the "node" event of the current attempt
    retried: set[str] = field(default_factory=set)  # cell ids already retried once after a loss
    exclude: set[str] = field(default_factory=set)  # Ray node ids lost under this group


class RayExecutor:
    """`run_cells` over a Ray cluster: call it with the same arguments; it yields (cell, rows).
    `on_start(cell, node_name)` is told which node runs which cell."""

    def __init__(self, address: str, debug: bool = False):
        cluster.connect(address, debug)
        import ray

        self.ray = ray
        self.task = ray.remote(num_cpus=0, max_retries=0)(measure_group)

    def describe(self) -> str:
        nodes = cluster.alive_nodes()
        return f"{len(nodes)} node(s): " + "; ".join(n.summary() for n in nodes)

    def close(self) -> None:
        cluster.disconnect()

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, cells: list[Cell], host_gbps: float, run_id: str, debug: bool = False,
                 on_start: Callable[..., None] | None = None, interleave: bool = True,
                 on_progress: Callable[..., None] | None = None) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        """`interleave` has nothing to interleave: a task is one load group; groups run side by
        side on different machines, one at a time on each. `on_progress` is not called: the nodes
        report finished cells only (the driver's ETA then goes by the rate of finished cells)."""
        groups = [list(g) for _, g in itertools.groupby(cells, key=lambda c: c.load_key)]
        yield from self._run(groups, run_id, debug, on_start)

    def _run(self, groups: list[list[Cell]], run_id: str, debug: bool,
             on_start: Callable[..., None] | None) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        ray = self.ray
        jobs: dict[Any, Job] = {}
        try:
            for g in groups:
                yield from self._submit(Job(g), jobs, run_id, debug)
            last_check = time.monotonic()
            while jobs:
                ready, _ = ray.wait(list(jobs), num_returns=1, timeout=POLL_S)
                for gen in ready:
                    job = jobs.pop(gen)
                    try:
                        event = ray.get(next(gen))
                    except StopIteration:
                        yield from self._fail(job, "error", "its Ray task ended without reporting", run_id)
                        continue
                    except ray.exceptions.RayTaskError as e:  # our code raised on the node
                        yield from self._fail(job, "error", f"on node {job.node.get('node', '?')}: "
                                              f"{str(e).strip().splitlines()[-1]}", run_id)
                        continue
                    except ray.exceptions.RayError as e:  # the node or its worker is gone
                        yield from self._lost(job, e, jobs, run_id, debug)
                        continue
                    jobs[gen] = job
                    yield from self._event(job, event, on_start)
                if time.monotonic() - last_check > 5 * POLL_S:
                    last_check = time.monotonic()
                    yield from self._orphans(jobs, run_id)
        finally:
            for gen in jobs:  # stopped early (Ctrl-C, a consumer's break): stop the nodes' children
                try:
                    ray.cancel(gen)
                except Exception:
                    pass

    def _event(self, job: Job, event: dict[str, Any], on_start) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        if event["event"] == "node":
            job.node = event
        else:
            cell = next(c for c in job.cells if c.cell_id == event["cell_id"])
            job.cells.remove(cell)
            yield cell, [BenchmarkResult.from_dict(r) for r in event["rows"]]
        if job.cells and on_start is not None:  # a group's cells run in order, one after another
            on_start(job.cells[0], job.node.get("node", ""))

    def _submit(self, job: Job, jobs: dict, run_id: str, debug: bool) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        nodes = cluster.alive_nodes()
        if not cluster.eligible(job.cells[0], nodes, job.exclude):
            yield from self._no_node(job, nodes, run_id)
            return
        opts: dict[str, Any] = {"resources": cluster.requirements(job.cells[0])}
        if job.exclude:
            opts["label_selector"] = {"ray.io/node-id": f"!in({','.join(sorted(job.exclude))})"}
        job.node = {}
        gen = self.task.options(**opts).remote([c.to_json() for c in job.cells], run_id, debug)
        jobs[gen] = job

    def _lost(self, job: Job, error: Exception, jobs: dict, run_id: str,
              debug: bool) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        found = NODE_ID.search(str(error))
        node_id = job.node.get("ray_node_id") or (found.group(1) if found else "")
        if node_id:
            job.exclude.add(node_id)
        cell = job.cells[0]
        if cell.cell_id in job.retried:
            yield cell, [self._row(job, cell, "lost", f"its node {job.node.get('node', '?')} was lost twice "
                                                      f"mid-cell ({type(error).__name__})", run_id)]
            job.cells.pop(0)
        else:
            job.retried.add(cell.cell_id)
        if job.cells:
            yield from self._submit(job, jobs, run_id, debug)

    def _no_node(self, job: Job, nodes: list, run_id: str) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        """No alive node can run the group (any more): a cell lost mid-run is `lost`, the rest
        `unavailable`, each with the reason."""
        reason = cluster.no_node_reason(job.cells[0], [n for n in nodes if n.node_id not in job.exclude])
        for cell in job.cells:
            if cell.cell_id in job.retried:
                yield cell, [self._row(job, cell, "lost", f"its node {job.node.get('node', '?')} was lost "
                                                          f"mid-cell and {reason}", run_id)]
            else:
                yield cell, [self._row(job, cell, "unavailable", reason, run_id)]
        job.cells = []

    def _orphans(self, jobs: dict, run_id: str) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        """Queued tasks whose every eligible node died before they started would wait forever."""
        nodes = cluster.alive_nodes()
        for gen, job in list(jobs.items()):
            if not job.node and not cluster.eligible(job.cells[0], nodes, job.exclude):
                del jobs[gen]
                try:
                    self.ray.cancel(gen, force=True)
                except Exception:  # already gone
                    pass
                yield from self._no_node(job, nodes, run_id)

    def _fail(self, job: Job, status: str, error: str, run_id: str) -> Iterator[tuple[Cell, list[BenchmarkResult]]]:
        for cell in job.cells:
            yield cell, [self._row(job, cell, status, error, run_id)]
        job.cells = []

    @staticmethod
    def _row(job: Job, cell: Cell, status: str, error: str, run_id: str) -> BenchmarkResult:
        """A row the driver makes: where the lost attempt ran, or nowhere (not the driver's host)."""
        where = {k: job.node.get(k, "") for k in ("node", "ray_node_id", "node_gpu", "host", "cpu")}
        return replace(failure_row(cell, status, error, run_id), **where)
