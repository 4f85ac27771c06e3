#!/usr/bin/env bash
# Create .venv and install the project into it (editable). Arguments: extras, e.g. `test`.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0"
  "${pip[@]}" "torch==2.13.0"
fi
extras=$(IFS=,; echo "$*")
echo "setup: installing the project${extras:+ with [$extras]}"
"${pip[@]}" -e ".${extras:+[$extras]}"
