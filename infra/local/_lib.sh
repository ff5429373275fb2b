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
