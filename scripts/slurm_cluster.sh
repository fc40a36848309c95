#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for `make test-slurm` (tests/test_slurm.py).
#
#   scripts/slurm_cluster.sh start    # install (apt, once) and start munge, slurmctld and slurmd
#   scripts/slurm_cluster.sh stop     # stop the three daemons (the packages stay installed)
#   scripts/slurm_cluster.sh status   # exit 0 when the cluster answers `sinfo`
#
# Needs root and apt-get (Debian / Ubuntu). Idempotent and quiet on success; on failure it prints one
# line naming what failed and exits 1. The daemons run as root without systemd (containers have
# none): proctrack/linuxproc and task/none need no cgroups. slurm.conf is written for this machine's
# cores and memory, with one partition `local` holding this node.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

fail() { echo "slurm_cluster: $*" >&2; exit 1; }

# Each daemon is found by its own pid file, never by name: other slurm or munge processes are left alone.
declare -A PID_FILE=([munged]=/run/munge/munged.pid [slurmctld]=/run/slurm/slurmctld.pid [slurmd]=/run/slurm/slurmd.pid)
running() { local pid; pid=$(cat "${PID_FILE[$1]}" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || fail "slurm is not installed and apt-get is missing: install slurm-wlm and munge by hand"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
        || fail "apt-get install slurm-wlm munge failed (run it by hand to see why)"
}

write_config() {
    local cpus mem_mb
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
    # Leave 1 GiB to the system; slurmd drains a node that reports less memory than configured.
    mem_mb=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1024 ))
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$LOG_DIR" /var/spool/slurmd /run/slurm
    cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh for a one-node test cluster on $NODE.
ClusterName=bkn-test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# submitit requeues a job from inside it (scontrol requeue) when it is signalled before its time limit.
JobRequeue=1
# Fast turn-around for tests: finished jobs are forgotten after 30 s, killed 5 s after SIGTERM.
MinJobAge=30
KillWait=5
OverTimeLimit=0
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    running munged && return
    [ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || create-munge-key -f >/dev/null 2>&1; } \
        || fail "could not create /etc/munge/munge.key"
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged >/dev/null 2>&1 || fail "munged did not start (see /var/log/munge/munged.log)"
}

is_up() { timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

start() {
    [ "$(id -u)" = 0 ] || fail "needs root (it installs packages and runs the daemons as root)"
    is_up && return  # already running: `stop` first to apply a new slurm.conf
    install_packages
    write_config
    start_munge
    running slurmctld || slurmctld || fail "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    running slurmd || slurmd || fail "slurmd did not start (see $LOG_DIR/slurmd.log)"
    for _ in $(seq 30); do
        is_up && return
        # A node left down or drained by an earlier run comes back once its reason is gone.
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    fail "the node did not become idle in 30 s: $(sinfo -h -o '%T %E' 2>&1 | head -1)"
}

stop() {
    local daemon
    for daemon in slurmd slurmctld munged; do
        running "$daemon" && kill "$(cat "${PID_FILE[$daemon]}")"
    done
    for _ in $(seq 20); do
        running slurmd || running slurmctld || running munged || return 0
        sleep 0.5
    done
    fail "slurmd, slurmctld or munged still running after 10 s"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) is_up || fail "not running" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
