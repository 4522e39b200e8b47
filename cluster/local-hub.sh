#!/usr/bin/env bash
# The course's JupyterHub on the local one-node SLURM: every student's server is a SLURM job.
#
#   cluster/local-slurm.sh up                     first: the cluster the servers run on
#   cluster/local-hub.sh up                       start the hub (and its proxy) on 127.0.0.1:8000
#   cluster/local-hub.sh down [--remove-users]    stop the hub; it cancels the servers' jobs
#   cluster/local-hub.sh status
#
# Runs as root (the hub submits each student's job as that student, with runuser). The
# students are local accounts, LABKIT_HUB_USERS (default: labkit-student); `up` creates the
# missing ones (useradd -m) and `down --remove-users` removes those it created (userdel -r),
# after cancelling all their jobs and ending all their processes.
# They log in with one shared password: LABKIT_HUB_PASSWORD, else a random one written to
# the state folder's `password` (a test hub; a real cluster uses PAM, see docs/cluster.md).
# State (database, logs, pids, the users it created) lives in cluster/state/hub/ (not
# committed; LABKIT_HUB_STATE moves it). `down` stops only what `up` started, by the pids it
# recorded: the hub, the proxy the hub started, and the servers' jobs of its users.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
state="${LABKIT_HUB_STATE:-$here/state/hub}"
venv="${LABKIT_HUB_VENV:-$root/.venv}"
users="${LABKIT_HUB_USERS:-labkit-student}"
port="${LABKIT_HUB_PORT:-8000}"
export LABKIT_HUB_STATE="$state" LABKIT_HUB_VENV="$venv" LABKIT_HUB_USERS="$users" LABKIT_HUB_PORT="$port"
export LABKIT_HUB_AUTH=shared LABKIT_HUB_SERVER_IP=127.0.0.1 LABKIT_HUB_CONNECT_IP=127.0.0.1
[ -z "${SLURM_CONF:-}" ] && [ -s "$here/state/slurm.conf" ] && export SLURM_CONF="$here/state/slurm.conf"

say() { echo "local-hub: $*"; }
fail() { echo "local-hub: $1" >&2; exit "${2:-3}"; }
need_root() { [ "$(id -u)" = 0 ] || fail "must run as root (the hub submits each student's job as that student); as another user: sudo $0 $1" 2; }

alive_cmd() {  # pid word: is pid alive, not a zombie, and does its command line contain word?
    local pid="$1" word="$2"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word"
}
pid_in() { [ -s "$1" ] && tr -dc '0-9' < "$1" || true; }

check_tools() {
    [ -x "$venv/bin/jupyterhub" ] && "$venv/bin/python" -c "import batchspawner" 2>/dev/null \
        || fail "jupyterhub and batchspawner are not in $venv: $venv/bin/pip install jupyterhub batchspawner"
    command -v configurable-http-proxy >/dev/null \
        || fail "configurable-http-proxy is missing: apt-get install nodejs npm && npm install -g configurable-http-proxy (scripts/system_deps.sh does it)"
    command -v sbatch >/dev/null || fail "SLURM is not installed: cluster/local-slurm.sh up installs and starts it"
    sinfo -h >/dev/null 2>&1 || fail "SLURM is not answering: start it first with cluster/local-slurm.sh up"
}

make_users() {
    local u
    for u in $users; do
        id -u "$u" >/dev/null 2>&1 && continue
        useradd -m -s /bin/bash "$u" || fail "useradd $u failed"
        echo "$u" >> "$state/created-users"
        say "created the local account $u"
    done
}

# The students' jobs run the course's environment as the students: every folder on the way to
# it (and to the Python it was made from) must let them through. A folder that does not
# (a venv made from a Python under /root) gets o+x (traverse, not list) until `down`.
open_path_to_env() {
    local target dir
    for target in "$venv/bin/python" "$(readlink -f "$venv/bin/python")" "$root"; do
        dir="$(dirname "$target")"
        while [ "$dir" != / ]; do
            if [ -d "$dir" ] && [ $(( 0$(stat -c '%a' "$dir") & 1 )) = 0 ]; then
                chmod o+x "$dir" && echo "$dir" >> "$state/opened-folders"
                say "o+x on $dir so that the students' jobs reach the course's environment (until down)"
            fi
            dir="$(dirname "$dir")"
        done
    done
    local u
    for u in $users; do
        runuser -u "$u" -- "$venv/bin/python" -c "import batchspawner" 2>/dev/null \
            || fail "$u cannot run the course's environment ($venv/bin/python -c 'import batchspawner' fails as $u)"
    done
}

up() {
    need_root up
    check_tools
    mkdir -p "$state"
    chmod 700 "$state"
    if alive_cmd "$(pid_in "$state/hub.pid")" jupyterhub; then say "already up on http://127.0.0.1:$port"; return 0; fi
    make_users
    open_path_to_env
    if [ -n "${LABKIT_HUB_PASSWORD:-}" ]; then
        printf '%s\n' "$LABKIT_HUB_PASSWORD" > "$state/password"
    elif [ ! -s "$state/password" ]; then
        head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$state/password"
    fi
    chmod 600 "$state/password"
    LABKIT_HUB_PASSWORD="$(tr -d '\n' < "$state/password")"
    export LABKIT_HUB_PASSWORD
    : > "$state/hub.log"
    (cd "$state" && exec setsid "$venv/bin/jupyterhub" -f "$here/jupyterhub_config.py" >> "$state/hub.log" 2>&1 < /dev/null) &
    echo $! > "$state/hub.pid"
    local pid; pid="$(pid_in "$state/hub.pid")"
    for _ in $(seq 1 120); do
        if "$venv/bin/python" - "$port" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/hub/health", timeout=2)
PY
            say "up on http://127.0.0.1:$port (users: $users; password in $state/password; log $state/hub.log)"
            return 0
        fi
        alive_cmd "$pid" jupyterhub || { tail -n 20 "$state/hub.log" >&2; fail "the hub exited while starting; see $state/hub.log" 4; }
        sleep 0.5
    done
    tail -n 20 "$state/hub.log" >&2
    fail "the hub did not answer within 60 s; see $state/hub.log (stop it with $0 down)" 4
}

stop_pid() {  # pid word seconds: TERM, wait, then KILL
    local pid="$1" word="$2" wait="$3"
    alive_cmd "$pid" "$word" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((wait * 4))); do alive_cmd "$pid" "$word" || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
}

cancel_jobs() {  # user [squeue filters]: scancel the user's jobs, wait until SLURM has ended them
    local u="$1" jobs; shift
    jobs="$(squeue -h -u "$u" "$@" -o %i 2>/dev/null || true)"
    [ -n "$jobs" ] || return 0
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 120); do
        [ -z "$(squeue -h -u "$u" "$@" -o %i 2>/dev/null || true)" ] && return 0
        sleep 0.25
    done
    say "jobs of $u still in the queue 30 s after scancel: $(echo $jobs)"
}

end_processes() {  # user: SIGKILL every process of an account `up` created, wait until they are gone
    local u="$1" uid
    uid="$(id -u "$u" 2>/dev/null)" || return 0
    pkill -KILL -U "$uid" 2>/dev/null || true
    for _ in $(seq 1 80); do
        pgrep -U "$uid" >/dev/null 2>&1 || return 0
        sleep 0.25
    done
    say "processes of $u still alive 20 s after SIGKILL: $(pgrep -a -U "$uid" | tr '\n' ';')"
}

down() {
    need_root down
    [ -d "$state" ] || { say "down (nothing was started)"; return 0; }
    local hub proxy u jobs
    hub="$(pid_in "$state/hub.pid")"
    proxy="$(pid_in "$state/jupyterhub-proxy.pid")"
    # the hub stops every server it spawned (cleanup_servers: scancel) and the proxy it started
    stop_pid "$hub" jupyterhub 60
    stop_pid "$proxy" configurable-http-proxy 10
    # a server's job the hub could not cancel (it was killed): its users' server jobs
    if command -v squeue >/dev/null; then
        for u in $users; do
            id -u "$u" >/dev/null 2>&1 || continue
            cancel_jobs "$u" -n spawner-jupyterhub
        done
    fi
    rm -f "$state/hub.pid" "$state/jupyterhub-proxy.pid"
    if [ -s "$state/opened-folders" ]; then
        while read -r dir; do chmod o-x "$dir" 2>/dev/null || true; done < "$state/opened-folders"
        rm -f "$state/opened-folders"
    fi
    if [ "${1:-}" = --remove-users ] && [ -s "$state/created-users" ]; then
        while read -r u <&3; do
            id -u "$u" >/dev/null 2>&1 || continue
            # an account that goes takes everything of its own along: its jobs (the training
            # runs too), then its processes; userdel refuses while one is still exiting
            command -v squeue >/dev/null && cancel_jobs "$u"
            end_processes "$u"
            userdel -r "$u" 2>/dev/null || userdel "$u" || true
            say "removed the local account $u"
        done 3< "$state/created-users"
        rm -f "$state/created-users"
    fi
    say "down"
}

status() {
    if alive_cmd "$(pid_in "$state/hub.pid")" jupyterhub; then
        say "up on http://127.0.0.1:$port (pid $(pid_in "$state/hub.pid"))"
    else
        say "down"
    fi
    squeue -h -n spawner-jupyterhub -o '%i %u %T %R' 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down "${2:-}" ;;
    status) status ;;
    *) echo "usage: $0 up | down [--remove-users] | status" >&2; exit 2 ;;
esac
