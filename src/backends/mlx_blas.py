"""Which BLAS MLX's CPU float matmuls run through, bound before `mlx.core` loads.

The mlx[cpu] wheel for Linux bundles the reference (netlib) BLAS it was built against: one thread,
no vector kernels, ~1.3 GFLOP/s on a 2-core EPYC where OpenBLAS gives 50-80 (a 32x576 @ 576x1536
prefill matmul: 45 ms against 0.7-0.9 ms). MLX built from source links the host's BLAS, so that is
the build a user tuning for Linux runs: loading the host's OpenBLAS with RTLD_GLOBAL before libmlx
makes libmlx's cblas/sgemm symbols resolve to it (the global scope is searched before a library's
own dependencies). `-o blas=bundled` measures the wheel as shipped. The binding is per process,
fixed by the first import; each measured lane is its own process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

from engine.errors import UnavailableError

BLAS_CHOICES = ("openblas", "bundled")
_bound: dict[str, object] = {}  # "blas": what this process's mlx.core was loaded with, "lib": OpenBLAS's handle


@functools.cache  # find_library runs ldconfig: once a process, not at each of its callers
def openblas_library() -> str | None:
    """The host's OpenBLAS (Debian: libopenblas0-pthread), where MLX's bundled BLAS is the reference one."""
    return ctypes.util.find_library("openblas") if sys.platform == "linux" else None


def default_blas() -> str:
    return "openblas" if openblas_library() else "bundled"


def import_mlx(blas: str | None = None):
    """`mlx.core`, its BLAS bound as asked (default: OpenBLAS where the host has it)."""
    if "blas" not in _bound:
        if "mlx.core" in sys.modules:  # loaded before this module could choose
            _bound["blas"] = "bundled"
        elif (blas or default_blas()) == "openblas":
            if (library := openblas_library()) is None:
                raise UnavailableError("blas=openblas needs the host's OpenBLAS (apt-get install libopenblas0-pthread)")
            _bound.update(blas="openblas", lib=ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL))
        else:
            _bound["blas"] = "bundled"
    if blas is not None and blas != _bound["blas"]:
        raise UnavailableError(f"mlx is already loaded in this process with its {_bound['blas']} BLAS; "
                               f"blas={blas} needs a fresh process (bench run measures each lane in its own)")
    import mlx.core as mx

    return mx


def bound_blas() -> str:
    return str(_bound.get("blas", "bundled"))


def blas_threads() -> int:
    """Threads OpenBLAS runs a matmul on (0 when MLX runs its bundled single-threaded BLAS)."""
    lib = _bound.get("lib")
    return int(lib.openblas_get_num_threads()) if lib is not None else 0
