#!/usr/bin/env bash
# Set up the environment and run the main job end to end on the embedded MNIST:
# float BN teacher → W4A4 QAT teacher → PTL → integer export → integer check → report.
# Usage: bash launch/quickstart.sh [WORKDIR] [extra bnfree run args, e.g. --config configs/mnist_alexnet.py:quick]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
bash "$here/launch/setup.sh" "$venv"
workdir=${1:-$here/runs/mnist_w4a4}
shift || true
cd "$here"
"$venv/bin/bnfree" run --config configs/mnist_alexnet.py --workdir "$workdir" "$@"
echo "report: $workdir/report/report.md"
