#!/usr/bin/env bash
# Serve a registered geco retriever over REST on 127.0.0.1 with MLflow's scoring server
# (`mlflow models serve`, env manager "local": the repository's venv), and print a ready curl.
#
#   infra/local/serve.sh start|stop|status|request [--model URI] [--port PORT] [--dir DIR]
#                                                  [--image TOP.jpg] [--k K]
#
# MODEL defaults to models:/geco-retriever@champion in the local MLflow server (mlflow.sh);
# PORT to $GECO_SERVE_PORT or 5080; DIR to $GECO_STACK_DIR or <repo>/runs/local-stack.
# `start` returns once the server answers /ping and prints its URL and a curl that POSTs
# `request.json`: the top TOP.jpg (default: the first test top of data/synthetic) as base64
# in MLflow's dataframe_split format. `request` only writes that file and prints the curl.
# A catalogue other than the one logged with the model: GECO_CATALOGUE=PATH_OR_S3_URI.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="${GECO_VENV_BIN:-$REPO/.venv/bin}"
PYTHON="${GECO_PYTHON:-$VENV_BIN/python}"
. "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
START_TIMEOUT="${GECO_SERVE_START_TIMEOUT:-300}"
STOP_TIMEOUT="${GECO_SERVE_STOP_TIMEOUT:-15}"

die() { echo "serve.sh: $*" >&2; exit 1; }
usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

CMD="${1:-}"; [ -n "$CMD" ] || usage; shift
DIR="${GECO_STACK_DIR:-$REPO/runs/local-stack}"
MODEL="models:/geco-retriever@champion"
PORT_ARG="" IMAGE="" K=5
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
        --model) [ $# -ge 2 ] || die "--model needs a value"; MODEL="$2"; shift 2 ;;
        --port) [ $# -ge 2 ] || die "--port needs a value"; PORT_ARG="$2"; shift 2 ;;
        --image) [ $# -ge 2 ] || die "--image needs a value"; IMAGE="$2"; shift 2 ;;
        --k) [ $# -ge 2 ] || die "--k needs a value"; K="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1" ;;
    esac
done
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
SDIR="$DIR/serve"
PIDFILE="$SDIR/server.pid"
LOG="$SDIR/server.log"
PORTS="$SDIR/ports.env"
REQUEST="$SDIR/request.json"

serve_port() {
    if [ -n "$PORT_ARG" ]; then echo "$PORT_ARG"
    elif [ -f "$PORTS" ]; then sed -n 's/^SERVE_PORT=//p' "$PORTS"
    else echo "${GECO_SERVE_PORT:-5080}"
    fi
}

running_pid() { pid_of "$PIDFILE" mlflow; }

pinged() { http_ok "$1" ping; }

# The request body for one top, and the curl that sends it.
cmd_request() {
    local port image="$IMAGE"
    port="$(serve_port)"
    if [ -z "$image" ]; then
        local csv="$REPO/data/synthetic/files/test.csv"
        [ -f "$csv" ] || die "no --image given and no $csv (run make demo first)"
        image="$REPO/data/synthetic/img/$(sed -n '2p' "$csv" | cut -d, -f1).jpg"
    fi
    [ -f "$image" ] || die "image not found: $image"
    mkdir -p "$SDIR"
    "$PYTHON" - "$image" "$K" "$REQUEST" <<'EOF'
import base64, json, sys
image, k, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = base64.b64encode(open(image, "rb").read()).decode("ascii")
json.dump({"dataframe_split": {"columns": ["image"], "data": [[data]]}, "params": {"k": k}},
          open(out, "w"))
EOF
    echo "request for $image: $REQUEST"
    echo "  curl -s -H 'Content-Type: application/json' --data @$REQUEST http://127.0.0.1:$port/invocations"
}

cmd_start() {
    local pid port
    port="$(serve_port)"
    if pid="$(running_pid)"; then
        echo "geco retriever already served (pid $pid) at http://127.0.0.1:$port (log $LOG)"
        cmd_request
        return 0
    fi
    [ -x "$VENV_BIN/mlflow" ] || die "mlflow not found in $VENV_BIN (run scripts/setup_venv.sh)"
    if port_busy "$port"; then
        die "port 127.0.0.1:$port is already in use by another process; choose one with --port"
    fi
    local uri="${MLFLOW_TRACKING_URI:-}"
    if [ -z "$uri" ]; then
        "$REPO/infra/local/mlflow.sh" status --dir "$DIR" >/dev/null \
            || die "the local MLflow server is not running (run make demo, or set MLFLOW_TRACKING_URI)"
        uri="$("$REPO/infra/local/mlflow.sh" env --dir "$DIR" | sed 's/^export MLFLOW_TRACKING_URI=//')"
    fi
    mkdir -p "$SDIR"
    printf 'SERVE_PORT=%s\nMODEL=%s\n' "$port" "$MODEL" >"$PORTS"
    # The scoring server runs `uvicorn` from PATH: the venv's bin goes first. A new session,
    # so `stop` reaches uvicorn's workers through the process group.
    env PATH="$VENV_BIN:$PATH" MLFLOW_TRACKING_URI="$uri" \
        setsid "$VENV_BIN/mlflow" models serve -m "$MODEL" --env-manager local \
        --host 127.0.0.1 --port "$port" >"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT))
    until pinged "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 5 "$LOG" >&2 || true
            die "the server exited during start-up (model $MODEL from $uri); see the log: $LOG"
        fi
        if [ $SECONDS -ge $deadline ]; then
            cmd_stop >/dev/null 2>&1 || true
            die "no answer on 127.0.0.1:$port/ping within ${START_TIMEOUT}s; see the log: $LOG"
        fi
        sleep 1
    done
    echo "geco retriever $MODEL served (pid $pid) at http://127.0.0.1:$port"
    echo "  log: $LOG   stop: infra/local/serve.sh stop"
    cmd_request
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        echo "geco retriever not served (dir $SDIR)"
        return 0
    fi
    stop_group "$pid" "$STOP_TIMEOUT"
    rm -f "$PIDFILE"
    echo "geco retriever stopped (pid $pid)"
}

cmd_status() {
    local pid
    if pid="$(running_pid)"; then
        echo "geco retriever served (pid $pid) at http://127.0.0.1:$(serve_port) (log $LOG)"
        return 0
    fi
    echo "geco retriever not served (dir $SDIR)"
    return 3
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    request) cmd_request ;;
    *) usage ;;
esac
