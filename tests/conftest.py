import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# frameworks run inside the test process compile into a throw-away folder, never the user's caches
# (set before any framework is imported: tinygrad reads CACHEDB at import; `bench` children are
# pointed at BENCH_CACHE_DIR's compile folder by the harness itself)
_COMPILE_DIR = tempfile.mkdtemp(prefix="bench-test-compile-")
os.environ.setdefault("CACHEDB", os.path.join(_COMPILE_DIR, "tinygrad.db"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_COMPILE_DIR, "torchinductor"))

import backends
from engine.model.spec import ModelSpec, default_model_path
from engine.model.synth import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def backend_module_env(module: str) -> dict[str, str]:
    """The environment registering a test-only backend module of tests/ for a `bench` subprocess
    (with this checkout's sources first, as bench() puts them: its PYTHONPATH replaces bench()'s)."""
    return {"BENCH_BACKEND_MODULES": module,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}


FAULT_ENV = backend_module_env("faulty_backend")  # tests/faulty_backend.py


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def tiny_models(synth_dir):
    """Tiny random Llama GGUFs the tests write themselves, one per tensor type."""
    return {q: str(write_synthetic(synth_dir / f"tiny-{q}.gguf", "tiny", q, seed=1)) for q in
            ("f32", "f16", "q8_0", "q4_0", "q4_1")}


LONG_PROMPT = [(7 * i + 5) % 380 for i in range(80)]  # past the tiny llama3 file's original context (64)
ARCHS = ("llama", "llama3", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")  # llama3: llama with Llama 3.x RoPE factors


MOE_ARCHS = ("qwen3moe", "mixtral")  # mixtral: llama with experts


@pytest.fixture(scope="session")
def arch_models(synth_dir):
    """Tiny random f32 GGUFs of every supported architecture, with a tokenizer of its kind."""
    return {a: str(write_synthetic(synth_dir / f"tiny-{a}.gguf", "tiny", "f32", seed=1, architecture=a))
            for a in ARCHS + MOE_ARCHS}


@pytest.fixture(scope="session")
def tiny_f32(tiny_models):
    return tiny_models["f32"]


@pytest.fixture(scope="session")
def default_model():
    return default_model_path()


@pytest.fixture(scope="session")
def default_spec(default_model):
    return ModelSpec.open(default_model)


# CI (which sets CI=true, as .ci/run does) fails a test skipped for anything but a missing device:
# scripts/setup.sh installs every framework, package and tool the tests use, so such a skip there
# is a broken install. Only CUDA, MPS and Metal hardware may be absent (`device_skip`).
CI = os.environ.get("CI", "").lower() == "true"
DEVICE_SKIP = "no such device here: "


def device_skip(reason):
    """Skip for hardware this host lacks (a CUDA, MPS or Metal device): the one skip CI allows."""
    pytest.skip(DEVICE_SKIP + reason, allow_module_level=True)


def require_backend(name):
    """Skip, naming why, where the framework is not installed here (a failure under CI)."""
    avail = backends.get(name).availability()
    if not avail.ok:
        pytest.skip(f"{name} unavailable here: {avail.reason}", allow_module_level=True)


def require_module(name, why=""):
    """The imported module; a skip naming it where it is missing (a failure under CI)."""
    return pytest.importorskip(name, reason=f"{name} is not installed{why and ': ' + why}")


def _skip_fails_under_ci(report):
    if not (CI and report.skipped) or hasattr(report, "wasxfail"):
        return report
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if DEVICE_SKIP not in reason:
        report.outcome = "failed"
        report.longrepr = f"CI=true fails a skip for what scripts/setup.sh installs: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _skip_fails_under_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _skip_fails_under_ci((yield))  # module-level skips and importorskip


def pytest_configure(config):
    if CI:  # a module failed that way must not stop the rest of the suite from running
        config.option.continue_on_collection_errors = True


def pytest_unconfigure(config):
    shutil.rmtree(_COMPILE_DIR, ignore_errors=True)


def rel_err(a, b):
    """Largest absolute difference relative to the largest reference magnitude."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def load_backend(name, path, precision="auto", max_seq=64, **kw):
    return backends.open_backend(name, ModelSpec.open(path), precision, max_seq_len=max_seq, **kw).backend


def reference_logits(path, prompt, steps):
    """numpy reference: prefill logits, then logits after each greedy decode step."""
    ref = load_backend("numpy", path)
    out = [ref.prefill(prompt)]
    for _ in range(steps):
        out.append(ref.decode(int(np.argmax(out[-1]))))
    return out


def bench(*args, env=None, timeout=600, cwd=None):
    """Run the CLI as a user would; returns CompletedProcess with text output."""
    # this checkout's sources first, whichever checkout the editable install points at
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def same_as_ggufs_reader(path):
    """engine.model.gguf_file against the gguf package's own reader: every metadata value, every
    tensor's type, shape, offset and memory-mapped blocks."""
    import gguf

    from engine.model.gguf_file import GGUFFile

    ours, theirs = GGUFFile(str(path)), gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.values == fields and ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset) == \
            (b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
