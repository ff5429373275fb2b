#!/usr/bin/env bash
# Local MLflow tracking server for the embedded default and the tests: `mlflow server` (uvicorn,
# one worker) on 127.0.0.1 only, runs in a SQLite store, artifacts proxied by the server into the
# local S3 (s3.sh, bucket `geco`) so clients and Ray workers need no S3 credentials.
#
#   infra/local/mlflow.sh start|stop|status|env [--dir DIR] [--port PORT]
#
# DIR defaults to $GECO_STACK_DIR or <repo>/runs/local-stack; PORT to $GECO_MLFLOW_PORT or 5000
# (`env`/`status`/`stop` remember the port of the last start). Artifacts go to
# $GECO_MLFLOW_ARTIFACTS, default s3://geco/mlflow; without the S3 credentials file that s3.sh
# writes (DIR/s3/aws-credentials) the default falls back to the folder DIR/mlflow/artifacts.
# `eval "$(infra/local/mlflow.sh env)"` sets MLFLOW_TRACKING_URI for geco and the mlflow CLI
# (and MLflow's HTTP retry/timeout settings for this stack).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="${GECO_VENV_BIN:-$REPO/.venv/bin}"
PYTHON="${GECO_PYTHON:-$VENV_BIN/python}"
. "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
MLFLOW="${GECO_MLFLOW:-$VENV_BIN/mlflow}"
START_TIMEOUT="${GECO_MLFLOW_START_TIMEOUT:-90}"
STOP_TIMEOUT="${GECO_MLFLOW_STOP_TIMEOUT:-15}"

die() { echo "mlflow.sh: $*" >&2; exit 1; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

CMD="${1:-}"; [ -n "$CMD" ] || usage; shift
DIR="${GECO_STACK_DIR:-$REPO/runs/local-stack}"
PORT_ARG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
        --dir=*) DIR="${1#--dir=}"; shift ;;
        --port) [ $# -ge 2 ] || die "--port needs a value"; PORT_ARG="$2"; shift 2 ;;
        --port=*) PORT_ARG="${1#--port=}"; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1" ;;
    esac
done

case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac  # absolute; only `start` creates it
MLDIR="$DIR/mlflow"
PIDFILE="$MLDIR/server.pid"
LOG="$MLDIR/server.log"
PORTS="$MLDIR/ports.env"
AWS_CREDS="$DIR/s3/aws-credentials"

# The port: --port, else the one the last start used (so env/status/stop find it), else default.
mlflow_port() {
    if [ -n "$PORT_ARG" ]; then echo "$PORT_ARG"
    elif [ -f "$PORTS" ]; then sed -n 's/^MLFLOW_PORT=//p' "$PORTS"
    else echo "${GECO_MLFLOW_PORT:-5000}"
    fi
}

running_pid() { pid_of "$PIDFILE" mlflow; }

healthy() { http_ok "$1" health; }

cmd_start() {
    local pid port
    port="$(mlflow_port)"
    if pid="$(running_pid)"; then
        echo "MLflow already running (pid $pid) at http://127.0.0.1:$port (dir $MLDIR)"
        return 0
    fi
    [ -x "$PYTHON" ] || die "python not found at $PYTHON (run scripts/setup_venv.sh or set GECO_PYTHON)"
    [ -x "$MLFLOW" ] || die "mlflow not found at $MLFLOW: pip install -e '.[orchestration]' into the venv"
    if port_busy "$port"; then
        die "port 127.0.0.1:$port is already in use by another process; choose one with --port"
    fi
    mkdir -p "$MLDIR"

    # Artifacts: the local S3 when s3.sh has made its credentials file, else a local folder.
    # The server gets the S3 endpoint and the *path* of the credentials file, never the secret;
    # ambient AWS keys are dropped so they cannot shadow that file.
    local artifacts="${GECO_MLFLOW_ARTIFACTS:-}" s3env=() line
    if [ -z "$artifacts" ]; then
        artifacts="s3://geco/mlflow"
        if [ ! -f "$AWS_CREDS" ]; then
            artifacts="$MLDIR/artifacts"
            echo "no S3 credentials at $AWS_CREDS (run infra/local/s3.sh start first for S3);"
            echo "  artifacts go to the local folder $artifacts"
        fi
    fi
    case "$artifacts" in
        s3://*)
            if [ -f "$AWS_CREDS" ]; then
                while IFS= read -r line; do
                    s3env+=("${line#export }")
                done < <("$REPO/infra/local/s3.sh" profile-env --dir "$DIR")
                local endpoint
                endpoint="$(printf '%s\n' "${s3env[@]}" | sed -n 's/^AWS_ENDPOINT_URL=//p')"
                s3env+=("MLFLOW_S3_ENDPOINT_URL=$endpoint")
                "$REPO/infra/local/s3.sh" status --dir "$DIR" >/dev/null 2>&1 \
                    || echo "warning: the local S3 server (dir $DIR/s3) is not running: artifact uploads will fail until it is"
            fi ;;
        *://*) ;;
        /*) mkdir -p "$artifacts" ;;
        *) artifacts="$PWD/$artifacts"; mkdir -p "$artifacts" ;;
    esac
    printf 'MLFLOW_PORT=%s\nARTIFACTS=%s\n' "$port" "$artifacts" >"$PORTS"

    local args=(
        server --host 127.0.0.1 --port "$port"
        --backend-store-uri "sqlite:///$MLDIR/mlflow.db"
        --artifacts-destination "$artifacts" --serve-artifacts
        --workers 1
    )
    echo "$MLFLOW ${args[*]}" >"$MLDIR/command.txt"
    # Job execution would spawn a huey consumer next to the server; geco does not use it.
    # New session: the pid is also the process group, so `stop` reaches uvicorn too.
    env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "${s3env[@]}" \
        setsid "$MLFLOW" "${args[@]}" >"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT))
    until healthy "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            die "MLflow exited during start-up; see the log: $LOG"
        fi
        if [ $SECONDS -ge $deadline ]; then
            cmd_stop >/dev/null 2>&1 || true
            die "MLflow did not answer on 127.0.0.1:$port/health within ${START_TIMEOUT}s; see the log: $LOG"
        fi
        sleep 0.5
    done
    echo "MLflow running (pid $pid) at http://127.0.0.1:$port"
    echo "  store: $MLDIR/mlflow.db   artifacts: $artifacts   log: $LOG"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        echo "MLflow not running (dir $MLDIR)"
        return 0
    fi
    # `mlflow server` forwards TERM to uvicorn; signalling the group covers a wedged parent too.
    stop_group "$pid" "$STOP_TIMEOUT"
    rm -f "$PIDFILE"
    echo "MLflow stopped (pid $pid)"
}

cmd_status() {
    local pid port
    port="$(mlflow_port)"
    if pid="$(running_pid)"; then
        echo "MLflow running (pid $pid) at http://127.0.0.1:$port (dir $MLDIR)"
        return 0
    fi
    echo "MLflow not running (dir $MLDIR)"
    return 3
}

cmd_env() {
    echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(mlflow_port)"
    # MLflow's own client settings, for this local stack: retry a failed request once and
    # wait at most 60 s (its defaults, 7 retries with backoff and 120 s, stall a job for
    # minutes when the server is gone). A caller's own values win.
    echo "export MLFLOW_HTTP_REQUEST_MAX_RETRIES=${MLFLOW_HTTP_REQUEST_MAX_RETRIES:-1}"
    echo "export MLFLOW_HTTP_REQUEST_TIMEOUT=${MLFLOW_HTTP_REQUEST_TIMEOUT:-60}"
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) usage ;;
esac
