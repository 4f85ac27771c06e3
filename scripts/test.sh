#!/usr/bin/env bash
# Set up (first run only) and run the test suite; extra args go to pytest.
# Tests marked `gpu` skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
