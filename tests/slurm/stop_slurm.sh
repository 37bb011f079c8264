#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start_slurm.sh (slurmd, slurmctld, munged).
#
#   stop_slurm.sh               stop all three daemons
#   stop_slurm.sh --keep-munge  leave munged running
#   stop_slurm.sh --purge       also delete $SAR3D_SLURM_DIR and the slurm.conf/gres.conf it wrote
set -uo pipefail

DIR="${SAR3D_SLURM_DIR:-/tmp/sar3d-slurm}"
keep_munge=0; purge=0
for a in "$@"; do
  case "$a" in
    --keep-munge) keep_munge=1 ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--keep-munge] [--purge]" >&2; exit 2 ;;
  esac
done

stop_pidfile() { # name pidfile
  local name="$1" pf="$2" pid
  [ -s "$pf" ] || return 0
  pid="$(cat "$pf")"
  if kill -0 "$pid" 2>/dev/null; then
    echo "[stop_slurm] stopping $name (pid $pid)" >&2
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pf"
}

# Cancel leftover jobs, but only on the cluster start_slurm.sh configured.
if command -v scancel >/dev/null 2>&1 && [ -s "$DIR/slurmctld.pid" ] && grep -q 'start_slurm.sh' /etc/slurm/slurm.conf 2>/dev/null; then
  timeout 10 scancel --user="$(id -un)" 2>/dev/null
fi
stop_pidfile slurmd "$DIR/slurmd.pid"
stop_pidfile slurmctld "$DIR/slurmctld.pid"
[ "$keep_munge" = 1 ] || stop_pidfile munged "$DIR/munge/munged.pid"

if [ "$purge" = 1 ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    grep -q 'start_slurm.sh' "$f" 2>/dev/null && rm -f "$f"
  done
  [ -f /etc/slurm/slurm.conf.before-sar3d ] && mv /etc/slurm/slurm.conf.before-sar3d /etc/slurm/slurm.conf
  rm -rf "$DIR"
fi
exit 0
