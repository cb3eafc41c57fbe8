#!/usr/bin/env bash
# This machine joins a Ray head as a worker node: more CPUs or GPUs for the jobs submitted there.
#   launch/node.sh start HEAD_ADDRESS [--num-cpus N] [--num-gpus N]    HEAD_ADDRESS: host:port of the head's GCS
#   launch/node.sh stop HEAD_ADDRESS
# Token auth, as the head (launch/head.sh): the token comes from ~/.ray/auth_token (copy the
# head's there), RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH. NODE_IP: the address the other nodes
# reach this one at (default: what Ray picks). Resources default to what Ray detects.
# The node keeps its files in a directory of its own (RAY_NODE_DIR, default
# /tmp/ray-node-<HEAD_PORT>-<NODE_NAME>), named on the command line of every one of its processes:
# `stop` ends this node's processes only, never the head or another node on this machine.
# Nodes of one job need the same storage: the same shared path, or an object-store URI whose
# credentials (AWS_* variables, the instance's role) this node's environment has now, since
# Ray's processes on this node inherit them. `dcgan doctor --address HEAD_ADDRESS` checks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/launch/stop-ray-dir.sh"
ray=${RAY:-$root/.venv/bin/ray}
[[ -x $ray ]] || ray=$(command -v ray) || { echo "ray not found: run 'make install' first" >&2; exit 2; }
export RAY_AUTH_MODE=token  # the head refuses a node without the cluster's token
export PATH="$(dirname "$ray"):$PATH"

name=${NODE_NAME:-node}

case ${1:-} in
  start)
    address=${2:?usage: $0 start HEAD_ADDRESS [--num-cpus N] [--num-gpus N]}
    [[ $address == *:* && $address != http* ]] || { echo "HEAD_ADDRESS is the head's GCS host:port (e.g. 10.0.0.5:6379), not '$address'" >&2; exit 2; }
    shift 2
    resources=()
    while [[ $# -gt 0 ]]; do
      case $1 in
        --num-cpus | --num-gpus) resources+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        *) echo "unknown option $1 (--num-cpus N, --num-gpus N)" >&2; exit 2 ;;
      esac
    done
    node_dir=${RAY_NODE_DIR:-/tmp/ray-node-${address##*:}-$name}
    ip=()
    [[ -n ${NODE_IP:-} ]] && ip=(--node-ip-address="$NODE_IP")
    "$ray" start --address="$address" "${ip[@]}" "${resources[@]}" \
      --temp-dir="$node_dir" --disable-usage-stats >&2
    echo "joined $address"
    ;;
  stop)
    address=${2:?usage: $0 stop HEAD_ADDRESS}
    node_dir=${RAY_NODE_DIR:-/tmp/ray-node-${address##*:}-$name}
    stop_ray_in "$node_dir" node
    ;;
  *)
    echo "usage: $0 start HEAD_ADDRESS [--num-cpus N] [--num-gpus N] | stop HEAD_ADDRESS" >&2
    exit 2
    ;;
esac
