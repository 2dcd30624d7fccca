#!/usr/bin/env bash
# Run bnfree on every worker of a Cloud TPU VM pod slice (default v4-32: 4 hosts × 4 chips).
#
#   launch/tpu_pod.sh [--dry-run] [--skip-setup] -- <bnfree args without --workdir>
#   launch/tpu_pod.sh [--dry-run] --stop          # stop the job on every worker
#   e.g. BUCKET=gs://my-bucket launch/tpu_pod.sh -- run --config configs/alexnet_imagenet.py model.w_bits=2
#
# Steps (each one gcloud command, all workers at once with --worker=all):
#   slice    create the slice unless it exists (describe || create);
#   stop     stop what a previous launch left on the workers: its supervisors and bnfree
#            processes (SIGTERM, then SIGKILL), then whatever still holds the TPU
#            (`sudo lsof -t /dev/accel* /dev/vfio/*`), and libtpu's lock file;
#   copy     (not with --skip-setup) this checkout to ~/bnfree on every worker;
#   install  (not with --skip-setup) `bash launch/setup.sh --accelerator tpu ~/bnfree/.venv`:
#            a Python >= 3.11 venv with TPU JAX (the VM image's own Python is 3.10);
#   mount    BUCKET with gcsfuse on every worker, for the supervisors' exit-status files
#            only (the job itself reads and writes gs:// paths directly);
#   start    on every worker, detached (setsid nohup: the job outlives the ssh session and
#            this launcher), a supervisor running `bnfree --distributed ...` with its output
#            appended to ~/bnfree/logs/worker-N.log (N: the worker number).
# Stop-all: each supervisor writes its job's exit status to $MOUNT/bnfree/launches/$RUN/$LAUNCH_ID/
# worker-N.exit (in the shared bucket) and polls its peers' files; when one reports a failure
# it stops its own job (SIGTERM, SIGKILL after BNFREE_GRACE seconds), so one failing worker
# ends the whole job within seconds instead of leaving the others blocked in a collective.
# Your key=value overrides are passed through as given; the launcher adds
# `--workdir gs://BUCKET/bnfree/$RUN` and data.data_dir=gs://BUCKET/tensorflow_datasets after
# them (not data.data_dir when you give one).  A rerun of the same command resumes from the
# workdir's checkpoints.  Every host reads and writes the same workdir in the bucket (orbax
# writes one checkpoint from all of them); each copies the prepared dataset to its own disk
# once (ArrayRecord reads local files only).
# With --dry-run it prints every command, one per line, then '#' lines saying how to follow
# the logs, and runs nothing (no gcloud needed).
#
# Internal, run by the start step on a worker:
#   tpu_pod.sh --supervise WORKER EXIT_DIR -- <command>
# Env: TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION, PROJECT, BUCKET, RUN, MOUNT (below);
# LAUNCH_ID (default: the launch time); BNFREE_GRACE (default 60), BNFREE_POLL (default 5).
set -euo pipefail

TPU_NAME=${TPU_NAME:-bnfree-v4-32}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}                     # empty: gcloud's default project
BUCKET=${BUCKET:-gs://YOUR_BUCKET}
RUN=${RUN:-alexnet_imagenet}
MOUNT=${MOUNT:-/tmp/gcs}
LAUNCH_ID=${LAUNCH_ID:-$(date +%Y%m%d-%H%M%S)}
GRACE=${BNFREE_GRACE:-60}
POLL=${BNFREE_POLL:-5}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

failed_peer() {  # DIR ME: "WORKER STATUS" of the first other worker whose exit file reports a failure
  local f name status
  for f in "$1"/worker-*.exit; do
    [[ -e $f ]] || continue
    name=${f##*/worker-}; name=${name%.exit}
    [[ $name == "$2" ]] && continue
    status=$(cat "$f" 2>/dev/null) || continue
    [[ -z $status || $status == 0 ]] || { echo "$name $status"; return; }
  done
}

stop_child() {  # PID: SIGTERM (bnfree saves a checkpoint), then SIGKILL after the grace period
  local t
  kill -TERM "$1" 2>/dev/null || return 0
  for ((t = 0; t < GRACE * 10; t++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  echo "[supervisor] still running after ${GRACE}s; SIGKILL" >&2
  kill -KILL "$1" 2>/dev/null || true
}

supervise() {  # WORKER DIR CMD...: run CMD, stop it when a peer failed, publish its exit status
  local me=$1 dir=$2 child rc=0 peer
  shift 2
  mkdir -p "$dir"
  echo "[supervisor] worker $me $(date +%FT%T): $*" >&2
  "$@" &
  child=$!
  trap 'echo "[supervisor] stop signal; stopping worker $me" >&2; stop_child "$child"' TERM INT
  while kill -0 "$child" 2>/dev/null; do
    peer=$(failed_peer "$dir" "$me")
    if [[ -n $peer ]]; then
      echo "[supervisor] worker ${peer% *} exited with status ${peer#* }; stopping worker $me" >&2
      stop_child "$child"
      break
    fi
    sleep "$POLL"
  done
  wait "$child" || rc=$?
  echo "$rc" > "$dir/worker-$me.exit"
  echo "[supervisor] worker $me $(date +%FT%T): exit status $rc" >&2
  return "$rc"
}

if [[ ${1:-} == --supervise ]]; then
  [[ $# -ge 5 && $4 == -- ]] || die "usage: $0 --supervise WORKER EXIT_DIR -- <command>"
  me=$2; dir=$3; shift 4
  supervise "$me" "$dir" "$@"
  exit
fi

dry=0; setup=1; stop_only=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --skip-setup) setup=0; shift ;;
    --stop) stop_only=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || set -- run --config configs/alexnet_imagenet.py
for a in "$@"; do
  [[ $a == --workdir || $a == --workdir=* ]] &&
    die "the workdir is $BUCKET/bnfree/\$RUN (set RUN=name); do not pass --workdir"
done
here=$(cd "$(dirname "$0")/.." && pwd)
bucket=${BUCKET#gs://}; bucket=${bucket%%/*}
workdir=gs://$bucket/bnfree/$RUN
data_dir=gs://$bucket/tensorflow_datasets
exit_dir=$MOUNT/bnfree/launches/$RUN/$LAUNCH_ID
tarball=/tmp/bnfree_src.tar.gz
logs='~/bnfree/logs'                     # on each worker's own disk

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE"); [[ -n $PROJECT ]] && where+=(--project "$PROJECT")
q() {  # one shell command line: each word as is when safe, else in single quotes
  local w out=() sq="'\\''"
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/$sq}'"); fi
  done
  echo "${out[*]}"
}
on_all() { q "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$1"; }

extra=(--workdir "$workdir")
[[ " $* " == *" data.data_dir="* ]] || extra+=("data.data_dir=$data_dir")
bnfree_args=$(q "$@" "${extra[@]}")
tpu_devices='/dev/accel* /dev/vfio/*'    # v2-v4: /dev/accel*; v5e and later: /dev/vfio
# The [x]yz patterns match the processes but not this command's own shell.
stop="pkill -TERM -f '[t]pu_pod.sh --supervise'; pkill -TERM -f '[b]nfree_jax[.]cli'; \
for t in \$(seq $GRACE); do pgrep -f '[b]nfree_jax[.]cli' >/dev/null || break; sleep 1; done; \
pids=\$(sudo lsof -t $tpu_devices 2>/dev/null | sort -u); \
if [ -n \"\$pids\" ]; then echo \"killing stale TPU holders: \$pids\"; sudo kill -9 \$pids; fi; \
for t in \$(seq 30); do sudo lsof -t $tpu_devices >/dev/null 2>&1 || break; sleep 1; done; \
sudo rm -f /tmp/libtpu_lockfile; true"
install="mkdir -p ~/bnfree && tar xzf ~/bnfree_src.tar.gz -C ~/bnfree \
&& bash ~/bnfree/launch/setup.sh --accelerator tpu ~/bnfree/.venv"
mount="mkdir -p $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $bucket $MOUNT)"
worker_number="curl -sf -m 10 -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
start="w=\$($worker_number) || w=\$(hostname); mkdir -p $logs $exit_dir && cd ~/bnfree || exit 1; \
setsid nohup bash launch/tpu_pod.sh --supervise \"\$w\" $exit_dir -- \
env BNFREE_TPU=1 ~/bnfree/.venv/bin/python -m bnfree_jax.cli --distributed \
$bnfree_args >> $logs/worker-\$w.log 2>&1 < /dev/null & echo \"worker \$w: started, log $logs/worker-\$w.log\""

# name, then the command line (a string run by bash)
steps=()
if [[ $stop_only == 0 ]]; then
  steps+=("slice" "$(q "${gc[@]}" describe "$TPU_NAME" "${where[@]}") >/dev/null 2>&1 || $(q "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")")
fi
steps+=("stop" "$(on_all "$stop")")
if [[ $stop_only == 0 && $setup == 1 ]]; then
  steps+=(
    "pack" "$(q tar czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ -C "$here" .)"
    "copy" "$(q "${gc[@]}" scp "$tarball" "$TPU_NAME:~/bnfree_src.tar.gz" "${where[@]}" --worker=all)"
    "install" "$(on_all "$install")"
  )
fi
if [[ $stop_only == 0 ]]; then
  steps+=("mount" "$(on_all "$mount")" "start" "$(on_all "$start")")
fi

for ((i = 0; i < ${#steps[@]}; i += 2)); do
  if [[ $dry == 1 ]]; then echo "${steps[i+1]}"
  else echo "[tpu_pod] ${steps[i]}" >&2; bash -c "${steps[i+1]}"; fi
done
[[ $stop_only == 1 ]] && exit 0
cat <<EOF
# the job runs detached on every worker; follow worker 0 (N for worker N):
#   $(q "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command "tail -f $logs/worker-0.log")
# the last lines of every worker:
#   $(on_all "tail -n 3 $logs/worker-*.log")
# exit statuses (one file per finished worker): gsutil cat gs://$bucket/bnfree/launches/$RUN/$LAUNCH_ID/worker-*.exit
# stop it everywhere: launch/tpu_pod.sh --stop
EOF
