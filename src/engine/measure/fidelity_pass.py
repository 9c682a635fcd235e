"""The fidelity pass of a measuring child, after a cell's timed runs: teacher-force the mode
through the corpus windows (KLD statistics against the reference) and greedy-generate the cell's
length from the corpus text prompt (`match_tokens`).

Computed once per mode and cached under the cache directory, keyed by everything that decides
it: the model file, framework and its version, precision, compile, options, device, the corpus,
the windows and `VERSION`. A later run, or another cell of the same mode, reads the file. The
reference's own pass saves what every other mode is compared with (engine.measure.reference).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

import backends
from engine.generate.backend import Backend
from engine.measure import corpus, fidelity, reference
from engine.measure.fidelity import NOT_COMPARED, Fidelity
from engine.measure.fit import MemoryShortfall, admit
from engine.model.digest import content_identity

if TYPE_CHECKING:
    from engine.measure.cell import Cell
    from engine.measure.runner import LoadedModel

VERSION = 1  # bump when what the pass computes changes


@dataclass(frozen=True)
class PassResult:
    fidelity: Fidelity
    match_tokens: int  # leading greedy tokens on the text prompt equal to the reference's; -1: not compared
    seconds: float  # this run's time on the pass (about 0 when every answer was cached)


UNCHECKED = PassResult(NOT_COMPARED, -1, 0.0)  # a cell run with --no-check


def mode_file(cell: "Cell", loaded: "LoadedModel"):
    key = [VERSION, *content_identity(cell.model), cell.framework, loaded.version, loaded.precision,
           cell.compile, sorted(dict(cell.options).items()), loaded.info.device, corpus.corpus_sha(),
           corpus.WINDOW, corpus.N_WINDOWS]
    return reference.keyed_file("fidelity", key, ".json")


def run_pass(cell: "Cell", loaded: "LoadedModel") -> PassResult:
    t = time.perf_counter()
    path = mode_file(cell, loaded)
    saved = json.loads(path.read_text()) if path.exists() else {"greedy": {}}
    windows = corpus.windows(loaded.spec)
    prompt, n = corpus.text_prompt(loaded.spec), cell.gen_tokens
    is_ref = backends.get(cell.framework).is_reference
    needs_kld, needs_greedy = "kld" not in saved, str(n) not in saved["greedy"]
    if needs_kld or needs_greedy:
        with pass_backend(cell, loaded, max(corpus.WINDOW, len(prompt) + n)) as backend:
            if needs_kld:
                fid = corpus_fidelity(cell.model, backend(), windows, is_ref)
                if fid is not None:  # no reference to compare with yet: computed on a later run
                    saved["kld"] = fid.as_dict()
            if needs_greedy:
                saved["greedy"][str(n)] = reference.greedy(backend(), prompt, n)
        reference.write_atomically(path, lambda tmp: tmp.write_text(json.dumps(saved)))
    if is_ref and not reference.greedy_file(cell.model, prompt, n).exists():  # what the modes' tokens are checked against
        reference.save_greedy(cell.model, prompt, n, saved["greedy"][str(n)])
    ref_tokens = reference.greedy_tokens(cell.model, prompt, n)
    match = -1 if ref_tokens is None else reference.leading_matches(saved["greedy"][str(n)], ref_tokens)
    fid = Fidelity(**saved["kld"]) if "kld" in saved else NOT_COMPARED
    return PassResult(fid, match, time.perf_counter() - t)


def corpus_fidelity(model: str, backend: Backend, windows: Sequence[Sequence[int]], is_ref: bool) -> Fidelity | None:
    """The mode's statistics against the reference's saved distributions; the reference saves
    them first and is compared with them, itself; None when there is no reference to compare with."""
    ref = reference.distributions(model)
    if ref is None and not is_ref:
        return None
    if ref is None:
        ref = reference.save_distributions(model, fidelity.teacher_forced(backend, windows))
    s = corpus.SCORED_PER_WINDOW
    chunks = (np.asarray(ref[i * s:(i + 1) * s]) for i in range(len(windows))) if is_ref else \
        fidelity.teacher_forced(backend, windows)
    return fidelity.compare(ref, chunks, windows)


@contextmanager
def pass_backend(cell: "Cell", loaded: "LoadedModel", positions: int) -> Iterator:
    """A getter of the backend to run the pass on: the cell's loaded one when it holds `positions`,
    else (opened on first use, closed after) the same mode loaded for one sequence of that length;
    where the two would not fit together, the cell's is released first (the next cell reloads)."""
    opened: list[Backend] = []

    def room(cls, opts):
        try:
            return admit(cls, loaded.spec, opts, cell.memory_limit_mb).opts
        except MemoryShortfall:
            loaded.release()
            return admit(cls, loaded.spec, opts, cell.memory_limit_mb).opts

    def get() -> Backend:
        if loaded.max_seq_len >= positions:
            return loaded.backend
        if not opened:
            opened.append(backends.open_backend(
                cell.framework, loaded.spec, cell.precision, cell.device, room, threads=cell.resolved_threads,
                max_seq_len=positions, compile=cell.compile, options=dict(cell.options)).backend)
        return opened[0]

    try:
        yield get
    finally:
        for b in opened:
            b.close()
