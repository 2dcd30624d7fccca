#!/usr/bin/env bash
# Set up the environment and run the whole test suite (slow end-to-end tests included).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/launch/setup.sh" "${VENV:-$here/.venv}"
"${VENV:-$here/.venv}/bin/pip" install -q -r "$here/requirements-test.txt"
cd "$here"
"${VENV:-$here/.venv}/bin/python" -m pytest -q tests "$@"
