"""Progress that is right: an ETA from measured loads, warm-ups and repeats, and a line per loaded
group and per finished cell on a redirected stderr."""

import re

import pytest

from conftest import bench
from engine.measure.cell import Cell
from engine.sweep.eta import Progress, SweepEta


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# per lane: load, first warm-up (its compile), a later cell's compile (a new prompt shape: tinygrad
# captures a new prefill JIT, torch.compile's decode graph is reused), seconds per generated token,
# fidelity pass per cell
LANES = {"numpy": (0.5, 0.3, 0.0, 0.010, 0.4), "torch": (2.0, 40.0, 0.0, 0.002, 0.6),
         "llamacpp": (0.3, 0.2, 0.0, 0.001, 0.3), "tinygrad": (1.0, 90.0, 40.0, 0.006, 0.5)}


def _cells(**adaptive):
    # two lengths of one shape (264 positions) per framework: one load group each, as run_cells groups them;
    # adaptive: one cell per group, as in the main job (`--modes best`, one workload)
    lengths = (256,) if adaptive else (64, 256)
    return [Cell(framework=f, model="m.gguf", prompt_tokens=264 - n, gen_tokens=n, repeats=3, **adaptive)
            for f in LANES for n in lengths]


# adaptive cells: each lane's repeats spread by this CoV (numpy's meet the 5% target in a few repeats,
# llama.cpp's never do and run to --max-repeats, torch's stop at the time bound)
SPREAD = {"numpy": 0.01, "torch": 0.08, "llamacpp": 0.15, "tinygrad": 0.02}
ADAPTIVE = dict(max_repeats=10, max_time_s=3.0)
WOBBLE = (0.0, 1.0, -1.0, 0.5, -0.5, 1.5, -1.5)


def _complete(cell, repeats_s, measured_s):
    """The rule of CellRun.step on the simulated repeats."""
    from engine.measure.stats import summarize

    n = len(repeats_s)
    if n < cell.repeats or cell.max_repeats <= cell.repeats:
        return n >= cell.repeats
    half = summarize([1 / r for r in repeats_s]).relative_half_width
    return n >= cell.max_repeats or measured_s >= cell.max_time_s or half <= cell.ci_target


def _warm_up(cell, later: bool) -> tuple[float, float]:
    """A cell's warm-up seconds (the lane's first compiles in full, a later cell its new shape's
    share) and a repeat's as the warm-up's decode steps show it."""
    _, first_warm, later_warm, per_token, _ = LANES[cell.framework]
    return per_token * cell.gen_tokens + (later_warm if later else first_warm), per_token * cell.gen_tokens


def prepare(lanes, state, eta, clock):
    """run_cells' prepare phase of an interleaved sweep: every lane's first cell loaded and warmed
    up, one lane after another, before any repeat."""
    for lane in lanes:
        cell, load = lane[0], LANES[lane[0].framework][0]
        warm, steady = _warm_up(cell, later=False)
        clock.t += load
        eta.loaded(cell, load)
        clock.t += warm
        eta.warmed(Progress("prepared", cell, warm, steady))
        state[cell.load_key].update(loaded=True, warm=True, prepared=True)


def simulate(interleave: bool, estimator=SweepEta, adaptive: bool = False):
    """Replay run_cells' schedule (every lane's first cell prepared, then round-robin over lanes; or one lane after another; a later cell prepared in its turn) on a fake clock,
    feeding the ETA what the harness reports; return the end time and the ETA read at every event
    after each group has loaded and warmed up (a kernel search or a compile, which no other group
    can predict), with the time it was read."""
    clock, cells = Clock(), _cells(**(ADAPTIVE if adaptive else {}))
    eta = estimator(cells, clock)
    # lanes as run_cells forms them: one per load key (a framework's lengths are two shapes, two loads)
    lanes = [[c for c in cells if c.load_key == key] for key in dict.fromkeys(c.load_key for c in cells)]
    state = {lane[0].load_key: {"loaded": False, "warm": False, "done": 0, "repeats": []} for lane in lanes}
    readings = []
    active, waiting = (lanes, []) if interleave else (lanes[:1], lanes[1:])
    if interleave:
        prepare(lanes, state, eta, clock)
    while active:
        for lane in list(active):
            cell = lane[0]
            load, _, _, per_token, fidelity = LANES[cell.framework]
            st = state[cell.load_key]
            if not st["loaded"]:
                clock.t += load
                st["loaded"] = True
                eta.loaded(cell, load)
            if st["done"] == 0 and not st.pop("prepared", False):  # a new cell is prepared first
                warm, steady = _warm_up(cell, later=st["warm"])
                clock.t += warm
                st["warm"] = True
                eta.warmed(Progress("prepared", cell, warm, steady))
            spread = SPREAD[cell.framework] if adaptive else 0.0
            repeat = per_token * cell.gen_tokens * (1 + spread * WOBBLE[st["done"] % len(WOBBLE)])
            st["done"] += 1
            st["repeats"].append(repeat)
            final = _complete(cell, st["repeats"], sum(st["repeats"]))
            seconds = repeat + (fidelity if final else 0.0)
            clock.t += seconds
            eta.measured(Progress("repeat", cell, seconds, repeat, final))
            if final:
                eta.cell_done(cell)
                lane.pop(0)
                st["done"], st["repeats"] = 0, []
            if all(s["warm"] for s in state.values()):
                readings.append((clock.t, eta.remaining_s()))
            if not lane:
                active.remove(lane)
                if waiting:
                    active.append(waiting.pop(0))
    return clock.t, readings


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("interleave", [True, False])
def test_eta_is_within_2x_of_the_truth_once_every_group_has_loaded(interleave, adaptive):
    end, readings = simulate(interleave, adaptive=adaptive)
    checked = [(estimate, end - t) for t, estimate in readings if end - t > 1.0]
    # one lane after another, every group has loaded only once the last has: the readings are its own
    # few repeats (an adaptive one stops after three)
    assert len(checked) >= (5 if interleave else 2)
    assert all(truth / 2 <= estimate <= truth * 2 for estimate, truth in checked), checked
    assert readings[-1][1] == 0.0


class ElapsedPerCell(SweepEta):
    """The estimate the harness printed before: elapsed time per finished cell, times cells left."""

    def remaining_s(self):
        return self._by_rate()


def test_the_simulation_catches_an_estimate_by_cell_rate():
    end, readings = simulate(True, ElapsedPerCell)
    assert any(e is not None and e > 2 * (end - t) for t, e in readings if end - t > 1.0)


def test_eta_counts_down_between_events_and_waits_for_a_first_measurement():
    clock = Clock()
    cells = [Cell(framework="numpy", model="m.gguf", repeats=4), Cell(framework="torch", model="m.gguf", repeats=4)]
    eta = SweepEta(cells, clock)
    assert eta.remaining_s() is None, "nothing measured: no number to show"
    clock.t = 2.0
    eta.loaded(cells[0], 2.0)
    clock.t = 3.0
    eta.warmed(Progress("prepared", cells[0], 0.5, 0.5))
    eta.measured(Progress("repeat", cells[0], 0.5, 0.5))
    # numpy: 3 repeats of 0.5 s; torch: a load (2 s) + warm-up like numpy's (0.5 s) + 4 repeats of 0.5 s
    assert eta.remaining_s() == pytest.approx(1.5 + 2.0 + 0.5 + 2.0)
    clock.t = 4.0
    assert eta.remaining_s() == pytest.approx(5.0)


def test_eta_goes_by_a_prepared_warm_up_until_the_first_repeat():
    """An interleaved sweep warms every group up before any repeat: the warm-ups' pace gives the
    ETA a number meanwhile, and the first repeat's pace replaces it."""
    clock = Clock()
    cells = [Cell(framework=f, model="m.gguf", repeats=3, gen_tokens=10) for f in ("numpy", "torch")]
    eta = SweepEta(cells, clock)
    clock.t = 1.0
    eta.loaded(cells[0], 1.0)
    assert eta.remaining_s() is None
    clock.t = 2.0
    eta.warmed(Progress("prepared", cells[0], 3.0, 1.0))  # a warm-up (3 s) whose steps predict 1 s a repeat
    # numpy: 3 repeats of 1 s; torch: a load (1 s), a warm-up like numpy's (3 s) and 3 repeats of 1 s
    assert eta.remaining_s() == pytest.approx(3.0 + 1.0 + 3.0 + 3.0)
    clock.t = 2.5
    eta.measured(Progress("repeat", cells[0], 0.5, 0.5))  # the first repeat: 0.05 s a token
    assert eta.remaining_s() == pytest.approx(2 * 0.5 + 1.0 + 3.0 + 3 * 0.5)


def test_eta_without_lane_reports_goes_by_finished_cells():
    """A cluster executor reports only finished cells: the ETA is the rate of those."""
    clock = Clock()
    cells = [Cell(framework="numpy", model="m.gguf", prompt_tokens=n) for n in (4, 8, 16, 32)]
    eta = SweepEta(cells, clock)
    clock.t = 10.0
    eta.cell_done(cells[0])
    assert eta.remaining_s() == pytest.approx(30.0)


def test_progress_lines_on_a_redirected_stderr(tiny_f32, tmp_path):
    out = tmp_path / "p.csv"
    r = bench("run", "-f", "numpy", "-f", "torch", "-m", tiny_f32, "--prompt-tokens", "4", "--prompt-tokens", "8",
              "-n", "3", "-r", "2", "-O", str(out))
    assert r.returncode == 0, r.stderr
    # a group per framework and shape (each prompt length is loaded for its own positions)
    loaded = re.findall(r"^loaded (\w+) f32 in [\d.]+s \(group (\d)/4\)  ETA (\S+)$", r.stderr, re.M)
    assert sorted(f for f, _, _ in loaded) == ["numpy", "numpy", "torch", "torch"]
    assert [g for _, g, _ in loaded] == ["1", "2", "3", "4"]
    done = re.findall(r"^\[(\d)/4\] (\w+) f32 prompt (\d+) gen 3: .* elapsed \d+s, ETA (\d+)s$", r.stderr, re.M)
    assert [int(d[0]) for d in done] == [1, 2, 3, 4] and done[-1][3] == "0"
    assert sorted(d[1:3] for d in done) == [("numpy", "4"), ("numpy", "8"), ("torch", "4"), ("torch", "8")]
    assert r.stderr.index("(group 4/4)") < r.stderr.index("[1/4]"), "interleaved: every group loads before a cell ends"
