#!/usr/bin/env bash
# Run every benchmark and print, last, one JSON line with the headline ratios.
# Project steps run in the project's Python (PY, default /work/venv/bin/python or python3);
# the PyTorch/brevitas peer runs in bench/.benchenv, created by setup_env.sh when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
py="${PY:-/work/venv/bin/python}"
[ -x "$py" ] || py=python3
bench_py="$here/.benchenv/bin/python"
[ -x "$bench_py" ] || bash "$here/setup_env.sh"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
echo "uptime before: $(uptime)" >&2
run() {  # name python script [args]: keep the script's last line (its JSON)
  local name="$1"; shift
  echo "== $name" >&2
  "$@" 2> "$out/$name.err" | tee "$out/$name.log" >&2
  tail -n 1 "$out/$name.log" > "$out/$name.json"
}
run train_step "$py" "$here/train_step.py"
run train_step_torch "$bench_py" "$here/train_step_torch.py"
run int_inference "$py" "$here/int_inference.py"
run binary_layer "$py" "$here/binary_layer.py"
run size "$py" "$here/size.py"
echo "uptime after: $(uptime)" >&2
"$py" - "$out" <<'PY'
import datetime, json, os, sys
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "bench"))
from _common import machine
d = sys.argv[1]
r = {n: json.load(open(os.path.join(d, n + ".json")))
     for n in ("train_step", "train_step_torch", "int_inference", "binary_layer", "size")}
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
}, sort_keys=True))
PY
