#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1 for the SLURM integration test (tests/test_slurm.py) and for
# trying profiles/slurm on a workstation: Debian's munge, slurmctld and slurmd, no accounting database,
# fake GPUs declared as GRES (character devices cloned from /dev/null). Run as root; idempotent.
#
#   bash tests/slurm/local_cluster.sh start    # install packages if missing, configure, start, wait for an idle node
#   bash tests/slurm/local_cluster.sh stop     # stop slurmd, slurmctld, munged (only the pids in their pid files)
#   bash tests/slurm/local_cluster.sh status
#
# Environment: MEDPROBE_SLURM_PARTITION (default: debug), MEDPROBE_SLURM_GPUS (fake GPUs, default 4),
# MEDPROBE_SLURM_CPUS (CPUs the node advertises, default nproc; more than nproc lets more jobs run at once),
# MEDPROBE_SLURM_MEM_MB (default 80% of MemTotal), MEDPROBE_SLURM_STATE (default /var/spool/medprobe-slurm),
# MEDPROBE_SLURM_NO_INSTALL=1 (never call apt-get; exit 3 if the packages are missing).
# Exit codes: 0 ready, 1 failed to start, 2 usage, 3 packages missing and not installable, 4 not root.
set -euo pipefail

PARTITION="${MEDPROBE_SLURM_PARTITION:-debug}"
GPUS="${MEDPROBE_SLURM_GPUS:-4}"
CPUS="${MEDPROBE_SLURM_CPUS:-$(nproc)}"
MEM_MB="${MEDPROBE_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)}"
STATE="${MEDPROBE_SLURM_STATE:-/var/spool/medprobe-slurm}"
NODE=localhost
CONF=/etc/slurm
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
PACKAGES=(munge slurmctld slurmd slurm-client)

say() { echo "[medprobe-slurm] $*" >&2; }
pid_in() { cat "$1" 2>/dev/null || true; }
running() { local pid; pid=$(pid_in "$1"); [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }
stop_pid() {
  local pid; pid=$(pid_in "$1")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  say "stopping pid $pid ($1)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  say "pid $pid still running after 5 s"
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ "${MEDPROBE_SLURM_NO_INSTALL:-0}" == 1 ]] || ! command -v apt-get >/dev/null; then
    say "missing packages: ${missing[*]} (no apt-get or MEDPROBE_SLURM_NO_INSTALL=1)"; exit 3
  fi
  say "installing ${missing[*]}"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; }; then
    say "apt-get could not install ${missing[*]}"; exit 3
  fi
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  if ! running "$MUNGE_PID"; then
    say "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
  fi
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "munge does not answer"; exit 1
}

write_config() {
  install -d -m 0755 "$STATE" "$STATE/ctld" "$STATE/slurmd" "$LOGS" "$CONF"
  local gres_types="" node_gres="" gres_conf="AutoDetect=off"
  if [[ "$GPUS" -gt 0 ]]; then
    # gres/gpu ignores GPUs without File= and rejects regular files: use char devices (major 1, minor 3
    # = /dev/null), so SLURM hands out indices and sets CUDA_VISIBLE_DEVICES / SLURM_JOB_GPUS.
    install -d -m 0755 "$STATE/gpus"
    for ((i = 0; i < GPUS; i++)); do
      [[ -c "$STATE/gpus/gpu$i" ]] || mknod -m 0666 "$STATE/gpus/gpu$i" c 1 3
    done
    gres_types="GresTypes=gpu"
    node_gres=" Gres=gpu:$GPUS"
    gres_conf+=$'\n'"NodeName=$NODE Name=gpu File=$STATE/gpus/gpu[0-$((GPUS - 1))]"
  fi
  local overrides=""
  [[ "$CPUS" -gt "$(nproc)" ]] && overrides="SlurmdParameters=config_overrides"
  local slurm_conf
  slurm_conf=$(cat <<CONF
# written by medprobe tests/slurm/local_cluster.sh
ClusterName=medprobe
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
EnforcePartLimits=ALL
# no slurmdbd: finished jobs stay visible to squeue (--slurm-status-command squeue) for 10 minutes
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
DefMemPerCPU=500
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$gres_types
$overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB$node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
  local changed=0
  [[ "$(cat "$CONF/slurm.conf" 2>/dev/null)" == "$slurm_conf" ]] || { printf '%s\n' "$slurm_conf" >"$CONF/slurm.conf"; changed=1; }
  [[ "$(cat "$CONF/gres.conf" 2>/dev/null)" == "$gres_conf" ]] || { printf '%s\n' "$gres_conf" >"$CONF/gres.conf"; changed=1; }
  if [[ $changed == 1 ]] && { running "$CTLD_PID" || running "$SLURMD_PID"; }; then
    say "configuration changed: restarting the SLURM daemons"
    stop_pid "$SLURMD_PID"; stop_pid "$CTLD_PID"
  fi
}

start_slurm() {
  running "$CTLD_PID" || { say "starting slurmctld"; /usr/sbin/slurmctld; }
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  running "$SLURMD_PID" || { say "starting slurmd"; /usr/sbin/slurmd -N "$NODE"; }
  local state=""
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null || true)
    case "$state" in
      idle* | mix* | alloc*) say "node $NODE is $state, partition $PARTITION, $GPUS fake GPUs"; return 0 ;;
      drain* | drng* | down* | inval*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  say "node $NODE did not become idle (state '$state')"
  scontrol show node "$NODE" >&2 || true
  tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
  exit 1
}

case "${1:-}" in
  start)
    [[ $EUID -eq 0 ]] || { say "must run as root"; exit 4; }
    install_packages; start_munge; write_config; start_slurm ;;
  stop) stop_pid "$SLURMD_PID"; stop_pid "$CTLD_PID"; stop_pid "$MUNGE_PID" ;;
  status)
    for f in "$MUNGE_PID" "$CTLD_PID" "$SLURMD_PID"; do
      if running "$f"; then echo "$f: running ($(pid_in "$f"))"; else echo "$f: not running"; fi
    done
    sinfo 2>&1 || true ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
