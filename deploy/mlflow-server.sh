#!/usr/bin/env bash
# An MLflow tracking server for a lab: runs and metrics in PostgreSQL, artifacts uploaded and downloaded
# through the server (clients need no shared file system and no database password).
#
#   deploy/mlflow-server.sh start     start `mlflow server` in the background, wait until /health answers
#   deploy/mlflow-server.sh stop      stop the server this script started (its pid file, whole process group)
#   deploy/mlflow-server.sh status    running or not, /health, the URL for MLFLOW_TRACKING_URI
#
# Settings (environment):
#   DEEPSPORTS_MLFLOW_DIR         pid file, log, default artifact store [/var/tmp/deepsports-mlflow]
#   DEEPSPORTS_MLFLOW_HOST        address to bind [127.0.0.1]; any other (a cluster's login-node address) needs
#                                 authentication: the server then refuses to start without it
#   DEEPSPORTS_MLFLOW_AUTH        basic | none [none on loopback, basic otherwise]: MLflow's basic-auth app
#                                 (`--app-name basic-auth`), users and permissions in its own database
#   DEEPSPORTS_MLFLOW_ADMIN       the admin account's name [admin]
#   DEEPSPORTS_MLFLOW_ADMIN_PASSWORD_FILE  0600 file holding its password [$DEEPSPORTS_MLFLOW_DIR/admin-password,
#                                 48 random hex digits written on first start]
#   DEEPSPORTS_MLFLOW_USERS_FILE  0600 file of `user:password` lines: accounts created (or their passwords set)
#                                 on each start, through the server's REST API as the admin
#   DEEPSPORTS_MLFLOW_DEFAULT_PERMISSION  what a user may do on others' experiments [READ]; NO_PERMISSIONS hides them
#   DEEPSPORTS_MLFLOW_AUTH_DB_URI the users/permissions database [sqlite:///$DEEPSPORTS_MLFLOW_DIR/basic_auth.db]
#   DEEPSPORTS_MLFLOW_AUTH_CACHE_S seconds a worker caches a verified password [60]; 0 checks the PBKDF2 hash on
#                                 every request (a loaded 2-core login node then answers a 4-task study minutes late;
#                                 a changed password or deleted user may still pass on another worker this long)
#   DEEPSPORTS_MLFLOW_PORT        [5000]
#   DEEPSPORTS_MLFLOW_WORKERS     uvicorn worker processes [4]
#   DEEPSPORTS_MLFLOW_BACKEND_URI backend store; default: the `mlflow` database of deploy/postgres-local.sh
#                                 (same DEEPSPORTS_PG_* settings), its password read by libpq from the
#                                 0600 file PGPASSFILE=$DEEPSPORTS_PG_DIR/pgpass, so it is in no URL
#   DEEPSPORTS_MLFLOW_ARTIFACTS   --artifacts-destination: a directory or s3://, gs://, ... [$DEEPSPORTS_MLFLOW_DIR/artifacts]
#   DEEPSPORTS_MLFLOW_ARGS        more `mlflow server` options, e.g. "--app-name basic-auth --allowed-hosts mlflow.lab.org"
#   DEEPSPORTS_MLFLOW_BIN         the mlflow program [<repo>/.venv/bin/mlflow, else mlflow on PATH]
#   DEEPSPORTS_MLFLOW_START_TIMEOUT  seconds to wait for /health [120]
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (8 huey consumer processes) [false here:
#                                 DeepSports uses none of its jobs; MLflow's own default is true]
#
# The backend URI is handed to the server in its environment (MLFLOW_BACKEND_STORE_URI), never on the
# command line, where every local user could read it in `ps`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${DEEPSPORTS_MLFLOW_DIR:-/var/tmp/deepsports-mlflow}"
HOST="${DEEPSPORTS_MLFLOW_HOST:-127.0.0.1}"
PORT="${DEEPSPORTS_MLFLOW_PORT:-5000}"
WORKERS="${DEEPSPORTS_MLFLOW_WORKERS:-4}"
ARTIFACTS="${DEEPSPORTS_MLFLOW_ARTIFACTS:-$STATE_DIR/artifacts}"
PID_FILE="$STATE_DIR/mlflow-server.pid"
LOG_FILE="$STATE_DIR/mlflow-server.log"
START_TIMEOUT_S="${DEEPSPORTS_MLFLOW_START_TIMEOUT:-120}"

say() { printf 'mlflow-server: %s\n' "$*"; }
die() { printf 'mlflow-server: error: %s\n' "$*" >&2; exit 1; }

case "$PORT" in ''|*[!0-9]*) die "DEEPSPORTS_MLFLOW_PORT=$PORT: expected a port number" ;; esac
case "$WORKERS" in ''|*[!0-9]*) die "DEEPSPORTS_MLFLOW_WORKERS=$WORKERS: expected a number of processes" ;; esac

AUTH="${DEEPSPORTS_MLFLOW_AUTH:-}"
ADMIN="${DEEPSPORTS_MLFLOW_ADMIN:-admin}"
ADMIN_PASSWORD_FILE="${DEEPSPORTS_MLFLOW_ADMIN_PASSWORD_FILE:-$STATE_DIR/admin-password}"
USERS_FILE="${DEEPSPORTS_MLFLOW_USERS_FILE:-}"
DEFAULT_PERMISSION="${DEEPSPORTS_MLFLOW_DEFAULT_PERMISSION:-READ}"
AUTH_DB_URI="${DEEPSPORTS_MLFLOW_AUTH_DB_URI:-sqlite:///$STATE_DIR/basic_auth.db}"
AUTH_CACHE_S="${DEEPSPORTS_MLFLOW_AUTH_CACHE_S:-60}"
case "$AUTH_CACHE_S" in ''|*[!0-9]*) die "DEEPSPORTS_MLFLOW_AUTH_CACHE_S=$AUTH_CACHE_S: expected seconds" ;; esac
case "$HOST" in 127.*|localhost|::1) LOOPBACK=1 ;; *) LOOPBACK=0 ;; esac
case " ${DEEPSPORTS_MLFLOW_ARGS:-} " in *" --app-name basic-auth "*|*" --app-name=basic-auth "*) [ -n "$AUTH" ] || AUTH=basic ;; esac
if [ -z "$AUTH" ]; then if [ "$LOOPBACK" -eq 1 ]; then AUTH=none; else AUTH=basic; fi; fi
case "$AUTH" in basic|none) ;; *) die "DEEPSPORTS_MLFLOW_AUTH=$AUTH: expected basic or none" ;; esac
case "$DEFAULT_PERMISSION" in READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
    *) die "DEEPSPORTS_MLFLOW_DEFAULT_PERMISSION=$DEFAULT_PERMISSION: expected READ, EDIT, MANAGE or NO_PERMISSIONS" ;; esac

# user:password@ -> user:***@, as deepsports.tracking_store.redact_uri does.
redact() { sed -E 's#(://[^:/@[:space:]]*):[^/@[:space:]]*@#\1:***@#g'; }

mlflow_bin() {
    if [ -n "${DEEPSPORTS_MLFLOW_BIN:-}" ]; then echo "$DEEPSPORTS_MLFLOW_BIN"; return 0; fi
    if [ -x "$HERE/../.venv/bin/mlflow" ]; then echo "$HERE/../.venv/bin/mlflow"; return 0; fi
    command -v mlflow 2>/dev/null || die "mlflow not found: make install, or set DEEPSPORTS_MLFLOW_BIN"
}

# The pid in our pid file if that process is alive (not a zombie) and is an mlflow server, else empty.
our_pid() {
    [ -s "$PID_FILE" ] || return 0
    local pid stat
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [ -n "$pid" ] || return 0
    stat="$(cat "/proc/$pid/stat" 2>/dev/null || true)"
    [ -n "$stat" ] && [ "$(echo "${stat##*) }" | cut -c1)" != Z ] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'mlflow server' && echo "$pid"
    return 0
}

# HTTP status of GET /health ('' when nothing answers); bash's /dev/tcp, so no curl is needed.
health() {
    local addr="$HOST"
    [ "$addr" = 0.0.0.0 ] && addr=127.0.0.1
    # shellcheck disable=SC2016  # the inner script expands its own $0 $1
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET /health HTTP/1.0\r\nHost: %s:%s\r\n\r\n" "$0" "$1" >&3
        head -n1 <&3 | cut -d" " -f2' "$addr" "$PORT" 2>/dev/null || true
}

# Sets BACKEND_URI (and PGPASSFILE for the default PostgreSQL store); no subshell, so the export holds.
resolve_backend() {
    if [ -n "${DEEPSPORTS_MLFLOW_BACKEND_URI:-}" ]; then BACKEND_URI="$DEEPSPORTS_MLFLOW_BACKEND_URI"; return 0; fi
    local pg_dir="${DEEPSPORTS_PG_DIR:-/var/tmp/deepsports-pg}"
    [ -r "$pg_dir/pgpass" ] ||
        die "no DEEPSPORTS_MLFLOW_BACKEND_URI and no $pg_dir/pgpass: run deploy/postgres-local.sh start first (same DEEPSPORTS_PG_* settings)"
    export PGPASSFILE="$pg_dir/pgpass"
    BACKEND_URI="$("$HERE/postgres-local.sh" url mlflow --no-password)"
}

show_log() {
    [ -e "$LOG_FILE" ] || return 0
    printf '\n===== last lines of %s =====\n' "$LOG_FILE" >&2
    tail -n 40 "$LOG_FILE" | redact >&2
}

# A secret file: it must exist, be a regular file and be readable by its owner only.
check_secret_file() {
    local what="$1" file="$2" mode
    [ -f "$file" ] || die "$what=$file: no such file"
    mode="$(stat -c %a "$file")"
    case "$mode" in 600|400) ;; *) die "$what=$file: mode $mode; allowed: 600 or 400 (readable by its owner only)" ;; esac
}

# Sets AUTH_ARGS and exports the basic-auth app's settings into this shell (the server's environment only).
prepare_auth() {
    AUTH_ARGS=""
    [ "$AUTH" = none ] && return 0
    if [ ! -e "$ADMIN_PASSWORD_FILE" ] && [ -z "${DEEPSPORTS_MLFLOW_ADMIN_PASSWORD_FILE:-}" ]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ADMIN_PASSWORD_FILE")
        say "wrote a new admin password to $ADMIN_PASSWORD_FILE"
    fi
    check_secret_file DEEPSPORTS_MLFLOW_ADMIN_PASSWORD_FILE "$ADMIN_PASSWORD_FILE"
    [ -s "$ADMIN_PASSWORD_FILE" ] || die "DEEPSPORTS_MLFLOW_ADMIN_PASSWORD_FILE=$ADMIN_PASSWORD_FILE is empty"
    [ -z "$USERS_FILE" ] || check_secret_file DEEPSPORTS_MLFLOW_USERS_FILE "$USERS_FILE"
    # The app's config holds no password (that goes into the server's environment, from the 0600 file).
    (umask 077 && printf '%s\n' "[mlflow]" "default_permission = $DEFAULT_PERMISSION" "database_uri = $AUTH_DB_URI" \
        "admin_username = $ADMIN" "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" \
        "grant_default_workspace_access = false" "auth_cache_ttl_seconds = $AUTH_CACHE_S" >"$STATE_DIR/basic_auth.ini")
    export MLFLOW_AUTH_CONFIG_PATH="$STATE_DIR/basic_auth.ini"
    MLFLOW_AUTH_ADMIN_PASSWORD="$(tr -d '\n' <"$ADMIN_PASSWORD_FILE")"
    export MLFLOW_AUTH_ADMIN_PASSWORD
    # The app's CSRF protection needs a key all workers share (a fresh one would log every user out).
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
        [ -s "$STATE_DIR/flask-secret-key" ] ||
            (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE_DIR/flask-secret-key")
        MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE_DIR/flask-secret-key")"
        export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    case " ${DEEPSPORTS_MLFLOW_ARGS:-} " in *" --app-name"*) ;; *) AUTH_ARGS="--app-name basic-auth" ;; esac
}

# Create the accounts of DEEPSPORTS_MLFLOW_USERS_FILE (or set their passwords) as the admin, through the
# REST API. Python reads both files itself: no password is on a command line.
sync_users() {
    [ "$AUTH" = basic ] && [ -n "$USERS_FILE" ] || return 0
    local python
    python="$(dirname "$(readlink -f "$(mlflow_bin)")")/python"
    [ -x "$python" ] || python=python3
    "$python" - "http://$HOST:$PORT" "$ADMIN" "$ADMIN_PASSWORD_FILE" "$USERS_FILE" <<'PY' || die "creating the users of $USERS_FILE failed"
import sys, requests
url, admin, admin_file, users_file = sys.argv[1:]
auth = (admin, open(admin_file).read().strip())
names = []
for number, line in enumerate(open(users_file), 1):
    line = line.rstrip("\n")
    if not line.strip() or line.lstrip().startswith("#"):
        continue
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        sys.exit(f"mlflow-server: error: {users_file} line {number}: expected user:password")
    r = requests.get(f"{url}/api/2.0/mlflow/users/get", params={"username": user}, auth=auth, timeout=30)
    if r.status_code == 200:
        r = requests.patch(f"{url}/api/2.0/mlflow/users/update-password", json={"username": user, "password": password},
                           auth=auth, timeout=30)
    else:
        r = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                          auth=auth, timeout=30)
    if r.status_code != 200:
        sys.exit(f"mlflow-server: error: user {user}: HTTP {r.status_code} {r.text[:200]}")
    names.append(user)
print(f"mlflow-server: users: {', '.join(names) or 'none'}")
PY
}

cmd_start() {
    if [ "$AUTH" = none ] && [ "$LOOPBACK" -eq 0 ]; then
        die "refusing to listen on $HOST without authentication (DEEPSPORTS_MLFLOW_AUTH=none): anyone who reaches the port could read, write and delete runs; use DEEPSPORTS_MLFLOW_AUTH=basic (the default beyond loopback)"
    fi
    local pid
    pid="$(our_pid)"
    if [ -n "$pid" ]; then
        say "already running (pid $pid): MLFLOW_TRACKING_URI=http://$HOST:$PORT"
        return 0
    fi
    [ -z "$(health)" ] || die "something already answers on $HOST:$PORT (not started by this script): stop it or choose DEEPSPORTS_MLFLOW_PORT"
    local bin
    bin="$(mlflow_bin)"
    resolve_backend
    (umask 077 && mkdir -p "$STATE_DIR")
    prepare_auth
    case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS"; ARTIFACTS="$(cd "$ARTIFACTS" && pwd)" ;; esac
    # A new process group (setsid), so stop ends the uvicorn workers with their parent. Artifacts are
    # proxied: new experiments get mlflow-artifacts:/ locations that clients reach through this server.
    # shellcheck disable=SC2086  # DEEPSPORTS_MLFLOW_ARGS is a list of options
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    MLFLOW_BACKEND_STORE_URI="$BACKEND_URI" setsid "$bin" server \
        --serve-artifacts --artifacts-destination "$ARTIFACTS" \
        --host "$HOST" --port "$PORT" --workers "$WORKERS" ${AUTH_ARGS} ${DEEPSPORTS_MLFLOW_ARGS:-} \
        </dev/null >>"$LOG_FILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PID_FILE"
    say "starting (pid $pid), backend $(echo "$BACKEND_URI" | redact), artifacts $ARTIFACTS, log $LOG_FILE"
    local deadline=$(( SECONDS + START_TIMEOUT_S ))
    while [ "$SECONDS" -lt "$deadline" ]; do
        [ "$(health)" = 200 ] && break
        if [ -z "$(our_pid)" ]; then
            rm -f "$PID_FILE"
            show_log
            die "mlflow server exited while starting"
        fi
        sleep 0.5
    done
    [ "$(health)" = 200 ] || { show_log; cmd_stop; die "no answer from http://$HOST:$PORT/health after ${START_TIMEOUT_S}s"; }
    sync_users
    say "ready: MLFLOW_TRACKING_URI=http://$HOST:$PORT (authentication: $AUTH${AUTH_ARGS:+, admin $ADMIN, password in $ADMIN_PASSWORD_FILE})"
}

cmd_stop() {
    local pid
    pid="$(our_pid)"
    if [ -z "$pid" ]; then
        rm -f "$PID_FILE"
        say "not running (nothing started by this script)"
        return 0
    fi
    # The server leads its own process group (setsid): signal the group, workers included.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do [ -n "$(our_pid)" ] || break; sleep 0.1; done
    if [ -n "$(our_pid)" ]; then
        say "pid $pid ignored SIGTERM for 15 s: sending SIGKILL to its process group"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    say "stopped (pid $pid)"
}

cmd_status() {
    local pid code
    pid="$(our_pid)"
    code="$(health)"
    if [ -z "$pid" ]; then
        say "not running (no live pid in $PID_FILE)${code:+; but something answers on $HOST:$PORT (HTTP $code)}"
        return 1
    fi
    say "running (pid $pid): MLFLOW_TRACKING_URI=http://$HOST:$PORT, /health: ${code:-no answer}, log $LOG_FILE"
    [ "$code" = 200 ]
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
