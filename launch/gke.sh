#!/usr/bin/env bash
# Renders launch/gke_jobset.yaml and applies it with kubectl (or prints it with --dry_run).
#
#   launch/gke.sh [--dry_run] NAME IMAGE ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST -- llada-train flags
#   e.g. launch/gke.sh llada8b us-docker.pkg.dev/p/r/llada:latest tpu-v5p-slice 4x4x4 16 4 -- \
#        --config=configs/llada_8b.py --config.mesh.fsdp=64 --workdir=gs://bucket/runs/8b
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 7 || "$7" != "--" ]]; then
  echo "usage: $0 [--dry_run] NAME IMAGE ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST -- flags ..." >&2
  exit 2
fi
export NAME=$1 IMAGE=$2 ACCELERATOR=$3 TOPOLOGY=$4 HOSTS=$5 CHIPS_PER_HOST=$6
shift 7
export ARGS="$*"
rendered=$(python3 -c 'import os, string, sys; print(string.Template(sys.stdin.read()).substitute(os.environ))' \
  < "$(dirname "$0")/gke_jobset.yaml")
if ((dry_run)); then
  echo "${rendered}"
else
  echo "${rendered}" | kubectl apply -f -
fi
