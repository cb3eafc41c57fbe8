#!/usr/bin/env bash
# Train a config with Horovod, its processes started by horovodrun (Gloo controller; Horovod
# reduces CUDA tensors with NCCL where it was built with GPU operations, over Gloo otherwise).
#   launch/horovod.sh CONFIG [-np N] [-H HOSTS] [-- dcgan train arguments...]
#   e.g. launch/horovod.sh configs/dryrun.yaml -np 2 -- --dry-run
# N defaults to 2 and HOSTS to localhost:N. On several hosts every host needs this checkout
# (and its .venv) at the same path, password-less ssh between them, and the run directory on
# shared storage. On this machine alone each process gets its share of the cores as torch
# threads, unless OMP_NUM_THREADS is set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: $0 CONFIG [-np N] [-H HOSTS] [-- dcgan train args...]"
[[ $# -ge 1 ]] || { echo "$usage" >&2; exit 2; }
config=$1; shift
np=2 hosts=""
while [[ $# -gt 0 ]]; do
    case $1 in
        -np) np=${2:?$usage}; shift 2 ;;
        -H) hosts=${2:?$usage}; shift 2 ;;
        --) shift; break ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
[[ $np =~ ^[1-9][0-9]*$ ]] || { echo "-np must be a positive integer, got '$np'" >&2; exit 2; }
make -C "$root" --quiet horovod
if [[ -z $hosts ]]; then  # all N on this machine: they share its cores
    hosts=localhost:$np
    threads=$(( $(nproc) / np ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
fi
# The config's scaling.num_workers becomes N: it is what the data sharding and the checks use.
exec "$root/.venv/bin/horovodrun" -np "$np" -H "$hosts" --gloo \
    "$root/.venv/bin/dcgan" train --config "$config" --runner horovodrun \
    --set distributed.strategy=horovod --set "scaling.num_workers=$np" "$@"
