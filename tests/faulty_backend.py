"""A test-only backend for fault injection, loaded through BENCH_BACKEND_MODULES.

Its behaviour comes from the cell option `fault`: raise, abort, hang, oom, spike (allocates and
frees SPIKE_BYTES once, on the generation `fault_generation`, and otherwise runs healthy), noise
(Gaussian noise as large as the logits' spread on every logit: a mode that drifts from the
reference), break_batch (sequence 1 of a batch gets wrong logits), or none (it then wraps the
numpy reference, so a healthy cell produces real rows). With `fault_prompt=N` the fault only hits prompts of N tokens, so one cell
of a load group can fail while its neighbours succeed."""

import os
import time

import numpy as np

from backends.base import BackendOption
from backends.numpy_ref import NumpyBackend

SPIKE_BYTES = 400 * 2**20


class FaultyBackend(NumpyBackend):
    name = "faulty"
    description = "fault injection for tests"
    is_reference = False
    options = (BackendOption("fault", str, "the fault to inject",
                             choices=("raise", "abort", "hang", "oom", "spike", "noise", "break_batch", "none")),
               BackendOption("fault_prompt", int, "inject only on prompts of this many tokens"),
               BackendOption("fault_generation", int, "inject only from this generation on (1: the first)"))

    def build(self, spec, opts):
        self.fault = opts.options.get("fault", "none")
        self.fault_prompt = opts.options.get("fault_prompt")
        self.fault_generation = opts.options.get("fault_generation", 1)
        self.generations = 0
        self.rng = np.random.default_rng(0)
        return super().build(spec, opts)

    def step(self, tokens, start):
        if self.fault in ("noise", "break_batch"):
            return self.perturbed(super().step(tokens, start))
        self.generations += start == 0
        if (self.fault_prompt is not None and len(tokens[0]) != self.fault_prompt) or \
                self.generations < self.fault_generation:
            return super().step(tokens, start)
        if self.fault == "spike":  # touched pages, resident until freed at the end of the step
            if self.generations == self.fault_generation and start == 0:
                np.ones(SPIKE_BYTES // 8).sum()
            return super().step(tokens, start)
        if self.fault == "raise":
            raise RuntimeError("injected failure")
        if self.fault == "abort":
            os.abort()
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "oom":
            hog = []
            while True:
                hog.append(bytearray(64 * 2**20))
        return super().step(tokens, start)

    def perturbed(self, logits):
        if self.fault == "noise":
            spread = logits.std(axis=-1, keepdims=True)  # noise on the scale of the logits themselves
            return logits + (spread * self.rng.normal(0, 1.0, logits.shape)).astype(np.float32)
        if len(logits) > 1:
            logits[1] = logits[1][::-1].copy()
        return logits


class SerialBackend(NumpyBackend):
    """The reference's arithmetic, declared unable to batch: what a one-sequence framework looks like."""

    name = "serial"
    description = "one sequence at a time (tests)"
    is_reference = False
    batched = False
