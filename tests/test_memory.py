"""Peak memory is the measured child's own, per cell: not inherited from whoever spawned it, not
carried from an earlier cell of its lane."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import FAULT_ENV, ROOT
from engine.measure.cell import Cell
from engine.measure.memory import PeakRss
from engine.sweep.isolation import run_cells
from faulty_backend import SPIKE_BYTES

# a parent holding 2 GB of touched numpy runs one cell of the default model (numpy, ~800 MB)
# through the real measuring path
BIG_PARENT = """
import json, sys
import numpy as np
from engine.measure.cell import Cell
from engine.sweep.isolation import run_cells

held = np.ones(2048 * 2**20 // 8)
cell = Cell(framework="numpy", model=sys.argv[1], prompt_tokens=8, gen_tokens=8, repeats=3, warmup=1)
[(_, rows)] = list(run_cells([cell], 30.0, "t"))
status = open("/proc/self/status").read().splitlines()
rss = int(next(line.split()[1] for line in status if line.startswith("VmRSS:"))) * 1024
row = rows[0].as_dict()
print(json.dumps({"parent_rss": rss, **{k: row[k] for k in ("status", "peak_rss_bytes", "peak_rss_scope",
                                                              "sampled_rss_peak_bytes")}}))
"""


def test_a_childs_peak_is_its_own_not_its_spawners(default_model):
    r = subprocess.run([sys.executable, "-c", BIG_PARENT, default_model], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["status"] == "ok" and got["peak_rss_scope"] == "cell"
    assert got["parent_rss"] > 2048 * 2**20
    # the kernel's mark agrees with the parent's outside samples of the child, within 10% (the
    # samples also cover the fidelity pass after the mark: a few MB, small beside the model) ...
    assert abs(got["peak_rss_bytes"] - got["sampled_rss_peak_bytes"]) < 0.10 * got["sampled_rss_peak_bytes"], got
    # ... and is nowhere near the parent's size (ru_maxrss carried the parent's RSS over fork+exec)
    assert got["peak_rss_bytes"] < got["parent_rss"] / 2, got


def test_a_later_cell_of_a_lane_does_not_inherit_an_earlier_cells_peak(tiny_f32, monkeypatch):
    for k, v in FAULT_ENV.items():
        monkeypatch.setenv(k, v)
    # one lane (one child, one load): only the first generation after the load allocates 400 MB
    cells = [Cell(framework="faulty", model=tiny_f32, prompt_tokens=4, gen_tokens=4, repeats=2, warmup=0, seed=s,
                  options=(("fault", "spike"),)) for s in (0, 1)]
    assert cells[0].load_key == cells[1].load_key
    (_, first), (_, second) = run_cells(cells, 30.0, "t")
    assert first[0].load_s > 0 and second[0].load_s == 0, "both cells ran on one loaded model"
    assert {r.peak_rss_scope for r in first + second} == {"cell"}
    assert first[0].peak_rss_bytes - second[0].peak_rss_bytes > 0.8 * SPIKE_BYTES


def test_the_mark_resets_and_says_when_it_cannot(tmp_path):
    peak = PeakRss()
    assert peak.scope == "process"
    peak.reset()
    base = peak.bytes()
    np.ones(SPIKE_BYTES // 8).sum()  # freed again at once
    high = peak.bytes()
    assert peak.scope == "cell" and high > base + 0.8 * SPIKE_BYTES
    peak.reset()
    assert peak.bytes() < high - 0.8 * SPIKE_BYTES
    refused = PeakRss(clear_refs=str(tmp_path / "missing" / "clear_refs"))
    np.ones(SPIKE_BYTES // 8).sum()
    before = refused.bytes()
    refused.reset()
    assert refused.scope == "process" and refused.bytes() >= before, "a mark not reset covers the whole process"
