#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for development and CI.
#
#   deploy/slurm-local.sh start    install (Debian slurm-wlm + munge) if missing, configure, start, wait until idle
#   deploy/slurm-local.sh stop     stop only the daemons this script started (by its pid files)
#   deploy/slurm-local.sh status   daemons, sinfo, squeue
#
# Needs root (it writes /etc/slurm/slurm.conf and /etc/munge/munge.key). State, pid files and logs live
# in $DEEPSPORTS_SLURM_STATE (default /var/lib/deepsports-slurm). `start` is idempotent: a running cluster
# is left as it is. Jobs submitted as root run as root.
set -euo pipefail

STATE_DIR="${DEEPSPORTS_SLURM_STATE:-/var/lib/deepsports-slurm}"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/log"
CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET=/run/munge/munge.socket.2
START_TIMEOUT_S="${DEEPSPORTS_SLURM_START_TIMEOUT:-90}"
# Marks a slurm.conf as ours: a foreign one is never overwritten. It names the script's first path
# (slurm/): kept, so that a slurm.conf written before the script moved to deploy/ is still ours.
MARKER="# Written by deepsports slurm/local-cluster.sh"
NODE="$(hostname -s)"

say() { printf 'local-cluster: %s\n' "$*"; }
die() { printf 'local-cluster: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=deploy/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' needs root (it manages /etc/slurm, /etc/munge and system daemons)"; }

# pid from a pid file if that process is alive and is the named program, else empty.
live_pid() {
    local file="$1" name="$2" pid
    [ -s "$file" ] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] && echo "$pid"
    return 0
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sbatch munged mungekey; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [ "$missing" -eq 0 ] && return 0
    apt_install slurm-wlm munge
}

setup_munge() {
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (the munge package creates it)"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        say "creating $MUNGE_KEY"
        if ! mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null; then
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
}

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    local pid
    pid="$(live_pid "$RUN_DIR/munged.pid" munged)"
    if [ -n "$pid" ]; then say "munged already running (pid $pid, ours)"; return 0; fi
    if munge_works; then say "munged already running (not started by this script: left alone)"; return 0; fi
    setup_munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start; see /var/log/munge/munged.log"
    local i
    for i in $(seq 50); do munge_works && break; sleep 0.1; done
    munge_works || die "munged started but munge/unmunge fail; see /var/log/munge/munged.log"
    # Our own copy of the pid marks munged as started by us (stop leaves a foreign munged alone).
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"
    say "munged started (pid $(cat "$RUN_DIR/munged.pid"))"
}

render_conf() {
    local cpus total_mb real_mb margin_mb
    cpus="$(nproc)"
    total_mb="$(free -m | awk '/^Mem:/ {print $2}')"
    # slurmd drains a node that reports less memory than configured; keep a margin for the OS.
    margin_mb=$(( total_mb / 20 > 512 ? total_mb / 20 : 512 ))
    real_mb=$(( total_mb - margin_mb ))
    [ "$real_mb" -gt 256 ] || die "too little memory for a SLURM node (free -m total: $total_mb MB)"
    cat <<EOF
$MARKER; edits are overwritten by the next 'start'.
ClusterName=deepsports-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120; SLURM's minimum is 5):
# shorter for development. 10 s still covers a batch or srun launch on a loaded 2-core node.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# No event schedules a requeued job when its BeginTime passes: the main loop's next full pass
# (sched_interval, 60 s by default) starts it; backfill passes skip when nothing changed. Both every
# second: a requeued task starts at its BeginTime (measured: 11.0 s after the requeue, 21-61 s before).
SchedulerParameters=bf_interval=1,sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Jobs may be requeued (scontrol requeue, node failure, preemption); a job may requeue itself.
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to 'scontrol show job' for 5 minutes (tests read Restarts= from it).
MinJobAge=300
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
# Without a default, CR_Core_Memory gives a job that asks for no memory the whole node.
DefMemPerCPU=$(( real_mb / cpus ))
# Only CPUs is given, so every CPU counts as a core: n one-CPU jobs run at once even with hyperthreads.
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_conf() {
    if [ -e "$CONF" ] && ! head -n1 "$CONF" | grep -qF "$MARKER"; then
        die "$CONF exists and was not written by this script; move it away to use the local cluster"
    fi
    install -d -m 0755 /etc/slurm
    local new
    new="$(render_conf)"
    if [ -e "$CONF" ] && [ "$new" = "$(cat "$CONF")" ]; then return 1; fi
    printf '%s\n' "$new" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    say "wrote $CONF"
    return 0
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [ -e "$f" ] || continue
        printf '\n===== last lines of %s =====\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
}

wait_ready() {
    local deadline=$(( SECONDS + START_TIMEOUT_S )) state resumed=0
    while [ "$SECONDS" -lt "$deadline" ]; do
        state="$(node_state)"
        case "$state" in
            idle | mixed | allocated | completing) say "node $NODE is $state"; return 0 ;;
            down* | drain* | drained)
                # A node that was down when the cluster stopped stays down in the saved state.
                if [ "$resumed" -eq 0 ] && [ "$SECONDS" -gt $(( deadline - START_TIMEOUT_S + 5 )) ]; then
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    printf 'local-cluster: error: node %s not idle after %ss (state: %s)\n' \
        "$NODE" "$START_TIMEOUT_S" "${state:-no answer}" >&2
    sinfo -N -l >&2 || true
    show_logs
    exit 1
}

start_daemon() {
    local name="$1"; shift
    local pid
    pid="$(live_pid "$RUN_DIR/$name.pid" "$name")"
    if [ -n "$pid" ]; then say "$name already running (pid $pid)"; return 0; fi
    if pid="$(pgrep -x "$name" | head -n1)" && [ -n "$pid" ]; then
        die "a $name not started by this script is running (pid $pid): stop it first"
    fi
    "$name" "$@" || { show_logs; die "$name did not start"; }
    local i
    for i in $(seq 50); do
        pid="$(live_pid "$RUN_DIR/$name.pid" "$name")"
        [ -n "$pid" ] && break
        sleep 0.1
    done
    [ -n "$pid" ] || { show_logs; die "$name exited right after starting"; }
    say "$name started (pid $pid)"
}

stop_daemon() {
    local name="$1" file="$RUN_DIR/$1.pid" pid i
    pid="$(live_pid "$file" "$name")"
    if [ -z "$pid" ]; then rm -f "$file"; return 0; fi
    kill -TERM "$pid"
    for i in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then
        say "$name (pid $pid) ignored SIGTERM for 10 s: sending SIGKILL"
        kill -KILL "$pid" || true
    fi
    rm -f "$file"
    say "stopped $name (pid $pid)"
}

cmd_start() {
    need_root start
    install_packages
    install -d -m 0755 "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    start_munge
    if write_conf; then
        # A changed configuration (new memory size, hostname) needs fresh daemons.
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    # -i: do not refuse to start over a state file written by another version.
    start_daemon slurmctld -i
    start_daemon slurmd -N "$NODE"
    wait_ready
}

cmd_stop() {
    need_root stop
    local queued
    queued="$(squeue -h 2>/dev/null | wc -l || true)"
    if [ "${queued:-0}" -gt 0 ]; then
        say "warning: $queued job(s) still in the queue; running ones keep their processes (scancel them first)"
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
}

cmd_status() {
    local name pid
    for name in munged slurmctld slurmd; do
        pid="$(live_pid "$RUN_DIR/$name.pid" "$name")"
        if [ -n "$pid" ]; then echo "$name: running (pid $pid, started by this script)"
        elif pgrep -x "$name" >/dev/null 2>&1; then echo "$name: running (not started by this script)"
        else echo "$name: not running"; fi
    done
    command -v sinfo >/dev/null 2>&1 || { echo "SLURM is not installed"; return 1; }
    sinfo || return 1
    squeue
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
