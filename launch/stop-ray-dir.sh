# Sourced by head.sh and node.sh: stop_ray_in DIR WHAT ends the Ray processes that name DIR on
# their command line (one head's or one node's, never another Ray on this machine): SIGTERM
# first (Ray's processes shut down in order), SIGKILL what is left after 10 s.
stop_ray_in() {
  local dir=$1 what=$2
  pkill -TERM -f -- "$dir/" || { echo "no Ray $what running in $dir" >&2; return 0; }
  for _ in $(seq 20); do pgrep -f -- "$dir/" >/dev/null || break; sleep 0.5; done
  pkill -KILL -f -- "$dir/" || true
  echo "stopped the Ray $what in $dir" >&2
}
