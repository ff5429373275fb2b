#!/usr/bin/env bash
# Local Ray cluster for the embedded default and the tests: a head (GCS, dashboard and job
# server) and optionally worker nodes, each its own raylet with its own temp dir, all on
# 127.0.0.1 (Ray is told to treat this machine as a single-machine cluster, so it never
# advertises or binds another interface), usage stats off, the venv's Python on PATH for jobs.
#
#   infra/local/ray.sh start [--port P] [--dashboard-port D] [--num-cpus N]
#                            [--workers K] [--worker-cpus C] [--dir DIR]
#   infra/local/ray.sh node-start I [--worker-cpus C] [--dir DIR]
#   infra/local/ray.sh node-kill I [--dir DIR]
#   infra/local/ray.sh stop|status|nodes|env|runtime-env [--dir DIR]
#
# DIR defaults to $GECO_STACK_DIR or <repo>/runs/local-stack; P (GCS) to $GECO_RAY_PORT or 6380,
# D (dashboard + job API) to $GECO_RAY_DASHBOARD_PORT or 8265, N to $GECO_RAY_CPUS or all cores.
# With --workers K the head gets 0 CPUs (as KubeRay advises: nothing but drivers and Ray's
# services run there) and K worker nodes of C CPUs each ($GECO_RAY_WORKER_CPUS or 1) join it
# with `ray start --address` (infra/local/ray_node.py), like the worker pods of a cluster.
# `node-start I` starts worker node I (again: a lost node coming back); `node-kill I` SIGKILLs
# its raylet, agents and workers, by pid, as a preempted node dies; `nodes` lists them.
# Other Ray ports are picked free on loopback, so several clusters (tests, a developer's)
# coexist; `stop` stops exactly the head and nodes of DIR (never `ray stop`, which would stop
# every Ray on the machine).
# `env` prints RAY_ADDRESS (the job API) for eval; `runtime-env` writes and prints the path of a
# runtime-env JSON for `ray job submit --runtime-env`: this repository as working_dir, the
# local S3 settings (endpoint + credentials *file*, never the secret) when s3.sh has run, and
# MLFLOW_TRACKING_URI when mlflow.sh runs a server.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="${GECO_VENV_BIN:-$REPO/.venv/bin}"
START_TIMEOUT="${GECO_RAY_START_TIMEOUT:-120}"

die() { echo "ray.sh: $*" >&2; exit 1; }
usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

CMD="${1:-}"; [ -n "$CMD" ] || usage; shift
DIR="${GECO_STACK_DIR:-$REPO/runs/local-stack}"
PORT_ARG="" DASH_ARG="" CPUS="${GECO_RAY_CPUS:-}" WORKERS=0
WORKER_CPUS="${GECO_RAY_WORKER_CPUS:-1}" NODE=""
# Each worker node's object store (shared memory): small, the payloads are checkpoint refs.
NODE_STORE_BYTES="${GECO_RAY_NODE_STORE_BYTES:-$((512 * 1024 * 1024))}"
case "$CMD" in
    node-start|node-kill)
        [ $# -ge 1 ] && [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "$CMD needs a node number (1, 2, ...)"
        NODE="$1"; shift ;;
esac
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) [ $# -ge 2 ] || die "--workers needs a value"; WORKERS="$2"; shift 2 ;;
        --worker-cpus) [ $# -ge 2 ] || die "--worker-cpus needs a value"; WORKER_CPUS="$2"; shift 2 ;;
        --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
        --port) [ $# -ge 2 ] || die "--port needs a value"; PORT_ARG="$2"; shift 2 ;;
        --dashboard-port) [ $# -ge 2 ] || die "--dashboard-port needs a value"; DASH_ARG="$2"; shift 2 ;;
        --num-cpus) [ $# -ge 2 ] || die "--num-cpus needs a value"; CPUS="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1" ;;
    esac
done
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got $WORKERS"
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
    TEMP_DIR="" HEAD_CPUS=""
    if [ -z "$PORT_ARG$DASH_ARG" ] && [ -f "$PORTS" ]; then
        # shellcheck disable=SC1090
        . "$PORTS"
    fi
    # Short: Ray puts unix sockets under it (108-byte limit).
    TEMP_DIR="${TEMP_DIR:-/tmp/geco-ray-$(id -u)-$GCS_PORT}"
}

# Processes of one node, given its temp dir: those naming the dir on their command line (every
# Ray daemon and worker does), and those holding a file open in it (its logs: Ray's agents
# rename themselves, e.g. ray::DashboardAgent, and outlive a killed raylet). Worker nodes' dirs
# are "<head dir>-n<I>", so the name must be followed by / space = or the end to be this one.
dir_pids() {
    {
        pgrep -u "$(id -u)" -f -- "$1([/ =]|\$)" || true
        local d
        for d in /proc/[0-9]*; do
            [ -O "$d" ] || continue
            if ls -l "$d/fd" 2>/dev/null | grep -qF -- "$1/"; then echo "${d#/proc/}"; fi
        done
    } | sort -un
}
head_pids() { dir_pids "$TEMP_DIR"; }
node_dir() { echo "$TEMP_DIR-n$1"; }
# Numbers of the worker nodes started in DIR (running or not).
node_numbers() {
    local f
    for f in "$RAYDIR"/node-*.env; do
        [ -f "$f" ] || continue
        f="${f##*/node-}"; echo "${f%.env}"
    done | sort -n
}
nodes_pids() { local d; for d in "$@"; do dir_pids "$d"; done | sort -un; }

alive() { "$RAY" status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1; }

# kill_wait SIGNAL DIR...: signal every process of the given node dirs; SIGKILL what is left
# after 15 s.
kill_wait() {
    local sig="$1" pids; shift
    pids="$(nodes_pids "$@")"
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill "-$sig" $pids 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while [ -n "$(nodes_pids "$@")" ]; do
        if [ $SECONDS -ge $deadline ]; then
            # shellcheck disable=SC2046
            kill -KILL $(nodes_pids "$@") 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
}

cmd_start() {
    load_ports
    [ -x "$RAY" ] || die "ray not found at $RAY: pip install -e '.[orchestration]' into the venv"
    if [ -n "$(head_pids)" ] && alive; then
        echo "Ray head already running at 127.0.0.1:$GCS_PORT (dashboard http://127.0.0.1:$DASH_PORT)"
        # Worker nodes next to a head that trains itself would not be the cluster asked for.
        HEAD_CPUS="$(sed -n 's/^HEAD_CPUS=//p' "$PORTS" 2>/dev/null || true)"
        if [ "$WORKERS" -gt 0 ] && [ "$HEAD_CPUS" != 0 ]; then
            die "the Ray head at 127.0.0.1:$GCS_PORT runs with CPUs (a single-node head, as \`make demo\` starts); stop it first (\`make stop\` or ray.sh stop)"
        fi
    else
        start_head
    fi
    local i
    for ((i = 1; i <= WORKERS; i++)); do NODE="$i" cmd_node_start; done
}

start_head() {
    for p in "$GCS_PORT" "$DASH_PORT"; do
        port_busy "$p" && die "port 127.0.0.1:$p is already in use; choose one with --port/--dashboard-port"
    done
    mkdir -p "$RAYDIR"
    rm -f "$RAYDIR"/node-*.env
    local client agent
    client="$(free_port)"; agent="$(free_port)"
    # A head with worker nodes runs no training: 0 CPUs unless told otherwise.
    if [ "$WORKERS" -gt 0 ] && [ -z "$CPUS" ]; then CPUS=0; fi
    printf 'GCS_PORT=%s\nDASH_PORT=%s\nTEMP_DIR=%s\nCLIENT_PORT=%s\nAGENT_PORT=%s\nHEAD_CPUS=%s\n' \
        "$GCS_PORT" "$DASH_PORT" "$TEMP_DIR" "$client" "$agent" "${CPUS:-all}" >"$PORTS"
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
    echo "Ray head running at 127.0.0.1:$GCS_PORT${CPUS:+ ($CPUS CPUs)}; dashboard and job API http://127.0.0.1:$DASH_PORT"
    echo "  logs: $TEMP_DIR/session_latest/logs"
}

# Worker node $NODE: its own raylet, object store, agents and temp dir, joined to the head by
# `ray start --address` (through ray_node.py, which keeps it on loopback).
cmd_node_start() {
    load_ports
    local nd log
    nd="$(node_dir "$NODE")"; log="$RAYDIR/node-$NODE.log"
    alive || die "no Ray head at 127.0.0.1:$GCS_PORT: run \`ray.sh start\` first"
    if [ -n "$(dir_pids "$nd")" ]; then
        echo "Ray worker node $NODE already running ($nd)"
        return 0
    fi
    local args=(
        --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 "--num-cpus=$WORKER_CPUS"
        "--temp-dir=$nd" "--dashboard-agent-listen-port=$(free_port)"
        --min-worker-port=0 --max-worker-port=0 "--object-store-memory=$NODE_STORE_BYTES"
        --labels="geco-node=n$NODE" --disable-usage-stats
    )
    printf 'NODE_DIR=%s\nNODE_CPUS=%s\n' "$nd" "$WORKER_CPUS" >"$RAYDIR/node-$NODE.env"
    if ! timeout "$START_TIMEOUT" "$PYTHON" "$REPO/infra/local/ray_node.py" "${args[@]}" >"$log" 2>&1; then
        kill_wait KILL "$nd"
        die "Ray worker node $NODE failed to start; see $log"
    fi
    echo "Ray worker node $NODE running ($WORKER_CPUS CPUs, node id $(node_id "$nd")); logs: $nd/session_latest/logs"
}

# The Ray node id of the node whose temp dir is $1 (its raylet's --node_id), or "-".
node_id() {
    local pid
    for pid in $(pgrep -u "$(id -u)" -x raylet || true); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE -- "--temp_dir=$1( |\$)"; then
            tr '\0' '\n' <"/proc/$pid/cmdline" | sed -n 's/^--node_id=//p'
            return 0
        fi
    done
    echo "-"
}

# A preempted node: SIGKILL, by pid, everything of worker node $NODE (raylet, object store,
# agents, workers); no goodbye to the head, which notices the node gone by its health checks.
cmd_node_kill() {
    load_ports
    local nd pids
    nd="$(node_dir "$NODE")"
    pids="$(dir_pids "$nd")"
    [ -n "$pids" ] || die "Ray worker node $NODE is not running ($nd)"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    echo "Ray worker node $NODE killed (pids" $pids")"
}

cmd_nodes() {
    load_ports
    local i nd state
    printf '%-5s %-8s %-57s %s\n' node state "node id" "temp dir"
    state=stopped; [ -n "$(head_pids)" ] && state=running
    printf '%-5s %-8s %-57s %s\n' head "$state" "$(node_id "$TEMP_DIR")" "$TEMP_DIR"
    for i in $(node_numbers); do
        nd="$(node_dir "$i")"
        state=stopped; [ -n "$(dir_pids "$nd")" ] && state=running
        printf '%-5s %-8s %-57s %s\n' "n$i" "$state" "$(node_id "$nd")" "$nd"
    done
}

cmd_stop() {
    load_ports
    local dirs=() i
    for i in $(node_numbers); do dirs+=("$(node_dir "$i")"); done
    if [ -z "$(nodes_pids "$TEMP_DIR" "${dirs[@]}")" ]; then
        echo "Ray head not running (127.0.0.1:$GCS_PORT)"
        return 0
    fi
    # Worker nodes first, so none of them outlives its head.
    if [ ${#dirs[@]} -gt 0 ]; then kill_wait TERM "${dirs[@]}"; fi
    kill_wait TERM "$TEMP_DIR"
    echo "Ray head${dirs[0]:+ and ${#dirs[@]} worker node(s)} stopped (127.0.0.1:$GCS_PORT)"
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
    nodes) cmd_nodes ;;
    node-start) cmd_node_start ;;
    node-kill) cmd_node_kill ;;
    env) cmd_env ;;
    runtime-env) cmd_runtime_env ;;
    *) usage ;;
esac
