#!/usr/bin/env bash
# Submit a training run (or a sweep) to an existing Ray cluster through the Ray Jobs API, stream
# its logs, and exit with the job's status (0 succeeded, non-zero failed or stopped).
#   launch/submit.sh CONFIG [--address URL] [--storage DIR|URI] [--prepared DIR|URI] [--sweep SPACE]
#                    [-- extra `dcgan train` (or `dcgan sweep`) arguments]
# URL: the cluster's dashboard / Jobs API (default $RAY_ADDRESS, else http://127.0.0.1:8265).
# --storage: where runs live (runtime.storage_path), --prepared: the prepared shards
#      (data.prepared_dir). Absolute paths as every node sees them (shared storage: NFS, a
#      PVC) or URIs (s3://bucket/runs); a relative path is refused, as the job runs in a
#      temporary directory that Ray deletes. Default: the config's own values.
# CONFIG: a path inside this repository (uploaded with it) or an absolute path the cluster sees.
# --sweep SPACE: run `dcgan sweep --space SPACE` instead of `dcgan train` (SPACE: a path as
#      CONFIG is); `-- --resume` continues an interrupted sweep, `-- --trials N --scheduler pbt` ...
# Re-submitting the same config resumes the run; a new run.name (--set run.name=x) starts fresh.
# Token auth: the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ray=${RAY:-$root/.venv/bin/ray}
[[ -x $ray ]] || ray=$(command -v ray) || { echo "ray not found: run 'make install' first" >&2; exit 2; }

usage() { echo "usage: $0 CONFIG [--address URL] [--storage DIR|URI] [--prepared DIR|URI] [--sweep SPACE] [-- dcgan train|sweep args...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
config=$1; shift
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
overrides=()
space=
command=(train)
while [[ $# -gt 0 ]]; do
  case $1 in
    --address) address=$2; shift 2 ;;
    --storage) overrides+=(--set "runtime.storage_path=$2"); shift 2 ;;
    --prepared) overrides+=(--set "data.prepared_dir=$2"); shift 2 ;;
    --sweep) command=(sweep --space "$2"); space=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
for file in "$config" ${space:+"$space"}; do
  if [[ $file != /* ]]; then  # relative to the uploaded repository
    [[ -f $root/$file ]] || { echo "no file $root/$file (a path inside the repository, or an absolute one the cluster sees)" >&2; exit 2; }
  fi
done

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Our own submission id, also handed to the job: a run's lease names the job that holds it.
submission_id="dcgan-$(date +%Y%m%d-%H%M%S)-$RANDOM"
# `ray job stop` sends the job SIGTERM and SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S (Ray's
# default: 3 s); the ranks need a few steps and a checkpoint in between.
stop_wait=${STOP_WAIT_S:-120}
runtime_env=$(printf '{"working_dir": "%s", "excludes": ["/.venv/", "/runs/", "/data/", "/.git/", "*.egg-info/", "__pycache__/"], "env_vars": {"DCGAN_SUBMISSION_ID": "%s", "RAY_JOB_STOP_WAIT_TIME_S": "%s"}}' "$root" "$submission_id" "$stop_wait")
# The job is the entrypoint of a local run and of the KubeRay RayJob, pointed at this cluster.
exec "$ray" job submit --address "$address" --submission-id "$submission_id" --runtime-env-json "$runtime_env" -- \
  dcgan "${command[@]}" --config "$config" --set runtime.runner=ray --set runtime.ray_address=auto \
  "${overrides[@]}" "$@"
