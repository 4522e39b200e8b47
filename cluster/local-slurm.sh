#!/usr/bin/env bash
# A real one-node SLURM cluster on 127.0.0.1, for trying the slurm launcher and for tests.
#
#   cluster/local-slurm.sh up       install (Debian, as root) if needed, configure, start
#   cluster/local-slurm.sh down     cancel this cluster's jobs, stop the daemons `up` started
#   cluster/local-slurm.sh status   sinfo and the daemons `up` started
#
# Runs as root (no sudo needed, none used): it starts daemons. State, logs, the generated
# slurm.conf and the list of the daemons it started (state/started: "name pid" lines) live
# in cluster/state/ (not committed; LABKIT_SLURM_STATE moves it). `down` stops only those
# recorded daemons, by pid, after checking that the pid is still that daemon: another
# slurmd or munged on the host is never touched, and a munged that was already running
# before `up` is used and left running.
# Settings known to work in containers: proctrack/linuxproc, task/none, select/cons_tres,
# munged running as the munge user.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${LABKIT_SLURM_STATE:-$here/state}"
conf="$state/slurm.conf"
started="$state/started"
port="${LABKIT_SLURM_PORT:-6817}"   # slurmctld's port; slurmd listens on the next one
export SLURM_CONF="$conf"

need_root() { [ "$(id -u)" = 0 ] || { echo "local-slurm: must run as root (it starts daemons); as another user: sudo $0 $*" >&2; exit 2; }; }

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
SlurmctldPort=$port
SlurmdPort=$((port + 1))
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

# is PID alive and is it the program NAME? (a recorded pid may have been reused since)
is_daemon() {
    local name="$1" pid="$2" comm
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [ "$comm" = "$name" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

pid_in() { [ -s "$1" ] && tr -dc '0-9' < "$1" || true; }

record() { echo "$1 $2" >> "$started"; }

wait_for_pidfile() {  # name pidfile: the pid of the daemon that just forked, or fail
    local pid
    for _ in $(seq 1 50); do
        pid="$(pid_in "$2")"
        if is_daemon "$1" "$pid"; then echo "$pid"; return 0; fi
        sleep 0.2
    done
    echo "local-slurm: $1 did not start; see $state/log/" >&2
    return 1
}

start_munge() {
    # a munged that answers is used as it is (and left running by down)
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
    local pid
    pid="$(wait_for_pidfile munged /run/munge/munged.pid)" || exit 4
    record munged "$pid"
}

start_daemon() {  # slurmctld|slurmd: started unless this cluster's own is already running
    local name="$1" pidfile="$state/$1.pid" pid tcp
    if is_daemon "$name" "$(pid_in "$pidfile")"; then return 0; fi
    tcp=$port; [ "$name" = slurmd ] && tcp=$((port + 1))
    if command -v ss >/dev/null && ss -Hltn "sport = :$tcp" 2>/dev/null | grep -q .; then
        echo "local-slurm: port $tcp is taken (another SLURM on this host?); choose other ports with LABKIT_SLURM_PORT=N" >&2
        exit 4
    fi
    rm -f "$pidfile"
    "$name" -f "$conf" || { echo "local-slurm: $name did not start; see $state/log/$name.log" >&2; exit 4; }
    pid="$(wait_for_pidfile "$name" "$pidfile")" || exit 4
    record "$name" "$pid"
}

# slurm commands find the configuration through SLURM_CONF, else /etc/slurm/slurm.conf:
# link that to this cluster's, unless it already names another existing configuration
link_default_conf() {
    local default=/etc/slurm/slurm.conf
    mkdir -p /etc/slurm
    if [ -L "$default" ] && [ -e "$default" ] && [ "$(readlink -f "$default")" != "$(readlink -f "$conf")" ]; then
        echo "local-slurm: $default names another cluster's configuration; for this one: export SLURM_CONF=$conf"
        return 0
    fi
    [ -e "$default" ] && [ ! -L "$default" ] && mv "$default" "$default.orig"
    ln -sf "$conf" "$default"
}

up() {
    need_root up
    install_packages
    mkdir -p "$state"
    write_conf
    start_munge
    link_default_conf
    start_daemon slurmctld
    start_daemon slurmd
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
    need_root down
    [ -s "$started" ] || { echo "local-slurm: down (nothing was started by up)"; return 0; }
    # this cluster's jobs end first, so that no job step outlives its slurmd
    if is_daemon slurmctld "$(pid_in "$state/slurmctld.pid")"; then
        jobs="$(squeue -h -o %i 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
        fi
    fi
    local pids=()
    # in the reverse order of starting: slurmd, slurmctld, munged
    while read -r name pid; do
        if is_daemon "$name" "$pid"; then kill -TERM "$pid" 2>/dev/null && pids+=("$name:$pid"); fi
    done < <(tac "$started")
    for _ in $(seq 1 40); do
        local left=()
        for entry in "${pids[@]+"${pids[@]}"}"; do is_daemon "${entry%%:*}" "${entry#*:}" && left+=("$entry"); done
        [ ${#left[@]} -eq 0 ] && break
        sleep 0.25
    done
    for entry in "${pids[@]+"${pids[@]}"}"; do
        is_daemon "${entry%%:*}" "${entry#*:}" && kill -KILL "${entry#*:}" 2>/dev/null || true
    done
    rm -f "$started"
    echo "local-slurm: down (stopped ${pids[*]:-nothing})"
}

status() {
    sinfo || true
    [ -s "$started" ] && { echo "started by up:"; cat "$started"; } || echo "no daemon started by up"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
