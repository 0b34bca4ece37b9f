#!/usr/bin/env bash
# A PostgreSQL server for a lab's MLflow tracking server and Optuna studies, on this machine.
#
#   deploy/postgres-local.sh start     install Debian's postgresql if missing (root), initialise a cluster in
#                                      $DEEPSPORTS_PG_DIR, start it on 127.0.0.1:$DEEPSPORTS_PG_PORT, create the
#                                      role and the databases `mlflow` and `optuna`, print their URLs (redacted)
#   deploy/postgres-local.sh stop      stop the server this script started (its pid file); anything else is left alone
#   deploy/postgres-local.sh status    running or not, the URLs (redacted); exit 0 only when it accepts connections
#   deploy/postgres-local.sh install   only install the packages (root; apt-get)
#   deploy/postgres-local.sh url DB    print the full URL of database DB, password included (for scripts, not logs)
#   deploy/postgres-local.sh url DB --no-password
#                                      the URL without the password, for clients given PGPASSFILE=$DEEPSPORTS_PG_DIR/pgpass
#
# Settings (environment):
#   DEEPSPORTS_PG_DIR       state: data/, run/ (socket), log/, pid file, password file [/var/tmp/deepsports-pg]
#   DEEPSPORTS_PG_PORT      TCP port on 127.0.0.1 [5433; Debian's own cluster usually holds 5432]
#   DEEPSPORTS_PG_HOST      an address to listen on besides 127.0.0.1, e.g. a cluster's login-node address;
#                           the URLs name it [127.0.0.1]
#   DEEPSPORTS_PG_ALLOW     the network whose clients may log in over it, with the password [<host>/24]
#   DEEPSPORTS_PG_USER      login role that owns both databases [deepsports]
#   DEEPSPORTS_PG_PASSWORD  its password; when unset one is generated once into $DEEPSPORTS_PG_DIR/password (0600)
#   DEEPSPORTS_PG_BINDIR    directory holding initdb/pg_ctl/postgres [newest /usr/lib/postgresql/*/bin]
#
# Run as root, the server runs as the OS user `postgres` (PostgreSQL refuses to run as root); run as
# another user, it runs as that user (then the packages must already be installed). The server only
# listens on 127.0.0.1 and on a Unix socket in run/ that only its owner may open; TCP logins need the
# password (scram-sha-256). The password is never printed by start/status and never put on a command line.
set -euo pipefail

STATE_DIR="${DEEPSPORTS_PG_DIR:-/var/tmp/deepsports-pg}"
PORT="${DEEPSPORTS_PG_PORT:-5433}"
HOST="${DEEPSPORTS_PG_HOST:-127.0.0.1}"
ROLE="${DEEPSPORTS_PG_USER:-deepsports}"
DATABASES=(mlflow optuna)
DATA_DIR="$STATE_DIR/data"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/log"
LOG_FILE="$LOG_DIR/postgres.log"
PID_FILE="$STATE_DIR/postgres.pid"
PASSWORD_FILE="$STATE_DIR/password"
PGPASS_FILE="$STATE_DIR/pgpass"
START_TIMEOUT_S="${DEEPSPORTS_PG_START_TIMEOUT:-60}"

say() { printf 'postgres-local: %s\n' "$*"; }
die() { printf 'postgres-local: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=deploy/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

case "$PORT" in ''|*[!0-9]*) die "DEEPSPORTS_PG_PORT=$PORT: expected a port number" ;; esac
[[ "$ROLE" =~ ^[a-z_][a-z0-9_]*$ ]] || die "DEEPSPORTS_PG_USER=$ROLE: expected a lower-case SQL identifier ([a-z_][a-z0-9_]*)"
case "$STATE_DIR" in /*) ;; *) die "DEEPSPORTS_PG_DIR=$STATE_DIR: expected an absolute path" ;; esac
[[ "$HOST" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "DEEPSPORTS_PG_HOST=$HOST: expected an IPv4 address"
ALLOW="${DEEPSPORTS_PG_ALLOW:-${HOST%.*}.0/24}"
[[ "$ALLOW" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] || die "DEEPSPORTS_PG_ALLOW=$ALLOW: expected an IPv4 network, e.g. 10.77.0.0/24"

# --- who runs the server, and where its programs are ---

if [ "$(id -u)" -eq 0 ]; then DB_USER=postgres; else DB_USER="$(id -un)"; fi

as_db_user() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u "$DB_USER" -- "$@"; else "$@"; fi
}

find_bindir() {
    if [ -n "${DEEPSPORTS_PG_BINDIR:-}" ]; then echo "$DEEPSPORTS_PG_BINDIR"; return 0; fi
    local dir
    dir="$(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -V | tail -n1 || true)"
    if [ -n "$dir" ] && [ -x "$dir/postgres" ]; then echo "$dir"; return 0; fi
    dir="$(command -v postgres 2>/dev/null || true)"
    [ -n "$dir" ] && dirname "$dir"
    return 0
}

install_packages() {
    local bindir
    bindir="$(find_bindir)"
    if [ -n "$bindir" ] && [ -x "$bindir/initdb" ] && [ -x "$bindir/pg_ctl" ] && command -v psql >/dev/null 2>&1; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed: run '$0 install' as root (or apt-get install postgresql)"
    apt_install postgresql
    bindir="$(find_bindir)"
    [ -n "$bindir" ] && [ -x "$bindir/initdb" ] || die "postgresql installed but no initdb in ${bindir:-/usr/lib/postgresql/*/bin} (check DEEPSPORTS_PG_BINDIR)"
}

# --- pid file: the postmaster this script started ---

# Whether pid is a live (not zombie) process named postgres.
is_postgres() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null || true)"
    [ -n "$stat" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = postgres ] && [ "$(echo "${stat##*) }" | cut -c1)" != Z ]
}

# The pid in our pid file if that process is a live postgres postmaster, else empty.
our_pid() {
    [ -s "$PID_FILE" ] || return 0
    local pid
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [ -n "$pid" ] && is_postgres "$pid" && echo "$pid"
    return 0
}

# A running server keeps its port (line 4 of postmaster.pid) whatever DEEPSPORTS_PG_PORT says now.
adopt_running_port() {
    local running
    running="$(sed -n 4p "$DATA_DIR/postmaster.pid" 2>/dev/null | tr -dc '0-9')"
    [ -n "$running" ] || return 0
    if [ "$running" != "$PORT" ] && [ -n "${DEEPSPORTS_PG_PORT:-}" ]; then
        say "note: the server runs on port $running, not DEEPSPORTS_PG_PORT=$PORT (stop it to change the port)" >&2
    fi
    PORT="$running"
}

accepting() { as_db_user "$BINDIR/pg_isready" -q -h "$RUN_DIR" -p "$PORT" -d postgres >/dev/null 2>&1; }

show_log() {
    [ -e "$LOG_FILE" ] || return 0
    printf '\n===== last lines of %s =====\n' "$LOG_FILE" >&2
    tail -n 30 "$LOG_FILE" >&2
}

# --- the password: from the environment, else generated once into a 0600 file ---

password() {
    if [ -n "${DEEPSPORTS_PG_PASSWORD:-}" ]; then printf '%s' "$DEEPSPORTS_PG_PASSWORD"; return 0; fi
    if [ ! -s "$PASSWORD_FILE" ]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$PASSWORD_FILE.tmp")
        mv "$PASSWORD_FILE.tmp" "$PASSWORD_FILE"
    fi
    tr -d '\n' <"$PASSWORD_FILE"
}

# A libpq password file, so the MLflow server (deploy/mlflow-server.sh) and psql connect with URLs that
# hold no password: PGPASSFILE=<this file>. Fields escape ':' and '\' with a backslash.
write_pgpass() {
    local escaped
    escaped="$(password | sed -e 's/\\/\\\\/g' -e 's/:/\\:/g')"
    (umask 077 && printf '%s:%s:*:%s:%s\n' "$HOST" "$PORT" "$ROLE" "$escaped" >"$PGPASS_FILE.tmp")
    mv "$PGPASS_FILE.tmp" "$PGPASS_FILE"
}

url() { printf 'postgresql://%s:%s@%s:%s/%s' "$ROLE" "$2" "$HOST" "$PORT" "$1"; }

print_urls() {
    local db
    for db in "${DATABASES[@]}"; do say "  $db: $(url "$db" '***')"; done
    local source="the file $PASSWORD_FILE"
    [ -n "${DEEPSPORTS_PG_PASSWORD:-}" ] && source="\$DEEPSPORTS_PG_PASSWORD"
    say "password: from $source; for libpq clients PGPASSFILE=$PGPASS_FILE; full URL: $0 url DB"
}

# --- start ---

init_cluster() {
    install -d -m 0700 "$STATE_DIR"
    chown "$DB_USER" "$STATE_DIR"
    as_db_user test -w "$STATE_DIR" ||
        die "$DB_USER cannot write $STATE_DIR (a parent directory closes it off): choose DEEPSPORTS_PG_DIR elsewhere, e.g. under /var/tmp"
    as_db_user install -d -m 0700 "$RUN_DIR" "$LOG_DIR"
    [ -s "$DATA_DIR/PG_VERSION" ] && return 0
    say "initialising a cluster in $DATA_DIR"
    rm -rf "$DATA_DIR"  # a half-initialised directory from an interrupted initdb
    # The superuser logs in over the owner-only socket by peer authentication; TCP needs a password.
    as_db_user "$BINDIR/initdb" -D "$DATA_DIR" --auth-local=peer --auth-host=scram-sha-256 -E UTF8 \
        --locale=C.UTF-8 >"$LOG_DIR/initdb.log" 2>&1 ||
        { tail -n 20 "$LOG_DIR/initdb.log" >&2; die "initdb failed (log: $LOG_DIR/initdb.log)"; }
    printf "\ninclude_if_exists = 'deepsports.conf'\n" | as_db_user tee -a "$DATA_DIR/postgresql.conf" >/dev/null
}

write_server_conf() {
    # Rewritten on each start so a changed port takes effect; included last by postgresql.conf.
    as_db_user tee "$DATA_DIR/deepsports.conf" >/dev/null <<EOF
# Written by deploy/postgres-local.sh on each start.
listen_addresses = '$(if [ "$HOST" = 127.0.0.1 ]; then echo 127.0.0.1; else echo "127.0.0.1,$HOST"; fi)'
port = $PORT
unix_socket_directories = '$RUN_DIR'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
# The MLflow server's workers and every Optuna worker keep a connection pool each.
max_connections = 200
# Statements are not logged: ALTER ROLE ... PASSWORD must not reach the log.
log_statement = 'none'
EOF
    # Password logins from the cluster's network (initdb's pg_hba.conf allows 127.0.0.1 and ::1 only).
    local hba="$DATA_DIR/pg_hba.conf" marker="# added by postgres-local.sh for DEEPSPORTS_PG_ALLOW"
    as_db_user sed -i "/$marker/d" "$hba"
    if [ "$HOST" != 127.0.0.1 ]; then
        printf 'host all all %s scram-sha-256 %s\n' "$ALLOW" "$marker" | as_db_user tee -a "$hba" >/dev/null
    fi
}

setup_databases() {
    local secret
    secret="$(password | sed "s/'/''/g")"
    # Through stdin, so the password is on no command line; psql stops at the first error.
    {
        printf 'SET log_statement = none;\n'
        printf "SELECT 'CREATE ROLE %s LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '%s') \\\\gexec\n" \
            "$ROLE" "$ROLE"
        printf "ALTER ROLE %s WITH LOGIN PASSWORD '%s';\n" "$ROLE" "$secret"
        for db in "${DATABASES[@]}"; do
            printf "SELECT 'CREATE DATABASE %s OWNER %s' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '%s') \\\\gexec\n" \
                "$db" "$ROLE" "$db"
        done
    } | as_db_user psql -X -q -v ON_ERROR_STOP=1 -h "$RUN_DIR" -p "$PORT" -d postgres >/dev/null ||
        die "creating role $ROLE and databases ${DATABASES[*]} failed (log: $LOG_FILE)"
    write_pgpass
}

cmd_start() {
    install_packages
    BINDIR="$(find_bindir)"
    init_cluster
    local pid
    pid="$(our_pid)"
    if [ -n "$pid" ]; then
        adopt_running_port
        say "already running (pid $pid, started by this script) on $HOST:$PORT"
    else
        if [ -s "$DATA_DIR/postmaster.pid" ] && as_db_user "$BINDIR/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1; then
            die "a postgres not started by this script runs on $DATA_DIR: stop it first"
        fi
        write_server_conf
        as_db_user "$BINDIR/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -w -t "$START_TIMEOUT_S" start >/dev/null ||
            { show_log; die "postgres did not start on $HOST:$PORT (is the port taken?)"; }
        head -n1 "$DATA_DIR/postmaster.pid" >"$PID_FILE"
        pid="$(our_pid)"
        [ -n "$pid" ] || { show_log; die "postgres exited right after starting"; }
        say "started (pid $pid) on $HOST:$PORT, data in $DATA_DIR, log $LOG_FILE"
    fi
    local i
    for i in $(seq "$START_TIMEOUT_S"); do accepting && break; sleep 1; done
    accepting || { show_log; die "postgres does not accept connections on $RUN_DIR port $PORT"; }
    setup_databases
    say "databases (role $ROLE):"
    print_urls
}

cmd_stop() {
    local pid
    pid="$(our_pid)"
    if [ -z "$pid" ]; then
        rm -f "$PID_FILE"
        say "not running (nothing started by this script)"
        return 0
    fi
    BINDIR="$(find_bindir)"
    # Fast shutdown: open transactions roll back, clients are disconnected, data is flushed.
    as_db_user "$BINDIR/pg_ctl" -D "$DATA_DIR" -m fast -w -t 60 stop >/dev/null 2>&1 ||
        { say "pg_ctl stop failed; sending SIGTERM to pid $pid"; kill -TERM "$pid" 2>/dev/null || true; }
    # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
    for _ in $(seq 100); do is_postgres "$pid" || break; sleep 0.1; done
    is_postgres "$pid" && die "postgres (pid $pid) is still running"
    rm -f "$PID_FILE"
    say "stopped (pid $pid)"
}

cmd_status() {
    local pid
    pid="$(our_pid)"
    if [ -z "$pid" ]; then say "not running (no live pid in $PID_FILE)"; return 1; fi
    BINDIR="$(find_bindir)"
    adopt_running_port
    if accepting; then
        say "running (pid $pid) on $HOST:$PORT, accepting connections"
        print_urls
        return 0
    fi
    say "running (pid $pid) on $HOST:$PORT but not accepting connections (log: $LOG_FILE)"
    return 1
}

cmd_url() {
    local db="${1:-}" option="${2:-}"
    [[ " ${DATABASES[*]} " == *" $db "* ]] || die "url: expected one of: ${DATABASES[*]}"
    [ -z "$option" ] || [ "$option" = --no-password ] || die "url: unknown option '$option' (expected --no-password)"
    [ -n "$(our_pid)" ] && adopt_running_port
    if [ "$option" = --no-password ]; then
        printf 'postgresql://%s@%s:%s/%s\n' "$ROLE" "$HOST" "$PORT" "$db"
        return 0
    fi
    # Percent-encode what a URL's userinfo cannot hold as is (byte by byte).
    local secret="" raw c hex i LC_ALL=C
    raw="$(password)"
    for ((i = 0; i < ${#raw}; i++)); do
        c="${raw:i:1}"
        case "$c" in
            [A-Za-z0-9._~-]) secret+="$c" ;;
            *) printf -v hex '%%%02X' "'$c"; secret+="$hex" ;;
        esac
    done
    url "$db" "$secret"
    echo
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    install) install_packages; say "PostgreSQL programs in $(find_bindir)" ;;
    url) cmd_url "${2:-}" "${3:-}" ;;
    *) echo "usage: $0 start|stop|status|install|url DB [--no-password]" >&2; exit 2 ;;
esac
