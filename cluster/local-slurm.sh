#!/usr/bin/env bash
# A real one-node SLURM cluster on 127.0.0.1, for trying the slurm launcher and for tests.
#
#   cluster/local-slurm.sh up       install (Debian, as root) if needed, configure, start
#   cluster/local-slurm.sh down     stop slurmctld, slurmd and munged
#   cluster/local-slurm.sh status   sinfo
#
# State, logs and the generated slurm.conf live in cluster/state/ (not committed).
# Settings known to work in containers: proctrack/linuxproc, task/none, select/cons_tres,
# munged running as the munge user.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${LABKIT_SLURM_STATE:-$here/state}"
conf="$state/slurm.conf"

need_root() { [ "$(id -u)" = 0 ] || { echo "local-slurm: must run as root (it starts daemons)" >&2; exit 2; }; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || { echo "local-slurm: slurm-wlm and munge are missing and apt-get is not available" >&2; exit 3; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem
    host="$(hostname -s)"
    cpus=16   # more than the cores: several ranks share a core, as on a laptop
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    mkdir -p "$state/spool/ctld" "$state/spool/d" "$state/log"
    cat > "$conf" <<CONF
ClusterName=labkit
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=labkit Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return 0; fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
}

up() {
    need_root
    install_packages
    write_conf
    start_munge
    # slurm commands find the configuration through SLURM_CONF; also link the default path
    mkdir -p /etc/slurm
    [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ] && mv /etc/slurm/slurm.conf /etc/slurm/slurm.conf.orig
    ln -sf "$conf" /etc/slurm/slurm.conf
    pgrep -x slurmctld >/dev/null || slurmctld -f "$conf"
    pgrep -x slurmd >/dev/null || slurmd -f "$conf"
    for _ in $(seq 1 60); do
        if sinfo -h -o "%t" 2>/dev/null | grep -qE "idle|mix|alloc"; then
            echo "local-slurm: up ($(sinfo -h -o '%P %D nodes %t'))"
            return 0
        fi
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "local-slurm: the node did not come up; see $state/log/" >&2
    sinfo >&2 || true
    exit 4
}

down() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 20); do pgrep -x 'slurmd|slurmctld' >/dev/null || break; sleep 0.5; done
    echo "local-slurm: down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
