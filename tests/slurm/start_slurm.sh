#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on localhost (munged + slurmctld + slurmd).
#
# Idempotent: re-running with an unchanged config and live daemons does nothing but
# wait for the node. Needs root (Debian/Ubuntu with apt-get). Installs slurm-wlm and
# munge only if they are missing.
#
#   SAR3D_SLURM_DIR       state, spool, pid and log files      [/tmp/sar3d-slurm]
#   SAR3D_SLURM_CPUS      CPUs declared for the node           [nproc]
#   SAR3D_SLURM_MEM_MB    RealMemory declared for the node     [90% of slurmd -C]
#   SAR3D_SLURM_GPUS      fake GPUs (gres on /dev/null, /dev/zero, ...) [2]
#   SAR3D_SLURM_TIMEOUT   seconds to wait for an idle node     [60]
#
# slurm.conf goes to the default /etc/slurm/slurm.conf on purpose: the Snakemake
# Slurm executor strips SLURM_* variables (SLURM_CONF included) before srun, so a
# non-default location would not be seen inside jobs.
# Job status: no accounting (slurmdbd) is run; MinJobAge=3600 keeps finished jobs
# visible to squeue (status checks; tests read every job's resources back), so the
# Snakemake profile uses `slurm-status-command: squeue`.
set -euo pipefail

DIR="${SAR3D_SLURM_DIR:-/tmp/sar3d-slurm}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
GRES_CONF="$CONF_DIR/gres.conf"
NODE=localhost
TIMEOUT="${SAR3D_SLURM_TIMEOUT:-60}"
export PATH="/usr/sbin:/sbin:$PATH"

log() { echo "[start_slurm] $*" >&2; }
die() { echo "[start_slurm] ERROR: $*" >&2; exit 1; }
# Exit status 77 = "cannot set up here" (not root, no apt-get, packages not installable);
# tests skip on it outside CI. Any other failure exits 1.
unavailable() { echo "[start_slurm] UNAVAILABLE: $*" >&2; exit 77; }

[ "$(id -u)" = 0 ] || unavailable "must run as root (installs packages, starts daemons)"

mkdir -p "$DIR"
# Serialise concurrent callers (e.g. several pytest-xdist workers). The daemons below
# are started with `9>&-` so they do not inherit (and hold) this lock.
exec 9>"$DIR/.lock"
flock -w 120 9 || die "could not lock $DIR/.lock"

# --- 1. packages --------------------------------------------------------------------------
need_pkgs=()
command -v slurmctld >/dev/null 2>&1 || need_pkgs+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need_pkgs+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need_pkgs+=(slurm-client)
command -v munged >/dev/null 2>&1 || need_pkgs+=(munge)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || unavailable "apt-get not found; install ${need_pkgs[*]} yourself"
  log "installing slurm-wlm munge (missing: ${need_pkgs[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # Try the current package lists first; refresh them only if that fails.
  if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$DIR/apt.log" 2>&1; then
    apt-get update -qq >>"$DIR/apt.log" 2>&1 || true
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$DIR/apt.log" 2>&1 \
      || { tail -20 "$DIR/apt.log" >&2; unavailable "apt-get install slurm-wlm munge failed (log: $DIR/apt.log)"; }
  fi
fi

# --- 2. munge ----------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  [ -s /etc/munge/munge.key ] || { log "creating /etc/munge/munge.key"; mungekey --create --force 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 "$DIR/munge"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  log "starting munged"
  runuser -u munge -- munged --force --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" </dev/null >/dev/null 2>&1 9>&- \
    || die "munged failed to start (log: $DIR/munge/munged.log)"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munge does not work (log: $DIR/munge/munged.log)"
fi

# --- 3. config ---------------------------------------------------------------------------
hw="$(slurmd -C 2>/dev/null | head -1)"
hw_mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
CPUS="${SAR3D_SLURM_CPUS:-$(nproc)}"
MEM="${SAR3D_SLURM_MEM_MB:-$(( ${hw_mem:-4096} * 9 / 10 ))}"
GPUS="${SAR3D_SLURM_GPUS:-2}"
NODE_GRES=""; [ "$GPUS" -gt 0 ] && NODE_GRES="Gres=gpu:$GPUS"
DEF_MEM_PER_CPU=$(( MEM / CPUS / 2 ))
[ "$DEF_MEM_PER_CPU" -ge 100 ] || DEF_MEM_PER_CPU=100

install -d -m 0755 "$DIR/state" "$DIR/spool" "$DIR/log" "$CONF_DIR"
new_conf="$(mktemp)"; new_gres="$(mktemp)"
trap 'rm -f "$new_conf" "$new_gres"' EXIT
cat >"$new_conf" <<CONF
# Written by tests/slurm/start_slurm.sh -- single-node test cluster, state in $DIR
ClusterName=sar3d
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Scheduling: cores and memory are consumable, so small jobs run side by side.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
# No accounting daemon; keep finished jobs in slurmctld (and squeue) for an hour.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM $NODE_GRES State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
{
  echo "# Written by tests/slurm/start_slurm.sh -- fake GPUs so gpu-declaring rules can schedule"
  # Slurm refuses two GPUs on one device file, so each fake GPU gets its own harmless one.
  fake=(/dev/null /dev/zero /dev/full /dev/urandom /dev/random)
  [ "$GPUS" -le "${#fake[@]}" ] || die "at most ${#fake[@]} fake GPUs (SAR3D_SLURM_GPUS=$GPUS)"
  for i in $(seq 0 $(( GPUS - 1 ))); do echo "NodeName=$NODE Name=gpu File=${fake[$i]}"; done
} >"$new_gres"

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
changed=0
cmp -s "$new_conf" "$CONF" || changed=1
cmp -s "$new_gres" "$GRES_CONF" || changed=1
if [ "$changed" = 1 ]; then
  if pid_alive "$DIR/slurmctld.pid" || pid_alive "$DIR/slurmd.pid"; then
    log "config changed; restarting daemons"
    SAR3D_SLURM_DIR="$DIR" "$(dirname "$0")/stop_slurm.sh" --keep-munge
  fi
  [ -f "$CONF" ] && ! grep -q 'start_slurm.sh' "$CONF" && cp "$CONF" "$CONF.before-sar3d"
  install -m 0644 "$new_conf" "$CONF"
  install -m 0644 "$new_gres" "$GRES_CONF"
fi

# --- 4. daemons --------------------------------------------------------------------------
if ! pid_alive "$DIR/slurmctld.pid"; then
  log "starting slurmctld"
  # -c: cold start, forget jobs from an earlier run of this harness.
  slurmctld -c </dev/null >>"$DIR/log/slurmctld.out" 2>&1 9>&- || die "slurmctld failed (log: $DIR/log/slurmctld.log)"
fi
if ! pid_alive "$DIR/slurmd.pid"; then
  log "starting slurmd"
  slurmd -N "$NODE" </dev/null >>"$DIR/log/slurmd.out" 2>&1 9>&- || die "slurmd failed (log: $DIR/log/slurmd.log)"
fi

# --- 5. wait for an idle node ------------------------------------------------------------
state=""
for _ in $(seq $(( TIMEOUT * 4 ))); do
  state="$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mix|alloc) break ;;
    drain*|drng|down*|fail*)
      # A node left drained/down by an earlier run: bring it back.
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.25
done
case "$state" in
  idle|mix|alloc) ;;
  *) sinfo -N -l >&2 || true
     scontrol show node "$NODE" >&2 || true
     tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
     die "node $NODE not ready after ${TIMEOUT}s (state '$state')" ;;
esac

log "cluster up: node $NODE $state, CPUs=$CPUS RealMemory=${MEM}MB gpu:$GPUS, partition main"
log "config: $CONF $GRES_CONF"
log "logs:   $DIR/log/slurmctld.log $DIR/log/slurmd.log $DIR/munge/munged.log"
echo "SAR3D_SLURM_DIR=$DIR"
