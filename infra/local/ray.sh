#!/usr/bin/env bash
# Local Ray head for the embedded default and the tests: GCS, raylet, dashboard and job server
# all on 127.0.0.1 (Ray is told to treat this machine as a single-node cluster, so it never
# advertises or binds another interface), usage stats off, the venv's Python on PATH for jobs.
#
#   infra/local/ray.sh start [--port P] [--dashboard-port D] [--num-cpus N] [--dir DIR]
#   infra/local/ray.sh stop|status|env|runtime-env [--dir DIR]
#
# DIR defaults to $GECO_STACK_DIR or <repo>/runs/local-stack; P (GCS) to $GECO_RAY_PORT or 6380,
# D (dashboard + job API) to $GECO_RAY_DASHBOARD_PORT or 8265, N to $GECO_RAY_CPUS or all cores.
# Other Ray ports are picked free on loopback, so several heads (tests, a developer's) coexist;
# `stop` stops only this head (never `ray stop`, which would stop every Ray on the machine).
# `env` prints RAY_ADDRESS (the job API) for eval; `runtime-env` writes and prints the path of a
# runtime-env JSON for `ray job submit --runtime-env`: this repository as working_dir, the
# local S3 settings (endpoint + credentials *file*, never the secret) when s3.sh has run, and
# MLFLOW_TRACKING_URI when mlflow.sh runs a server.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="${GECO_VENV_BIN:-$REPO/.venv/bin}"
START_TIMEOUT="${GECO_RAY_START_TIMEOUT:-120}"

die() { echo "ray.sh: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

CMD="${1:-}"; [ -n "$CMD" ] || usage; shift
DIR="${GECO_STACK_DIR:-$REPO/runs/local-stack}"
PORT_ARG="" DASH_ARG="" CPUS="${GECO_RAY_CPUS:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
        --port) [ $# -ge 2 ] || die "--port needs a value"; PORT_ARG="$2"; shift 2 ;;
        --dashboard-port) [ $# -ge 2 ] || die "--dashboard-port needs a value"; DASH_ARG="$2"; shift 2 ;;
        --num-cpus) [ $# -ge 2 ] || die "--num-cpus needs a value"; CPUS="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1" ;;
    esac
done
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
RAYDIR="$DIR/ray"
PORTS="$RAYDIR/ports.env"
LOG="$RAYDIR/start.log"

# Single-node mode: Ray resolves its node address to 127.0.0.1 and binds there (the variable's
# name says Windows/macOS, but it is read on every platform).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export PATH="$VENV_BIN:$PATH"
RAY="$VENV_BIN/ray"
PYTHON="$VENV_BIN/python"
. "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

# The ports of the last start (so stop/status/env find this head), else the defaults.
load_ports() {
    GCS_PORT="${PORT_ARG:-${GECO_RAY_PORT:-6380}}"
    DASH_PORT="${DASH_ARG:-${GECO_RAY_DASHBOARD_PORT:-8265}}"
    TEMP_DIR=""
    if [ -z "$PORT_ARG$DASH_ARG" ] && [ -f "$PORTS" ]; then
        # shellcheck disable=SC1090
        . "$PORTS"
    fi
    # Short: Ray puts unix sockets under it (108-byte limit).
    TEMP_DIR="${TEMP_DIR:-/tmp/geco-ray-$(id -u)-$GCS_PORT}"
}

# Processes of this head: every Ray daemon names its session/temp dir on its command line.
# This head's processes: those naming its temp dir, and those holding a file open in it (its
# logs). Ray's agents rename themselves (ray::DashboardAgent), so their command line no longer
# names the temp dir, and they outlive a killed raylet.
head_pids() {
    {
        pgrep -u "$(id -u)" -f -- "$TEMP_DIR" || true
        local d
        for d in /proc/[0-9]*; do
            [ -O "$d" ] || continue
            if ls -l "$d/fd" 2>/dev/null | grep -qF -- "$TEMP_DIR/"; then echo "${d#/proc/}"; fi
        done
    } | sort -un
}

alive() { "$RAY" status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1; }

cmd_start() {
    load_ports
    [ -x "$RAY" ] || die "ray not found at $RAY: pip install -e '.[orchestration]' into the venv"
    if [ -n "$(head_pids)" ] && alive; then
        echo "Ray head already running at 127.0.0.1:$GCS_PORT (dashboard http://127.0.0.1:$DASH_PORT)"
        return 0
    fi
    for p in "$GCS_PORT" "$DASH_PORT"; do
        port_busy "$p" && die "port 127.0.0.1:$p is already in use; choose one with --port/--dashboard-port"
    done
    mkdir -p "$RAYDIR"
    local client agent
    client="$(free_port)"; agent="$(free_port)"
    printf 'GCS_PORT=%s\nDASH_PORT=%s\nTEMP_DIR=%s\nCLIENT_PORT=%s\nAGENT_PORT=%s\n' \
        "$GCS_PORT" "$DASH_PORT" "$TEMP_DIR" "$client" "$agent" >"$PORTS"
    local args=(
        start --head --node-ip-address=127.0.0.1 "--port=$GCS_PORT"
        --include-dashboard=true --dashboard-host=127.0.0.1 "--dashboard-port=$DASH_PORT"
        "--dashboard-agent-listen-port=$agent" "--ray-client-server-port=$client"
        --disable-usage-stats "--temp-dir=$TEMP_DIR"
    )
    [ -n "$CPUS" ] && args+=("--num-cpus=$CPUS")
    echo "$RAY ${args[*]}" >"$RAYDIR/command.txt"
    if ! timeout "$START_TIMEOUT" "$RAY" "${args[@]}" >"$LOG" 2>&1; then
        cmd_stop >/dev/null 2>&1 || true
        die "ray start failed; see $LOG"
    fi
    local deadline=$((SECONDS + 60))
    until alive && "$PYTHON" - "$DASH_PORT" <<'EOF'
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
EOF
    do
        [ $SECONDS -ge $deadline ] && die "Ray head started but the job API on 127.0.0.1:$DASH_PORT does not answer; see $TEMP_DIR/session_latest/logs"
        sleep 1
    done
    echo "Ray head running at 127.0.0.1:$GCS_PORT; dashboard and job API http://127.0.0.1:$DASH_PORT"
    echo "  logs: $TEMP_DIR/session_latest/logs"
}

cmd_stop() {
    load_ports
    local pids
    pids="$(head_pids)"
    if [ -z "$pids" ]; then
        echo "Ray head not running (127.0.0.1:$GCS_PORT)"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while [ -n "$(head_pids)" ]; do
        if [ $SECONDS -ge $deadline ]; then
            # shellcheck disable=SC2046
            kill -KILL $(head_pids) 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    echo "Ray head stopped (127.0.0.1:$GCS_PORT)"
}

cmd_status() {
    load_ports
    if [ -n "$(head_pids)" ] && alive; then
        "$RAY" status --address "127.0.0.1:$GCS_PORT"
        return 0
    fi
    echo "Ray head not running (127.0.0.1:$GCS_PORT)"
    return 3
}

cmd_env() {
    load_ports
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT"
}

cmd_runtime_env() {
    load_ports
    mkdir -p "$RAYDIR"
    local out="$RAYDIR/runtime_env.json" s3env=""
    if s3env="$(GECO_STACK_DIR="$DIR" "$REPO/infra/local/s3.sh" profile-env 2>/dev/null)"; then :; else s3env=""; fi
    # The tracking server, when mlflow.sh runs one for this stack.
    if GECO_STACK_DIR="$DIR" "$REPO/infra/local/mlflow.sh" status >/dev/null 2>&1; then
        s3env="$s3env"$'\n'"$(GECO_STACK_DIR="$DIR" "$REPO/infra/local/mlflow.sh" env)"
    fi
    S3ENV="$s3env" "$PYTHON" - "$REPO" "$out" <<'EOF'
import json, os, sys
repo, out = sys.argv[1], sys.argv[2]
env = {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
for line in os.environ.get("S3ENV", "").splitlines():
    key, _, value = line.removeprefix("export ").partition("=")
    if key:
        env[key] = value
spec = {
    "working_dir": repo,
    # What a job needs is the code and configs; never the venv, data, runs or git history.
    "excludes": [".venv", ".git", "runs", "data", "tmp", ".gpu_data", "*.egg-info",
                 "__pycache__", ".pytest_cache", ".ruff_cache", "*.pt"],
    "env_vars": env,
}
with open(out + ".tmp", "w") as fh:
    json.dump(spec, fh, indent=1)
os.replace(out + ".tmp", out)
print(out)
EOF
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    runtime-env) cmd_runtime_env ;;
    *) usage ;;
esac
