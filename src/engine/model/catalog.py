"""Model names a user can give: a path, `default` (the shipped SmolLM2), or `synth:SHAPE[:QTYPE]`."""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import InputError
from engine.paths import cache_dir
from engine.model.spec import default_model_path


def resolve_model(name: str) -> str:
    if name in ("", "default"):
        return default_model_path()
    if name.startswith("synth:"):
        parts = name.split(":")
        if len(parts) not in (2, 3):
            raise InputError(f"synthetic model names look like synth:SHAPE or synth:SHAPE:QTYPE, got {name!r}")
        shape, qtype = parts[1], parts[2] if len(parts) == 3 else "f32"
        path = cache_dir() / "synth" / f"{shape}-{qtype}.gguf"
        if not path.exists():
            from engine.model.synth import write_synthetic

            tmp = path.with_suffix(".partial")
            write_synthetic(tmp, shape, qtype)
            os.replace(tmp, path)
        return str(path)
    return os.path.abspath(name) if Path(name).exists() else name
