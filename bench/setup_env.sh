#!/usr/bin/env bash
# Separate venv for the peer benchmarks (PyTorch + brevitas + ONNX Runtime), bench/.benchenv.
# These are benchmark-only dependencies: they never enter the project's requirements.
# torch 2.13.0 is installed first, and only as a CPU build, so pip can never pull a CUDA
# one: from a local wheel (TORCH_WHEEL=..., else /opt/wheels/torch-2.13.0+cpu-*.whl) or,
# when there is none, from PyTorch's CPU-only index (TORCH_INDEX overrides its address).
# BENCH_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
env_dir="$here/.benchenv"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
step() {  # run a command, or print it under BENCH_DRY_RUN=1
  if [ "${BENCH_DRY_RUN:-0}" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}
[ -x "$env_dir/bin/python" ] || step "$python" -m venv "$env_dir"
pip="$env_dir/bin/pip"
wheel="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}"
if [ -n "$wheel" ]; then
  step "$pip" install -q "$wheel"
else
  step "$pip" install -q --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" torch==2.13.0
fi
# torch is already satisfied, so brevitas' dependency on it resolves to the CPU build above;
# onnx and onnxruntime at the project's test pins.
step "$pip" install -q brevitas numpy -r "$root/requirements-test.txt"
step "$env_dir/bin/python" -c "import torch, brevitas, onnxruntime; \
print('bench env:', 'torch', torch.__version__, 'brevitas', brevitas.__version__, 'onnxruntime', onnxruntime.__version__)"
