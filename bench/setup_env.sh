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
wheel="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)}"
if [ -z "$wheel" ]; then
  echo "setup_env.sh: no CPU torch 2.13.0 wheel found (set TORCH_WHEEL=/path/to/torch-2.13.0+cpu-*.whl);" \
       "refusing to let pip pick a CUDA build" >&2
  exit 1
fi
"$pip" install -q "$wheel"
# torch is already satisfied, so brevitas' dependency on it resolves to the CPU wheel above.
"$pip" install -q brevitas onnx onnxruntime numpy
"$env_dir/bin/python" -c "import torch, brevitas, onnxruntime; \
print('bench env:', 'torch', torch.__version__, 'brevitas', brevitas.__version__, 'onnxruntime', onnxruntime.__version__)"
