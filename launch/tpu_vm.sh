#!/usr/bin/env bash
# Runs llada-train on every worker of a Cloud TPU VM slice (v4/v5e/v5p pods): one process per host,
# peers found by jax.distributed.initialize() from the TPU metadata.
#
#   launch/tpu_vm.sh [--dry_run] TPU_NAME ZONE -- --config=configs/llada_8b.py --workdir=gs://b/run
#
# Expects the repository at ~/llada_jax with its .venv on every worker (set it up once with
# `gcloud compute tpus tpu-vm ssh TPU --worker=all --command "git clone ... && make install"`).
# The workdir must be a gs:// path all hosts can write: Orbax saves from every host.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 [--dry_run] TPU_NAME ZONE -- llada-train flags ..." >&2
  exit 2
fi
tpu=$1 zone=$2
shift 3
remote="cd ~/llada_jax && LLADA_AUTO_DISTRIBUTED=1 .venv/bin/python -m llada_jax.train $*"
cmd=(gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="${remote}")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
