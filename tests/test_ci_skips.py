"""Under CI=true a skip for something scripts/setup.sh installs fails; a missing device stays a skip."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TESTS

INNER = {
    "test_inner.py": """
from conftest import device_skip, require_backend, require_module

def test_framework():
    require_backend("ghost")

def test_package():
    require_module("ghostframework_not_installed")

def test_device():
    device_skip("no CUDA device on this host")

def test_runs():
    pass
""",
    "test_module_level.py": """
import pytest

pytest.importorskip("ghostframework_not_installed")

def test_never_collected():
    pass
""",
}


def run_inner(tmp_path, ci):
    for name, text in INNER.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "CI": ci, "BENCH_BACKEND_MODULES": "ghost_backend",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rA", "."],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (failed|passed|skipped|errors?)\b", r.stdout.splitlines()[-1])}
    return r, counts


def test_under_ci_a_framework_skip_fails_and_a_device_skip_stays_a_skip(tmp_path):
    r, counts = run_inner(tmp_path, "true")
    assert r.returncode == 1 and counts == {"failed": 2, "passed": 1, "skipped": 1, "error": 1}, r.stdout
    assert re.search(r"FAILED test_inner.py::test_framework - CI=true .*ghost unavailable here: ghostframework", r.stdout)
    assert re.search(r"FAILED test_inner.py::test_package - CI=true .*ghostframework_not_installed is not", r.stdout)
    assert re.search(r"ERROR test_module_level.py .*ghostframework_not_installed", r.stdout)
    assert re.search(r"SKIPPED .*no such device here: no CUDA device on this host", r.stdout)


@pytest.mark.parametrize("ci", ["", "false"])
def test_outside_ci_every_skip_stays_a_skip(tmp_path, ci):
    r, counts = run_inner(tmp_path, ci)
    assert r.returncode == 0 and counts == {"passed": 1, "skipped": 4}, r.stdout
