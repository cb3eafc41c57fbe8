#!/usr/bin/env bash
# Run a config on this machine, with the same entrypoint a cluster job uses.
#   launch/local.sh CONFIG [dcgan train arguments...]     e.g. launch/local.sh configs/dryrun.yaml --dry-run
# With runtime.runner: ray (the default of configs/dryrun.yaml) it starts a private Ray on
# 127.0.0.1 for the run; add --runner local to train in this process instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [dcgan train args...]" >&2; exit 2; }
make -C "$root" --quiet install
config=$1; shift
exec "$root/.venv/bin/dcgan" train --config "$config" "$@"
