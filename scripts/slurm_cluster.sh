#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying and testing clrun's SLURM launcher:
# munged, slurmctld and slurmd on localhost, one partition, no cgroups.
#
#   scripts/slurm_cluster.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, as root)
#   scripts/slurm_cluster.sh start     # write the config, start the daemons, wait until the node is idle
#   scripts/slurm_cluster.sh status    # the daemons' pids, sinfo; exit status 0 when the cluster answers
#   scripts/slurm_cluster.sh stop      # stop the daemons this script started
#   scripts/slurm_cluster.sh env       # print 'export SLURM_CONF=...' (for: eval "$(... env)")
#
# `start` installs nothing: without slurmctld, slurmd and munged on the PATH it stops and says to
# run `install`. It runs as root (the daemons do; jobs run as the user who submits them).
# Everything lives in $CLRUN_SLURM_DIR (default /tmp/clrun-slurm): slurm.conf, an own munge key
# and socket (a system munged, if any, is left alone), the controller's state, the spool, logs
# and pid files. `start` is idempotent: when all three daemons run and the node answers it does
# nothing; otherwise it stops what is left of an earlier cluster (pid files whose process has
# died are removed) and starts all three again with a clean controller state (queued jobs of a
# crashed cluster are forgotten). `stop` signals only this cluster's daemons: the pids in its
# pid files, and munged/slurmctld/slurmd processes whose command line names $CLRUN_SLURM_DIR.
#
# The client commands (sbatch, squeue, scontrol, ...) find the config through
# /etc/slurm/slurm.conf, which `start` links to $CLRUN_SLURM_DIR/slurm.conf when that path is
# free (or already such a link); where a real slurm.conf is there it is left untouched and
# SLURM_CONF must be exported (`eval "$(scripts/slurm_cluster.sh env)"`). `stop` removes the link.
#
# Settings (environment): CLRUN_SLURM_DIR, CLRUN_SLURM_CPUS (default: nproc),
# CLRUN_SLURM_MEM_MB (default: RealMemory from `slurmd -C`), CLRUN_SLURM_PORT (slurmctld's port,
# default 6817; slurmd uses the next one), CLRUN_SLURM_PARTITION (default: debug).
set -euo pipefail

DIR="${CLRUN_SLURM_DIR:-/tmp/clrun-slurm}"
PARTITION="${CLRUN_SLURM_PARTITION:-debug}"
PORT="${CLRUN_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
SOCKET="$DIR/munge/munge.socket.2"
NODE="$(hostname -s)"
DAEMONS=(munged slurmctld slurmd)

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

pidfile() { echo "$DIR/run/$1.pid"; }

# The pid of a daemon started by this script, if it is still that daemon; else nothing.
running_pid() {
    local f pid
    f="$(pidfile "$1")"
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]] || return 1
    echo "$pid"
}

need_root() {
    [[ "$(id -u)" == 0 ]] || die "run as root: the SLURM and munge daemons of this local cluster run as root."
}

have_binaries() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null
}

cmd_install() {
    need_root
    if have_binaries; then
        say "slurm-wlm and munge are installed ($(slurmctld -V))"
        return
    fi
    command -v apt-get >/dev/null || die "no apt-get here: install SLURM (slurmctld, slurmd, client) and munge with this system's package manager."
    say "apt-get install slurm-wlm munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
    have_binaries || die "slurm-wlm/munge did not install."
    say "installed $(slurmctld -V)"
}

node_state() {
    { SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true; } | head -n1
}

write_config() {
    local cpus mem
    cpus="${CLRUN_SLURM_CPUS:-$(nproc)}"
    mem="${CLRUN_SLURM_MEM_MB:-$( { slurmd -C 2>/dev/null || true; } | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')}"
    [[ -n "$mem" ]] || mem=$(( $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024 ))
    mkdir -p "$DIR"/{state,spool,log,run,munge}
    cat >"$CONF" <<EOF
# Written by clrun's scripts/slurm_cluster.sh: a one-node cluster on localhost.
ClusterName=clrun-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (SLURM's default: 120).
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups: processes are tracked through /proc, tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# CPUs and memory are the consumable resources, so jobs of 1 CPU run side by side.
SchedulerType=sched/backfill
# Scheduling passes every 2 s (default 60 s main, 30 s backfill), so a requeued job soon runs again.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Finished jobs stay visible to squeue/scontrol for 30 s; a job gets 10 s between SIGTERM and SIGKILL.
MinJobAge=30
KillWait=10
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
EOF
}

link_config() {
    if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
        return
    fi
    if [[ -e "$SYSTEM_CONF" || -L "$SYSTEM_CONF" ]]; then
        say "$SYSTEM_CONF exists and is not this cluster's; left as it is. Use this cluster with: export SLURM_CONF=$CONF"
        return
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$CONF" "$SYSTEM_CONF"
}

unlink_config() {
    if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

start_munge() {
    chmod 700 "$DIR/munge"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    fi
    chmod 400 "$DIR/munge/munge.key"
    rm -f "$SOCKET" "$SOCKET.lock"
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$(pidfile munged)" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start; see $DIR/log/munged.log"
    munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null \
        || die "munge does not answer on $SOCKET; see $DIR/log/munged.log"
}

wait_for_idle() {
    local state="" i
    for i in $(seq 1 120); do
        state="$(node_state)"
        case "$state" in
            idle) return 0 ;;
            drain*|down*|drng) SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE is '${state:-not answering}' after 60 s; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do
        running_pid "$d" >/dev/null || return 1
    done
    [[ -n "$(node_state)" ]]
}

# Every process of daemon $1 that belongs to this cluster: the pid in its pid file, and any other
# process of that name whose command line names $DIR (one whose pid file was lost or overwritten).
cluster_pids() {
    local pid f
    running_pid "$1" || true
    for f in /proc/[0-9]*/comm; do
        pid="${f#/proc/}"
        pid="${pid%/comm}"
        [[ "$(cat "$f" 2>/dev/null)" == "$1" ]] || continue
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR/"; then
            echo "$pid"
        fi
    done | sort -u
}

stop_daemon() {
    local d="$1" pid pids i
    pids="$(cluster_pids "$d")"
    for pid in $pids; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $pids; do
        for i in $(seq 1 50); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.2
        done
        if [[ -d "/proc/$pid" ]]; then
            say "$d (pid $pid) did not stop in 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$(pidfile "$d")"
}

cmd_stop() {
    local d
    # The node first, then the controller, then munge (which both authenticate through).
    for d in slurmd slurmctld munged; do
        stop_daemon "$d"
    done
    rm -f "$SOCKET" "$SOCKET.lock"
    unlink_config
    say "stopped"
}

cmd_start() {
    need_root
    have_binaries || die "slurmctld/slurmd/munged/sinfo not found: run '$0 install' (apt-get install slurm-wlm munge) first."
    if [[ -s "$CONF" ]] && all_running; then
        link_config
        say "already running (node $NODE: $(node_state)); config $CONF"
        return
    fi
    # Whatever an earlier start left (a daemon that died, stale pid files): stop it and start afresh.
    local d
    for d in slurmd slurmctld munged; do
        stop_daemon "$d"
    done
    write_config
    link_config
    start_munge
    slurmctld -c -i -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
    wait_for_idle
    say "running: node $NODE ($(SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o '%c CPUs, %m MB')) idle, partition $PARTITION; config $CONF"
}

cmd_status() {
    local d pid ok=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(running_pid "$d")"; then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            ok=1
        fi
    done
    if [[ -s "$CONF" ]] && SLURM_CONF="$CONF" sinfo 2>/dev/null; then
        :
    else
        echo "sinfo: no answer"
        ok=1
    fi
    return $ok
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
