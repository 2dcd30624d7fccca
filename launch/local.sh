#!/usr/bin/env bash
# One machine, all its devices, one process: `bnfree "$@"` (no jax.distributed needed).
#
#   launch/local.sh [--dry-run] <bnfree args>
#   e.g. launch/local.sh run --config configs/mnist_alexnet.py:quick model.w_bits=2 --workdir /tmp/job ptl.stage_steps=300
#
# The bnfree args are passed as given: KEY=VALUE overrides go anywhere among them (before or
# after --workdir; a later one wins).  A leading --dry-run is this script's; a later one is bnfree's
# (`launch/local.sh distill --dry-run ...` prints the stage plan).
# Env: PYTHON (interpreter used when no `bnfree` executable is on PATH, default python3).
# With --dry-run it prints the command it would run and exits 0.
set -euo pipefail
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
[[ $# -gt 0 ]] || { echo "usage: $0 [--dry-run] <bnfree subcommand and args>" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
if command -v bnfree >/dev/null 2>&1 && [[ -z ${PYTHON:-} ]]; then bnfree=(bnfree)
else bnfree=("${PYTHON:-python3}" -m bnfree_jax.cli); fi   # the bnfree command, from the checkout
cmd=("${bnfree[@]}" "$@")
if [[ $dry == 1 ]]; then printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo; exit 0; fi
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${cmd[@]}"
