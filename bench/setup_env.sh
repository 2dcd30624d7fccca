#!/usr/bin/env bash
# Separate venv for the peer benchmarks (PyTorch + brevitas + ONNX Runtime).
# These are benchmark-only dependencies: they never enter the project's requirements.
# torch is installed first from the local CPU wheel so pip can never pull a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
env_dir="$here/.benchenv"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$env_dir/bin/python" ]; then
  "$python" -m venv "$env_dir"
fi
pip="$env_dir/bin/pip"
wheel="$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)"
if [ -n "$wheel" ]; then
  "$pip" install -q "$wheel"
else
  "$pip" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
# torch is already satisfied, so brevitas' dependency on it resolves to the CPU wheel above.
"$pip" install -q brevitas onnx onnxruntime numpy
"$env_dir/bin/python" -c "import torch, brevitas, onnxruntime; \
print('bench env:', 'torch', torch.__version__, 'brevitas', brevitas.__version__, 'onnxruntime', onnxruntime.__version__)"
