#!/usr/bin/env bash
# Run every benchmark and print, last, one JSON line with the headline ratios.
# From a fresh clone it sets up what it needs first:
#   * the project venv (VENV, default <repo>/.venv; made by launch/setup.sh when it cannot
#     import jax), plus requirements-test.txt (onnx, onnxruntime) for int_inference.py;
#     PY=/path/to/python uses that interpreter instead (still given the test extras);
#   * the PyTorch/brevitas peer env bench/.benchenv (bench/setup_env.sh).
# A setup step that fails stops the run with one line saying what to run by hand.
# BENCH_DRY_RUN=1 prints the setup and benchmark commands instead of running them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
dry="${BENCH_DRY_RUN:-0}"

die() { echo "run_all.sh: $*" >&2; exit 1; }
can_import() { command -v "$1" >/dev/null && "$1" -c "import $2" >/dev/null 2>&1; }  # python modules
step() {  # run a command, or print it under BENCH_DRY_RUN=1
  if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}

if [ -n "${PY:-}" ]; then
  py="$PY"
  can_import "$py" "jax, flax, ml_collections" \
    || die "PY=$py cannot import jax/flax: unset PY to use the project venv, or run: bash launch/setup.sh"
else
  venv="${VENV:-$root/.venv}"
  py="$venv/bin/python"
  if ! can_import "$py" "jax, flax, ml_collections"; then
    step bash "$root/launch/setup.sh" "$venv" \
      || die "could not set up the project venv; run: bash launch/setup.sh $venv (and see its error)"
  fi
fi
if ! can_import "$py" "onnx, onnxruntime"; then
  step "$py" -m pip install -q -r "$root/requirements-test.txt" \
    || die "could not install onnx/onnxruntime; run: $py -m pip install -r requirements-test.txt"
fi
bench_py="$here/.benchenv/bin/python"
if ! can_import "$bench_py" "torch, brevitas"; then
  step bash "$here/setup_env.sh" \
    || die "no PyTorch/brevitas env in bench/.benchenv; run: TORCH_WHEEL=/path/to/torch-2.13.0+cpu-*.whl bash bench/setup_env.sh"
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
[ "$dry" = 1 ] || echo "uptime before: $(uptime)" >&2
run() {  # name python script [args]: keep the script's last line (its JSON)
  local name="$1"; shift
  if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; return; fi
  echo "== $name" >&2
  if ! "$@" 2> "$out/$name.err" | tee "$out/$name.log" >&2; then
    tail -n 20 "$out/$name.err" >&2
    die "$name failed (the end of its stderr is above)"
  fi
  tail -n 1 "$out/$name.log" > "$out/$name.json"
}
run train_step "$py" "$here/train_step.py"
run train_step_torch "$bench_py" "$here/train_step_torch.py"
run int_inference "$py" "$here/int_inference.py"
run binary_layer "$py" "$here/binary_layer.py"
run size "$py" "$here/size.py"
run accel_check "$py" "$here/accel_check.py"
run input_pipeline "$py" "$here/input_pipeline.py"
[ "$dry" = 1 ] && exit 0
echo "uptime after: $(uptime)" >&2
"$py" - "$out" <<'PY'
import datetime, json, os, sys
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "bench"))
from _common import machine
d = sys.argv[1]
r = {n: json.load(open(os.path.join(d, n + ".json")))
     for n in ("train_step", "train_step_torch", "int_inference", "binary_layer", "size", "accel_check",
               "input_pipeline")}
ts, tt, ii, bl, sz = (r[k] for k in ("train_step", "train_step_torch", "int_inference", "binary_layer", "size"))
ort_best = max(ii["ort_int8_qoperator_images_per_s"], ii["ort_int8_qdq_images_per_s"])
print(json.dumps({
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "machine": machine(),
    "ptl_step_vs_brevitas": round(ts["ptl_step_images_per_s"] / tt["brevitas_w4a4_distill_step_images_per_s"], 3),
    "fakequant_overhead": ts["fakequant_overhead"],
    "intsim_vs_ort_int8": ii["intsim_vs_ort_int8"],
    "binary_vs_int8_layer": bl["binary_vs_int8_layer"],
    "artifact_vs_ideal_size": sz["artifact_vs_ideal_size"],
    "images_per_s": {
        "ptl_step": ts["ptl_step_images_per_s"], "float_step": ts["float_step_images_per_s"],
        "w4a4_qat_step": ts["w4a4_qat_step_images_per_s"],
        "brevitas_w4a4_distill_step": tt["brevitas_w4a4_distill_step_images_per_s"],
        "torch_float_step": tt["torch_float_step_images_per_s"],
        "intsim_w8a8": ii["intsim_w8a8_images_per_s"], "intsim_w4a4": ii["intsim_w4a4_images_per_s"],
        "ort_int8_qoperator": ii["ort_int8_qoperator_images_per_s"], "ort_int8_qdq": ii["ort_int8_qdq_images_per_s"],
        "ort_fp32": ii["ort_fp32_images_per_s"], "flax_fakequant_w8a8": ii["flax_fakequant_w8a8_images_per_s"],
        "flax_fakequant_w4a4": ii["flax_fakequant_w4a4_images_per_s"],
        "binary_conv": bl["conv3x3_256_8x8_images_per_s"], "binary_dense": bl["dense_4096_images_per_s"],
        "student_w1a1_vs_w8a8": bl["student_images_per_s"]},
    "binary_vs_int8_dense": bl["binary_vs_int8_dense"],
    "size_per_bits": sz["per_bits"],
    "accel_check": {k: r["accel_check"][k] for k in (
        "frozen_h2d_bytes_per_step", "bf16_conv_dot_fraction", "codes_equal_f32_bf16",
        "host_syncs_per_100_steps", "mfu_teacher", "teacher_step_images_per_s", "ptl_stage_step_images_per_s")},
    "input_images_per_s": {k: r["input_pipeline"][k] for k in ("mnist", "imagenet")},
}, sort_keys=True))
PY
