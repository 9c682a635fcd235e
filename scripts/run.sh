#!/usr/bin/env bash
# The main job: set up if needed, then the default sweep (every framework that runs here, on the
# default model). Extra arguments go to `bench run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/bench run --modes best "$@"
