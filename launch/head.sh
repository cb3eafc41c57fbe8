#!/usr/bin/env bash
# A Ray head on this machine, on loopback, with token auth: something to submit jobs to.
#   launch/head.sh start [--num-cpus N]     prints the Jobs API address
#   launch/head.sh stop
# Ports: RAY_PORT (GCS, default 6379), DASHBOARD_PORT (dashboard + Jobs API, default 8265),
# AGENT_PORT (the node agent's HTTP server, which runs the jobs; default 52365),
# RAY_CLIENT_PORT (Ray Client, default 10001). Ray's defaults are fixed ports: a second Ray on
# the machine (another head, or one a program started) holding one of them leaves this head
# without a working Jobs API ("address already in use" in dashboard_agent.log).
# Each head keeps its files in a directory of its own (RAY_HEAD_DIR, default /tmp/ray-head-RAY_PORT),
# which every one of its processes names on its command line: `stop` ends those processes only,
# never another head or a Ray that a program started on this machine (`ray stop` would).
# The token lives in ~/.ray/auth_token (created if missing); clients get it the same way,
# or from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH. Auth is never turned off.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/launch/stop-ray-dir.sh"
ray=${RAY:-$root/.venv/bin/ray}
[[ -x $ray ]] || ray=$(command -v ray) || { echo "ray not found: run 'make install' first" >&2; exit 2; }
export RAY_AUTH_MODE=token  # a CLI-started head does not enable it by itself (docs/ARCHITECTURE.md, traps)
export PATH="$(dirname "$ray"):$PATH"  # jobs' `python` is the one beside this ray (the project's venv)

head_dir=${RAY_HEAD_DIR:-/tmp/ray-head-${RAY_PORT:-6379}}

case ${1:-} in
  start)
    shift
    num_cpus=()
    [[ ${1:-} == --num-cpus ]] && num_cpus=(--num-cpus "$2")
    "$ray" get-auth-token --generate >/dev/null
    "$ray" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
      --port="${RAY_PORT:-6379}" --dashboard-port="${DASHBOARD_PORT:-8265}" "${num_cpus[@]}" \
      --dashboard-agent-listen-port="${AGENT_PORT:-52365}" --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
      --temp-dir="$head_dir" --disable-usage-stats >&2
    echo "http://127.0.0.1:${DASHBOARD_PORT:-8265}"
    ;;
  stop)
    stop_ray_in "$head_dir" head
    ;;
  *)
    echo "usage: $0 start [--num-cpus N] | stop" >&2
    exit 2
    ;;
esac
