# Helpers shared by s3.sh, mlflow.sh and ray.sh (sourced; they set $PYTHON first).

# port_busy PORT: success when something holds 127.0.0.1:PORT. SO_REUSEADDR as the servers
# bind, so a port in TIME_WAIT counts as free.
port_busy() {
    "$PYTHON" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
PY
}

# free_port: a loopback port nothing holds right now.
free_port() {
    "$PYTHON" - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])
PY
}

# pid_of PIDFILE PATTERN: the pid in PIDFILE when that process is alive and its command
# line contains PATTERN (a recycled pid is not ours); fails otherwise.
pid_of() {
    [ -f "$1" ] || return 1
    local pid; pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# http_ok PORT PATH: success when http://127.0.0.1:PORT/PATH answers 200 within 2 s.
http_ok() {
    "$PYTHON" - "$1" "$2" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/{sys.argv[2]}", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:  # noqa: BLE001 - any failure means "not ready yet"
    sys.exit(1)
PY
}

# stop_group PID TIMEOUT: TERM the process group PID leads (each service starts with setsid, so
# its children go too), KILL it after TIMEOUT seconds; returns once PID is gone.
stop_group() {
    local pid="$1" deadline=$((SECONDS + $2))
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
}
