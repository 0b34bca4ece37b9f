#!/usr/bin/env bash
# A real multi-node SLURM cluster on this one machine, for trying multi-node set-ups and for CI.
#
#   deploy/slurm-cluster.sh up [--nodes N]   install (Debian slurm-wlm + munge) if missing, start N compute nodes
#                                            (default 3) and the controller, wait until every node is idle
#   deploy/slurm-cluster.sh down             stop every daemon and job process of the cluster, delete its
#                                            namespaces, veths and bridge (also what a crashed run left)
#   deploy/slurm-cluster.sh status           daemons, nodes (sinfo), queue
#   deploy/slurm-cluster.sh env              print `export SLURM_CONF=...` for this cluster's commands
#
# The host is the login node: slurmctld (and the servers the jobs reach: PostgreSQL, MLflow) listen on
# the bridge address $PREFIX.1. Each compute node is a slurmd in its own network, UTS and mount
# namespace (own hostname, own /etc/hosts, own 127.0.0.1, address $PREFIX.<10+k> on a veth into the
# bridge); all share the host's file system, as a cluster shares NFS. Nothing is routed beyond the
# bridge: the nodes reach the login node and each other, nothing else.
#
# It coexists with deploy/slurm-local.sh (the one-node cluster): its own slurm.conf (use it with
# SLURM_CONF=$DEEPSPORTS_CLUSTER_STATE/slurm.conf), ports, state directory, munged (own key and socket)
# and daemon names (dsc-slurmctld, dsc-slurmd, dsc-munged: symlinks, so `pgrep -x slurmctld` does not
# see them). Several clusters can run at once with different settings:
#
#   DEEPSPORTS_CLUSTER_STATE   state, logs, pid files, slurm.conf [/var/lib/deepsports-cluster]
#   DEEPSPORTS_CLUSTER_NAME    prefix of namespaces, bridge and veths (<= 6 characters) [dsc]
#   DEEPSPORTS_CLUSTER_NET     the bridge's /24, first three octets [10.77.0]
#   DEEPSPORTS_CLUSTER_PORT    slurmctld's port; slurmd's is the next one [6917]
#   DEEPSPORTS_CLUSTER_CPUS    CPUs each node offers (all share the machine's cores) [nproc, at least 4]
#   DEEPSPORTS_CLUSTER_SLURMD_TIMEOUT  seconds without an answer before a node is DOWN and its jobs requeued [10]
#
# Needs root (namespaces, links, daemons). Jobs submitted as root run as root.
set -euo pipefail

STATE_DIR="${DEEPSPORTS_CLUSTER_STATE:-/var/lib/deepsports-cluster}"
NAME="${DEEPSPORTS_CLUSTER_NAME:-dsc}"
NET="${DEEPSPORTS_CLUSTER_NET:-10.77.0}"
PORT="${DEEPSPORTS_CLUSTER_PORT:-6917}"
SLURMD_TIMEOUT="${DEEPSPORTS_CLUSTER_SLURMD_TIMEOUT:-10}"
START_TIMEOUT_S="${DEEPSPORTS_CLUSTER_START_TIMEOUT:-60}"
CONF="$STATE_DIR/slurm.conf"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/log"
BIN_DIR="$STATE_DIR/bin"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET_DIR="$STATE_DIR/munge-run"
MUNGE_SOCKET="$MUNGE_SOCKET_DIR/munge.socket"
BRIDGE="$NAME-br0"
LOGIN_ADDR="$NET.1"
MARKER="# Written by deepsports deploy/slurm-cluster.sh"

say() { printf 'slurm-cluster: %s\n' "$*"; }
die() { printf 'slurm-cluster: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=deploy/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

[[ "$NAME" =~ ^[a-z][a-z0-9]{0,5}$ ]] || die "DEEPSPORTS_CLUSTER_NAME=$NAME: expected 1-6 lower-case letters/digits"
[[ "$NET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "DEEPSPORTS_CLUSTER_NET=$NET: expected three octets, e.g. 10.77.0"
case "$PORT" in ''|*[!0-9]*) die "DEEPSPORTS_CLUSTER_PORT=$PORT: expected a port number" ;; esac
case "$SLURMD_TIMEOUT" in ''|*[!0-9]*) die "DEEPSPORTS_CLUSTER_SLURMD_TIMEOUT=$SLURMD_TIMEOUT: expected seconds" ;; esac
case "$STATE_DIR" in /*) ;; *) die "DEEPSPORTS_CLUSTER_STATE=$STATE_DIR: expected an absolute path" ;; esac

need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' needs root (network namespaces, links and daemons)"; }

node_name() { echo "node$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }
netns() { echo "$NAME-node$1"; }
veth() { echo "$NAME-n$1"; }

# pid from a pid file if that process is alive (not a zombie) and has the given comm, else empty.
live_pid() {
    local file="$1" name="$2" pid stat
    [ -s "$file" ] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
    stat="$(cat "/proc/$pid/stat" 2>/dev/null || true)"
    [ "$(echo "${stat##*) }" | cut -c1)" != Z ] && echo "$pid"
    return 0
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd slurmstepd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing=1
    done
    command -v nsenter >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 || missing=1
    [ "$missing" -eq 0 ] && return 0
    apt_install slurm-wlm munge iproute2 util-linux
}

sbin() { command -v "$1" 2>/dev/null || echo "/usr/sbin/$1"; }

# --- munge: a munged of our own (own key, socket, daemon name) ---

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    local pid i
    pid="$(live_pid "$RUN_DIR/munged.pid" dsc-munged)"
    if [ -n "$pid" ] && munge_works; then return 0; fi
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (the munge package creates it)"
    install -d -o munge -g munge -m 0700 "$MUNGE_DIR"
    # munged refuses a socket directory others may write to, and clients need to reach the socket.
    install -d -o munge -g munge -m 0755 "$MUNGE_SOCKET_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        (umask 077 && dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none)
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    ln -sfn "$(sbin munged)" "$BIN_DIR/dsc-munged"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- "$BIN_DIR/dsc-munged" --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged did not start; see $MUNGE_DIR/munged.log"
    for i in $(seq 50); do munge_works && break; sleep 0.1; done
    munge_works || die "munged started but munge/unmunge fail; see $MUNGE_DIR/munged.log"
    cp "$MUNGE_DIR/munged.pid" "$RUN_DIR/munged.pid"
    say "munged started (pid $(cat "$RUN_DIR/munged.pid"))"
}

# --- configuration ---

render_conf() {
    local nodes="$1" cpus total_mb real_mb k
    cpus="${DEEPSPORTS_CLUSTER_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"
    case "$cpus" in ''|*[!0-9]*|0) die "DEEPSPORTS_CLUSTER_CPUS=$cpus: expected a number of CPUs per node" ;; esac
    total_mb="$(free -m | awk '/^Mem:/ {print $2}')"
    real_mb=$(( total_mb - (total_mb / 20 > 512 ? total_mb / 20 : 512) ))
    [ "$real_mb" -gt 256 ] || die "too little memory for a SLURM node (free -m total: $total_mb MB)"
    cat <<EOF
$MARKER; edits are overwritten by the next 'up'.
ClusterName=$NAME
SlurmctldHost=$(hostname -s)($LOGIN_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged. A requeued job waits cred_expire+1 s before it starts again (SLURM's default: 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# CR_LLN: each job to the least loaded node, so an array spreads over the nodes as on a busy cluster.
SelectTypeParameters=CR_Core_Memory,CR_LLN
# The nodes share the machine's cores: each may claim more CPUs than it has (DEEPSPORTS_CLUSTER_CPUS).
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=10
InactiveLimit=0
# A node silent for this long is DOWN and its jobs are requeued (slurmctld pings every third of it).
SlurmdTimeout=$SLURMD_TIMEOUT
MessageTimeout=5
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/nodes/%n/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
DefMemPerCPU=512
EOF
    for k in $(seq "$nodes"); do
        echo "NodeName=$(node_name "$k") NodeAddr=$(node_addr "$k") CPUs=$cpus RealMemory=$real_mb State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(node_name 1)$( [ "$nodes" -gt 1 ] && printf ',node%s' $(seq 2 "$nodes") ) Default=YES MaxTime=INFINITE State=UP"
}

write_conf() {
    if [ -e "$CONF" ] && ! head -n1 "$CONF" | grep -qF "$MARKER"; then
        die "$CONF exists and was not written by this script"
    fi
    local new
    new="$(render_conf "$1")"
    if [ -e "$CONF" ] && [ "$new" = "$(cat "$CONF")" ]; then return 1; fi
    printf '%s\n' "$new" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    {
        echo "127.0.0.1 localhost"
        echo "$LOGIN_ADDR $(hostname -s) login"
        for k in $(seq "$1"); do echo "$(node_addr "$k") $(node_name "$k")"; done
    } >"$STATE_DIR/hosts"
    say "wrote $CONF"
    return 0
}

configured_nodes() { grep -c '^NodeName=' "$CONF" 2>/dev/null || echo 0; }

# --- network: a bridge on the host, one namespace + veth per node ---

setup_network() {
    local nodes="$1" k ns host_if
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip addr replace "$LOGIN_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for k in $(seq "$nodes"); do
        ns="$(netns "$k")"
        host_if="$(veth "$k")"
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        if ! ip link show "$host_if" >/dev/null 2>&1; then
            ip link add "$host_if" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$host_if" master "$BRIDGE"
        ip link set "$host_if" up
        nsenter --net="/run/netns/$ns" ip addr replace "$(node_addr "$k")/24" dev eth0
        nsenter --net="/run/netns/$ns" ip link set eth0 up
        nsenter --net="/run/netns/$ns" ip link set lo up
    done
}

# --- daemons ---

wait_pid_file() {
    local file="$1" name="$2" pid="" i
    for i in $(seq 100); do
        pid="$(live_pid "$file" "$name")"
        [ -n "$pid" ] && break
        sleep 0.1
    done
    echo "$pid"
}

start_slurmctld() {
    local pid
    pid="$(live_pid "$RUN_DIR/slurmctld.pid" dsc-slurmctld)"
    if [ -n "$pid" ]; then return 0; fi
    ln -sfn "$(sbin slurmctld)" "$BIN_DIR/dsc-slurmctld"
    SLURM_CONF="$CONF" "$BIN_DIR/dsc-slurmctld" -c -i -f "$CONF" || { show_logs; die "slurmctld did not start"; }
    pid="$(wait_pid_file "$RUN_DIR/slurmctld.pid" dsc-slurmctld)"
    [ -n "$pid" ] || { show_logs; die "slurmctld exited right after starting"; }
    say "slurmctld started (pid $pid) on $LOGIN_ADDR:$PORT"
}

start_slurmd() {
    local k="$1" node pid
    node="$(node_name "$k")"
    pid="$(live_pid "$RUN_DIR/slurmd-$node.pid" dsc-slurmd)"
    if [ -n "$pid" ]; then return 0; fi
    install -d -m 0755 "$STATE_DIR/nodes/$node/spool"
    ln -sfn "$(sbin slurmd)" "$BIN_DIR/dsc-slurmd"
    # nsenter --net, not `ip netns exec`: that remounts /sys, and slurmd's cgroup set-up then fails.
    # unshare: the node's own hostname (UTS) and /etc/hosts (a mount namespace; host mounts still propagate in).
    # shellcheck disable=SC2016  # expanded by the inner shell
    SLURM_CONF="$CONF" nsenter --net="/run/netns/$(netns "$k")" -- \
        unshare --uts --mount --propagation slave -- sh -c '
            hostname "$1" && mount --bind "$2" /etc/hosts && exec "$3" -f "$4" -N "$1"' \
        sh "$node" "$STATE_DIR/hosts" "$BIN_DIR/dsc-slurmd" "$CONF" || { show_logs; die "slurmd of $node did not start"; }
    pid="$(wait_pid_file "$RUN_DIR/slurmd-$node.pid" dsc-slurmd)"
    [ -n "$pid" ] || { show_logs; die "slurmd of $node exited right after starting"; }
    say "slurmd of $node started (pid $pid) at $(node_addr "$k")"
}

show_logs() {
    local f
    for f in "$LOG_DIR"/*.log "$MUNGE_DIR/munged.log"; do
        [ -e "$f" ] || continue
        printf '\n===== last lines of %s =====\n' "$f" >&2
        tail -n 30 "$f" >&2
    done
}

sinfo_c() { SLURM_CONF="$CONF" sinfo "$@"; }

wait_idle() {
    local nodes="$1" deadline=$(( SECONDS + START_TIMEOUT_S )) idle states resumed=0
    while [ "$SECONDS" -lt "$deadline" ]; do
        states="$(sinfo_c -h -N -o '%N %T' 2>/dev/null || true)"
        idle="$(echo "$states" | awk '$2 ~ /^(idle|mixed|allocated|completing)/' | wc -l)"
        if [ "$idle" -eq "$nodes" ]; then say "$nodes nodes up: $(echo "$states" | awk '{printf "%s=%s ", $1, $2}')"; return 0; fi
        # A node that was DOWN when the cluster stopped stays DOWN in the saved state.
        if [ "$resumed" -eq 0 ] && echo "$states" | grep -qE ' (down|drain)'; then
            echo "$states" | awk '$2 ~ /^(down|drain)/ {print $1}' | while read -r n; do
                SLURM_CONF="$CONF" scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
            done
            resumed=1
        fi
        sleep 0.2
    done
    sinfo_c -N -l >&2 || true
    show_logs
    die "not all $nodes nodes idle after ${START_TIMEOUT_S}s"
}

# --- down: everything of this cluster, whether or not its pid files survived ---

kill_pid() {
    local pid="$1" i
    [ -d "/proc/$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

# Processes whose network namespace is one of ours (slurmd, slurmstepd, job processes of a crashed run).
netns_pids() { ip netns pids "$1" 2>/dev/null || true; }

cmd_down() {
    need_root down
    local ns pid name
    # slurmctld first, so nothing is rescheduled while the nodes go.
    pid="$(live_pid "$RUN_DIR/slurmctld.pid" dsc-slurmctld)"
    [ -n "$pid" ] && { kill_pid "$pid"; say "stopped slurmctld (pid $pid)"; }
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NAME-node[0-9]+$" || true); do
        # slurmd and every job process inside the node: TERM, then KILL what is left.
        for pid in $(netns_pids "$ns"); do kill -TERM "$pid" 2>/dev/null || true; done
        for _ in $(seq 50); do [ -z "$(netns_pids "$ns")" ] && break; sleep 0.1; done
        for pid in $(netns_pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
        for _ in $(seq 50); do [ -z "$(netns_pids "$ns")" ] && break; sleep 0.1; done
        ip netns delete "$ns"
        say "deleted node namespace $ns"
    done
    # veths whose namespace went (their peer dies with it) and the bridge.
    for name in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$NAME-n[0-9]+$" || true); do
        ip link delete "$name" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; say "deleted bridge $BRIDGE"; fi
    pid="$(live_pid "$RUN_DIR/munged.pid" dsc-munged)"
    [ -n "$pid" ] && { kill_pid "$pid"; say "stopped munged (pid $pid)"; }
    rm -f "$RUN_DIR"/*.pid
    say "down"
}

cmd_up() {
    need_root up
    local nodes="$1" k
    install_packages
    install -d -m 0755 "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$BIN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/nodes"
    local old
    old="$(configured_nodes)"
    if write_conf "$nodes" || [ -z "$(live_pid "$RUN_DIR/slurmctld.pid" dsc-slurmctld)" ]; then
        # A new node count, or a controller that is gone (a crash, a reboot): start from a clean slate.
        if [ "$old" -gt 0 ] || ip link show "$BRIDGE" >/dev/null 2>&1; then cmd_down; fi
    fi
    start_munge
    setup_network "$nodes"
    start_slurmctld
    for k in $(seq "$nodes"); do start_slurmd "$k"; done
    wait_idle "$nodes"
    say "use it with: export SLURM_CONF=$CONF"
}

cmd_status() {
    local name pid k nodes rc=0
    nodes="$(configured_nodes)"
    pid="$(live_pid "$RUN_DIR/munged.pid" dsc-munged)"; echo "munged: ${pid:+running (pid $pid)}${pid:-not running}"
    pid="$(live_pid "$RUN_DIR/slurmctld.pid" dsc-slurmctld)"; echo "slurmctld: ${pid:+running (pid $pid)}${pid:-not running}"
    [ -n "$pid" ] || rc=1
    for k in $(seq "$nodes"); do
        name="$(node_name "$k")"
        pid="$(live_pid "$RUN_DIR/slurmd-$name.pid" dsc-slurmd)"
        echo "slurmd $name ($(node_addr "$k"), namespace $(netns "$k")): ${pid:+running (pid $pid)}${pid:-not running}"
        [ -n "$pid" ] || rc=1
    done
    [ "$rc" -eq 0 ] || return "$rc"
    echo "SLURM_CONF=$CONF"
    sinfo_c -N
    SLURM_CONF="$CONF" squeue
}

usage() { echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
NODES=3
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) [ $# -ge 2 ] || usage; NODES="$2"; shift 2 ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        *) echo "slurm-cluster: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] && [ "$NODES" -le 40 ] || { echo "slurm-cluster: --nodes $NODES: expected 1 to 40" >&2; exit 2; }

case "$cmd" in
    up) cmd_up "$NODES" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage ;;
esac
