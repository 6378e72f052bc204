#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the end-to-end tests of `bihm submit slurm`.
#
#   cluster/local-slurm.sh install   # apt-get install slurm-wlm munge (root, Debian/Ubuntu)
#   cluster/local-slurm.sh start     # write slurm.conf, start munged, slurmctld, slurmd
#   cluster/local-slurm.sh status    # exit 0 when all three daemons run and answer
#   cluster/local-slurm.sh stop      # stop the daemons this script started
#   cluster/local-slurm.sh env       # print `export SLURM_CONF=...` for the clients
#
# Everything lives in one state folder ($BIHM_SLURM_DIR, default /tmp/bihm-slurm): its own
# munge key and socket, slurm.conf, spool, state, logs and pid files, so nothing in /etc is
# touched and a system SLURM or munge, if any, is left alone. Clients (sbatch, squeue,
# scontrol, srun) find this SLURM through SLURM_CONF. The daemons bind to 127.0.0.1 only
# (CommunicationParameters=NoInAddrAny), one node `localhost` with this machine's CPUs, no
# accounting, no cgroups (proctrack/linuxproc), so it also works in containers and VMs.
set -euo pipefail

DIR="${BIHM_SLURM_DIR:-/tmp/bihm-slurm}"
CTLD_PORT="${BIHM_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${BIHM_SLURMD_PORT:-16818}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"

die() {
    echo "local-slurm: $*" >&2
    exit 1
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found: run '$0 install' (needs root) first"
}

alive() { # alive PIDFILE: the process named in PIDFILE runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "installing slurm-wlm and munge needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    # Leave memory out of scheduling (no RealMemory limits) but report a sane size.
    mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512))
    cat >"$CONF.tmp" <<EOF
# Written by cluster/local-slurm.sh: a single-node SLURM on 127.0.0.1 for tests.
ClusterName=bihm-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Finished jobs stay visible to scontrol for 30 minutes (there is no accounting database).
MinJobAge=1800
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return 0
    install -d -m 0700 "$DIR/munge"
    [[ -s "$DIR/munge/munge.key" ]] || mungekey --create --keyfile="$DIR/munge/munge.key" 2>/dev/null ||
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0600 "$DIR/munge/munge.key"
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" ||
        die "munged did not start: see $DIR/log/munged.log"
}

wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

start() {
    need munged
    need slurmctld
    need slurmd
    install -d -m 0755 "$DIR" "$DIR/state" "$DIR/spool" "$DIR/log"
    export SLURM_CONF="$CONF"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && status >/dev/null 2>&1; then
        echo "local-slurm: already running ($CONF)"
        return 0
    fi
    write_conf
    start_munge
    wait_for 10 munge --socket="$SOCKET" --no-input ||
        die "munged does not answer on $SOCKET: see $DIR/log/munged.log"
    if ! alive "$DIR/slurmctld.pid"; then
        # -i: ignore saved state from an earlier run of this folder.
        slurmctld -f "$CONF" -i || die "slurmctld did not start: see $DIR/log/slurmctld.log"
    fi
    if ! alive "$DIR/slurmd.pid"; then
        slurmd -f "$CONF" -N localhost || die "slurmd did not start: see $DIR/log/slurmd.log"
    fi
    wait_for 30 scontrol ping ||
        die "slurmctld does not answer: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
    # The node registers with slurmctld shortly after slurmd starts.
    if ! wait_for 30 node_idle; then
        die "node localhost is not idle: $(sinfo -h -N -o '%N %T %E' 2>&1); $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
    fi
    echo "local-slurm: running ($CONF); export SLURM_CONF=$CONF"
}

node_idle() {
    local state
    state=$(sinfo -h -N -n localhost -o '%T' 2>/dev/null) || return 1
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    fi
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

status() {
    export SLURM_CONF="$CONF"
    [[ -f "$CONF" ]] || die "not configured ($CONF missing)"
    alive "$DIR/munge/munged.pid" || die "munged is not running"
    alive "$DIR/slurmctld.pid" || die "slurmctld is not running"
    alive "$DIR/slurmd.pid" || die "slurmd is not running"
    scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer"
    node_idle || die "node localhost is not up: $(sinfo -h -N -o '%N %T %E' 2>&1)"
    echo "local-slurm: running ($CONF)"
}

stop_pidfile() { # stop_pidfile PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL
    local pid
    alive "$1" || return 0
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    echo "local-slurm: $2 ($pid) ignored SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/munge/munged.pid" munged
    echo "local-slurm: stopped"
}

case "${1:-}" in
install) install_packages ;;
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) die "usage: $0 install|start|status|stop|env" ;;
esac
