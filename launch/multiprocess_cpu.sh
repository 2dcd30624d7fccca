#!/usr/bin/env bash
# N cooperating bnfree processes on this machine, each with K simulated CPU devices:
# the same code path as a multi-host pod (jax.distributed + gloo collectives).
#
#   launch/multiprocess_cpu.sh N [--devices-per-process K] [--port P] [--dry-run] -- <bnfree args>
#   e.g. launch/multiprocess_cpu.sh 2 --devices-per-process 2 -- \
#          train-teacher --config configs/mnist_alexnet.py:quick teacher.steps=50 --workdir /tmp/job
#
# The launcher's options come before `--`; everything after it goes to every process as given
# (KEY=VALUE overrides anywhere, before or after --workdir; a --dry-run there is bnfree's).
# Each output line is prefixed with "[pI] ".  The launcher waits for all processes;
# when one exits non-zero it terminates the others and exits with that status
# (a dead peer never leaves the rest hanging).  With --dry-run it prints the N
# commands it would run, one per line, and exits 0.
# Env: PYTHON (interpreter, default python3), BNFREE_PORT (default: a free port),
# BNFREE_GRACE (seconds between SIGTERM and SIGKILL for the survivors, default 10).
set -euo pipefail

usage() { echo "usage: $0 N [--devices-per-process K] [--port P] [--dry-run] -- <bnfree args>" >&2; exit 2; }

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1; shift
k=1; dry=0; port=${BNFREE_PORT:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    --devices-per-process) k=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ $k =~ ^[1-9][0-9]*$ ]] || usage
[[ $# -gt 0 ]] || usage

python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z $port ]]; then
  if [[ $dry == 1 ]]; then port=12355
  else port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || true)
  fi
  [[ $port =~ ^[0-9]+$ ]] || port=$((20000 + RANDOM % 40000))
fi
if command -v bnfree >/dev/null 2>&1 && [[ -z ${PYTHON:-} ]]; then bnfree=(bnfree)
else bnfree=("$python" -m bnfree_jax.cli); fi   # "python -m bnfree_jax.cli" is the bnfree command

command_for() {  # the command of process $1 up to its bnfree arguments, in array "cmd"
  cmd=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$k" JAX_PLATFORMS=cpu
       "BNFREE_COORDINATOR=127.0.0.1:$port" "BNFREE_NUM_PROCESSES=$n" "BNFREE_PROCESS_ID=$1"
       "${bnfree[@]}" --distributed)
}

if [[ $dry == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    command_for "$i"; cmd+=("$@"); printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo
  done
  exit 0
fi

cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
pids=()
stop_all() {
  local sig=$1 p
  for p in "${pids[@]}"; do kill "-$sig" "$p" 2>/dev/null || true; done
}
terminate_all() {  # SIGTERM (a checkpointed stop), then SIGKILL after the grace period
  local t p alive
  stop_all TERM
  for ((t = 0; t < ${BNFREE_GRACE:-10} * 10; t++)); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break; sleep 0.1
  done
  stop_all KILL
  wait 2>/dev/null || true
}
on_signal() { echo "[launch] signal received; stopping all processes" >&2; terminate_all; exit 130; }
trap on_signal INT TERM

for ((i = 0; i < n; i++)); do
  command_for "$i"
  "${cmd[@]}" "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
  echo "[launch] process $i pid $! (coordinator 127.0.0.1:$port, $k devices)" >&2
done

status=0; left=$n; running=("${pids[@]}")
while [[ $left -gt 0 ]]; do
  rc=0; done_pid=; wait -n -p done_pid "${running[@]}" || rc=$?
  left=$((left - 1))
  rest=(); for p in "${running[@]}"; do [[ $p == "$done_pid" ]] || rest+=("$p"); done
  running=("${rest[@]}")
  if [[ $rc -ne 0 ]]; then
    echo "[launch] pid ${done_pid:-?} exited with status $rc; stopping the others" >&2
    status=$rc
    terminate_all
    break
  fi
done
exit "$status"
