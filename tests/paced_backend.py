"""Test-only backends whose decode speed their mode sets, loaded through BENCH_BACKEND_MODULES.
Each wraps the numpy reference (so fidelity is exact) and sleeps per forward call:
`paced_apart` declares two modes clearly apart in speed (2 ms and 12 ms a step); `paced_tied`
two modes of one speed that are each 3x slower on alternate generations, out of phase with each
other, so the per-round ratios swing 3x either way and no CI can separate them."""

import time

from backends.base import BackendOption, Mode
from backends.numpy_ref import NumpyBackend


class PacedApart(NumpyBackend):
    name = "paced_apart"
    description = "a mode-set decode pace (tests)"
    is_reference = False
    options = (BackendOption("step_ms", float, "sleep per forward call"),
               BackendOption("swing", float, "every other generation's calls take this many times longer"),
               BackendOption("phase", int, "0 or 1: which generations are the slow ones"))
    mode_options = ((("step_ms", 2.0),), (("step_ms", 12.0),))

    @classmethod
    def modes(cls, spec, device):
        return [Mode("f32", options=o) for o in cls.mode_options]

    def build(self, spec, opts):
        self.step_ms = opts.options.get("step_ms", 0.0)
        self.swing, self.phase = opts.options.get("swing", 1.0), opts.options.get("phase", 0)
        self.generations = 0
        return super().build(spec, opts)

    def step(self, tokens, start):
        self.generations += start == 0
        logits = super().step(tokens, start)
        slow = self.swing if (self.generations + self.phase) % 2 else 1.0
        time.sleep(self.step_ms * slow / 1000)
        return logits


class PacedTied(PacedApart):
    name = "paced_tied"
    mode_options = ((("phase", 0), ("step_ms", 4.0), ("swing", 3.0)), (("phase", 1), ("step_ms", 4.0), ("swing", 3.0)))
