"""A test-only backend whose framework is never installed, loaded through BENCH_BACKEND_MODULES."""

from backends.base import Requirement
from backends.numpy_ref import NumpyBackend


class GhostBackend(NumpyBackend):
    name = "ghost"
    is_reference = False
    requires = (Requirement("ghostframework_not_installed", "ghostframework", "pip install ghostframework"),)
