#!/usr/bin/env bash
# Runs N copies of a llada_jax command on this machine as one multi-process JAX job (CPU devices,
# gloo collectives): the multi-host code path without a cluster. Used by the tests.
#
#   launch/local.sh [--dry_run] N DEVICES_PER_PROCESS -- python -m llada_jax.train --config=... --workdir=...
#
# Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i and
# DEVICES_PER_PROCESS fake CPU devices (the caller's XLA_FLAGS kept); its output goes to stdout
# prefixed with "[i]". The script exits with the first non-zero status of any process.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: $0 [--dry_run] N DEVICES_PER_PROCESS -- command ..." >&2
  exit 2
fi
num_processes=$1 devices=$2
shift 3
port=${LLADA_COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < num_processes; i++)); do
  # XLA takes the last of a repeated flag: this device count wins over one in the caller's flags.
  env_vars=(JAX_PLATFORMS=cpu
            "XLA_FLAGS=${XLA_FLAGS:+${XLA_FLAGS} }--xla_force_host_platform_device_count=${devices}"
            JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="${num_processes}"
            JAX_PROCESS_ID="${i}")
  if ((dry_run)); then
    echo "env $(printf '%q ' "${env_vars[@]}")$*"
    continue
  fi
  (env "${env_vars[@]}" "$@" 2>&1 | sed -u "s/^/[${i}] /") &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || { code=$?; ((status == 0)) && status=${code}; }
done
exit "${status}"
