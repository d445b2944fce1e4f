#!/usr/bin/env bash
# Autobahn conformance through wsgate, with kosoku (the Autobahn TestSuite cases run by
# a modern runner, https://pypi.org/project/kosoku/).
#
# Both directions, each run twice, direct and through wsgate:
#   1. kosoku fuzzingclient -> echo backend (scripts/echo_backend.py)      [direct]
#      kosoku fuzzingclient -> wsgate -> echo backend                      [wsgate]
#   2. websockets client -> kosoku fuzzingserver                           [direct]
#      websockets client -> wsgate -> kosoku fuzzingserver                 [wsgate]
# Every case that passes direct (OK, NON-STRICT or INFORMATIONAL) must pass through
# wsgate: the script prints a table per direction and exits 1 on any regression.
#
# Environment:
#   AUTOBAHN_CASES        case globs, comma separated (default: sections 1-7 and 10)
#   AUTOBAHN_FULL=1       with the default selection, add 12.* and 13.* (permessage-deflate:
#                         432 cases of 1000 messages each, far slower than the rest; a
#                         quick subset is AUTOBAHN_CASES='12.1.*,13.1.*', ~3 min)
#   AUTOBAHN_EXCLUDE      case globs to leave out
#   AUTOBAHN_PARALLELISM  cases at once in the fuzzing client (default 4)
#   AUTOBAHN_TIMEOUT      bound on the whole run in seconds (default 1800, 10800 with FULL)
#   AUTOBAHN_OUT          where results and logs go (default target/autobahn)
#   AUTOBAHN_PYTHON       a python with kosoku and websockets (default: a venv made in
#                         target/autobahn-venv)
#   WSGATE_BIN            the wsgate binary (default: cargo build --release --locked)
#   AUTOBAHN_REVERSE=0    skip direction 2
#
# Everything listens on 127.0.0.1 on free ports; every process started here is stopped
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Bound the whole run: re-run this script under timeout(1) once.
if [[ -z ${AUTOBAHN_BOUNDED:-} ]]; then
  export AUTOBAHN_BOUNDED=1
  if [[ ${AUTOBAHN_FULL:-0} == 1 ]]; then default_limit=10800; else default_limit=1800; fi
  exec timeout --signal=TERM --kill-after=20 "${AUTOBAHN_TIMEOUT:-$default_limit}" \
    bash "$ROOT/scripts/autobahn.sh" "$@"
fi

DEFAULT_CASES='1.*,2.*,3.*,4.*,5.*,6.*,7.*,10.*'
if [[ ${AUTOBAHN_FULL:-0} == 1 ]]; then
  DEFAULT_CASES="$DEFAULT_CASES,12.*,13.*"
fi
CASES=${AUTOBAHN_CASES:-$DEFAULT_CASES}
EXCLUDE=${AUTOBAHN_EXCLUDE:-}
PARALLELISM=${AUTOBAHN_PARALLELISM:-4}
OUT=${AUTOBAHN_OUT:-$ROOT/target/autobahn}
KOSOKU_VERSION=${KOSOKU_VERSION:-0.1.0}
WEBSOCKETS_VERSION=${WEBSOCKETS_VERSION:-17.4}

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.port "$OUT"/*.log "$OUT"/*.toml "$OUT"/*.prom

PIDS=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    # Give each a moment, then make sure.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '[autobahn] %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------
if [[ -n ${AUTOBAHN_PYTHON:-} ]]; then
  PY=$AUTOBAHN_PYTHON
else
  VENV=$ROOT/target/autobahn-venv
  if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  PY=$VENV/bin/python
  if ! "$PY" -c 'import kosoku, websockets' 2>/dev/null; then
    log "installing kosoku==$KOSOKU_VERSION websockets==$WEBSOCKETS_VERSION"
    "$PY" -m pip install -q --disable-pip-version-check \
      "kosoku==$KOSOKU_VERSION" "websockets==$WEBSOCKETS_VERSION"
  fi
fi
"$PY" -c 'import kosoku, websockets' || { log "kosoku/websockets missing in $PY"; exit 2; }

if [[ -n ${WSGATE_BIN:-} ]]; then
  BIN=$WSGATE_BIN
else
  log "building wsgate (release)"
  cargo build --release --locked --quiet
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/wsgate
fi
[[ -x $BIN ]] || { log "no wsgate binary at $BIN"; exit 2; }

# --- helpers -----------------------------------------------------------------------------
# A port nothing listens on right now (the OS picks it; the script checks it is free).
free_port() {
  "$PY" - <<'EOF'
import socket
for _ in range(50):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = socket.socket()
    c.settimeout(0.2)
    try:
        c.connect(("127.0.0.1", port))
    except OSError:
        print(port)
        break
    finally:
        c.close()
else:
    raise SystemExit("no free port")
EOF
}

# Waits until something accepts TCP connections on 127.0.0.1:$1 (or $2 seconds pass).
wait_listening() {
  "$PY" - "$1" "${2:-20}" <<'EOF'
import socket, sys, time
port, limit = int(sys.argv[1]), float(sys.argv[2])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"nothing listening on 127.0.0.1:{port} after {limit}s")
EOF
}

# Waits for a port file written by a child, prints the port.
wait_port_file() {
  local file=$1 pid=$2
  for _ in $(seq 1 200); do
    if [[ -s $file ]]; then
      cat "$file"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { log "process $pid died before listening"; return 1; }
    sleep 0.1
  done
  log "timed out waiting for $file"
  return 1
}

# start_wsgate NAME BACKEND_PORT: starts wsgate in front of 127.0.0.1:BACKEND_PORT,
# sets WSGATE_PORT, WSGATE_ADMIN and WSGATE_PID.
start_wsgate() {
  local name=$1 backend=$2
  WSGATE_PORT=$(free_port)
  WSGATE_ADMIN=$(free_port)
  cat >"$OUT/$name.toml" <<EOF
listen = "127.0.0.1:$WSGATE_PORT"
backend = "http://127.0.0.1:$backend"

[websocket]
# No liveness pings: the suites must see only the frames they provoke.
ping_interval = "0s"

[admin]
listen = "127.0.0.1:$WSGATE_ADMIN"
EOF
  "$BIN" --check-config "$OUT/$name.toml" >/dev/null
  RUST_LOG=${RUST_LOG:-info,wsgate=debug} "$BIN" --config "$OUT/$name.toml" >"$OUT/$name.log" 2>&1 &
  WSGATE_PID=$!
  PIDS+=("$WSGATE_PID")
  wait_listening "$WSGATE_PORT"
  log "$name: wsgate on 127.0.0.1:$WSGATE_PORT -> 127.0.0.1:$backend (admin :$WSGATE_ADMIN)"
}

# Saves wsgate's metrics (ended connections by outcome, close codes) next to its log.
save_metrics() {
  "$PY" - "$WSGATE_ADMIN" "$OUT/$1.prom" <<'EOF' || true
import sys, urllib.request
port, out = sys.argv[1], sys.argv[2]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
open(out, "w").write(body)
EOF
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

STATUS=0
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# --- 1. kosoku as the client, the echo backend as the server ---------------------------
"$PY" scripts/echo_backend.py --port 0 --port-file "$OUT/backend.port" >"$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
BACKEND_PORT=$(wait_port_file "$OUT/backend.port" "$BACKEND_PID")
log "echo backend on 127.0.0.1:$BACKEND_PORT"
start_wsgate gate-client "$BACKEND_PORT"

run_client() {
  local url=$1 out=$2
  log "kosoku fuzzingclient -> $url ($CASES)"
  "$PY" scripts/autobahn.py client --url "$url" --cases "$CASES" --exclude "$EXCLUDE" \
    --parallelism "$PARALLELISM" --out "$out"
}
run_client "ws://127.0.0.1:$BACKEND_PORT" "$OUT/client-direct.json"
run_client "ws://127.0.0.1:$WSGATE_PORT" "$OUT/client-wsgate.json"
save_metrics gate-client
stop_pid "$WSGATE_PID"
stop_pid "$BACKEND_PID"

"$PY" scripts/autobahn.py compare --direct "$OUT/client-direct.json" \
  --via "$OUT/client-wsgate.json" \
  --title "kosoku fuzzingclient -> [wsgate ->] echo backend" | tee -a "$SUMMARY" || STATUS=1

# --- 2. kosoku as the server, a websockets client --------------------------------------
if [[ ${AUTOBAHN_REVERSE:-1} != 0 ]]; then
  run_server() {
    local name=$1 via_gate=$2
    rm -f "$OUT/$name.port"
    "$PY" scripts/autobahn.py server --port-file "$OUT/$name.port" --cases "$CASES" \
      --exclude "$EXCLUDE" --out "$OUT/$name.json" >"$OUT/$name-server.log" 2>&1 &
    local server_pid=$!
    PIDS+=("$server_pid")
    local port url
    port=$(wait_port_file "$OUT/$name.port" "$server_pid")
    url="ws://127.0.0.1:$port"
    if [[ $via_gate == 1 ]]; then
      start_wsgate gate-server "$port"
      url="ws://127.0.0.1:$WSGATE_PORT"
    fi
    log "websockets testee -> $url"
    "$PY" scripts/autobahn.py testee --url "$url" --agent "websockets-$name" \
      >"$OUT/$name-testee.log" 2>&1 || log "testee exited $?"
    # The server ends after /updateReports; bound the wait anyway.
    for _ in $(seq 1 300); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    stop_pid "$server_pid"
    if [[ $via_gate == 1 ]]; then
      save_metrics gate-server
      stop_pid "$WSGATE_PID"
    fi
    cat "$OUT/$name-server.log" >&2
  }
  run_server server-direct 0
  run_server server-wsgate 1
  "$PY" scripts/autobahn.py compare --direct "$OUT/server-direct.json" \
    --via "$OUT/server-wsgate.json" \
    --title "websockets client -> [wsgate ->] kosoku fuzzingserver" | tee -a "$SUMMARY" || STATUS=1
fi

log "results, logs and metrics in $OUT (summary: $SUMMARY)"
exit "$STATUS"
