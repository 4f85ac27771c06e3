#!/usr/bin/env bash
# Set up (first run only) and run the demo on the bundled default model; extra args go to `dllm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m runtime demo "$@"
