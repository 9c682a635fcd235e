"""A Hugging Face checkpoint exported once from the GGUF, for servers that cannot read GGUF
(vLLM, mlx-lm, transformers serve): the same dequantized weights (float32, Q/K rows in HF order),
the config and the tokenizer built from the file, cached by the file's hash. Built with the
`transformers` backend's own config and state-dict mapping, so the two can never disagree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.errors import UnavailableError
from engine.model.digest import file_sha256
from engine.model.spec import ModelSpec
from engine.model.tokenizer import Tokenizer
from engine.paths import cache_dir

EXPORT_VERSION = 2  # bump when the layout written here changes


def checkpoint_dir(gguf_path: str | os.PathLike) -> Path:
    return cache_dir() / "checkpoints" / f"{Path(gguf_path).stem}-{file_sha256(gguf_path)[:16]}-v{EXPORT_VERSION}"


def export_checkpoint(gguf_path: str | os.PathLike) -> Path:
    """The checkpoint folder for this GGUF, written on first use (atomically: a killed export
    leaves no half folder behind)."""
    out = checkpoint_dir(gguf_path)
    if (out / "config.json").exists():
        return out
    try:
        from backends.transformers_hf import build_hf_model
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise UnavailableError(f"exporting a checkpoint needs torch and transformers: {e}") from e
    spec = ModelSpec.open(gguf_path)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = build_hf_model(spec, "f32", "cpu")
    model.generation_config.do_sample = False
    model.save_pretrained(tmp)
    _add_legacy_keys(tmp / "config.json", spec)
    tok = Tokenizer.from_spec(spec)
    text = lambda i: tok.token_text(i) if i is not None else None  # noqa: E731
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer, bos_token=text(tok.bos_id),
                                     eos_token=text(tok.eos_id), clean_up_tokenization_spaces=False)
    if tok.chat_template:
        hf_tok.chat_template = tok.chat_template
    hf_tok.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"{Path(gguf_path).name}\nsha256 {file_sha256(gguf_path)}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process exported it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _add_legacy_keys(path: Path, spec: ModelSpec) -> None:
    """transformers 5 writes RoPE as `rope_parameters`; readers of the older layout (mlx-lm) look
    for a top-level `rope_theta` and otherwise silently use 10000: write both."""
    cfg = json.loads(path.read_text())
    cfg.setdefault("rope_theta", spec.config.rope_base)
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
