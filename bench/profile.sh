#!/usr/bin/env bash
# Profiles a release wsgate under one load of the benchmark, on loopback.
#
#   bash bench/profile.sh TOOL MODE [SECONDS]
#
# TOOL: perf     `perf record -e cpu-clock -g` (no hardware counters needed), then the
#                top symbols, user space and kernel
#       strace   `strace -c -f`: system calls per message (or per churn cycle)
#       callgrind valgrind's exact user-space instruction count per message, then the
#                functions by self cost (slow: run at least 6 s)
# MODE: echo | bulk | latency | churn (as `wsgate-bench load --mode`)
#
# Needs `cargo build --release --locked -p wsgate -p wsgate-bench` first, and
# perf, strace or valgrind (Debian: linux-perf, strace, valgrind). Output goes to stdout;
# raw data stays in a temporary directory that is printed first. Environment:
# CONFIG (`default`: wsgate's defaults, as `wsgate` in a benchmark run — pings every
# 20 s, the admin listener on loopback, the INFO line per connection, written to a file;
# `lean`: as `wsgate-lean` — pings off, no admin listener, RUST_LOG=warn), CONNECTIONS
# (the load's connections), RUST_LOG (overrides the configuration's log level), WORKERS
# (wsgate's `workers`, default "auto"). The admin listener is not scraped here.
set -euo pipefail

tool=${1:?TOOL: perf, strace or callgrind}
mode=${2:?MODE: echo, bulk, latency or churn}
secs=${3:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
tmp=$(mktemp -d)
echo "profile: $tool under $mode for ${secs}s, ${CONFIG:-default} configuration; data in $tmp"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend_port=$(free_port)
listen_port=$(free_port)
config=${CONFIG:-default}
case $config in
default)
    admin_listen="127.0.0.1:$(free_port)"
    ping_interval="20s"
    level=info
    ;;
lean)
    admin_listen=""
    ping_interval="0s"
    level=warn
    ;;
*)
    echo "unknown CONFIG $config: default or lean" >&2
    exit 2
    ;;
esac

"$bin/wsgate-bench" echo --listen "127.0.0.1:$backend_port" 2>"$tmp/echo.log" &
echo_pid=$!
cat >"$tmp/wsgate.toml" <<EOF
listen = "127.0.0.1:$listen_port"
backend = "http://127.0.0.1:$backend_port"
workers = ${WORKERS:-\"auto\"}
[websocket]
ping_interval = "$ping_interval"
[admin]
listen = "$admin_listen"
EOF

wrap=()
if [ "$tool" = callgrind ]; then
    wrap=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$tmp/callgrind.out")
fi
RUST_LOG=${RUST_LOG:-$level} "${wrap[@]}" "$bin/wsgate" --config "$tmp/wsgate.toml" 2>"$tmp/wsgate.log" &
wsgate_pid=$!
cleanup() { kill "$wsgate_pid" "$echo_pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$listen_port") 2>/dev/null && break
    sleep 0.1
done

load() {
    "$bin/wsgate-bench" load --mode "$mode" ${CONNECTIONS:+--connections "$CONNECTIONS"} \
        --url "ws://127.0.0.1:$listen_port/" --duration "${1}s" --warmup 0s 2>&1 |
        sed -n 's/^RESULT //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'
}

case $tool in
perf)
    perf record -F 999 -e cpu-clock -g -p "$wsgate_pid" -o "$tmp/perf.data" -- sleep "$secs" \
        2>"$tmp/perf.log" &
    perf_pid=$!
    n=$(load "$secs")
    wait "$perf_pid" || true
    echo "messages: $n"
    perf report -i "$tmp/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null |
        grep '%' | head -5
    perf report -i "$tmp/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
        grep '%' | head -40
    ;;
strace)
    strace -c -f -p "$wsgate_pid" -o "$tmp/strace.txt" &
    strace_pid=$!
    sleep 0.5
    n=$(load "$secs")
    sleep 0.3
    kill -INT "$strace_pid"
    wait "$strace_pid" || true
    echo "messages: $n; system calls per message:"
    awk -v n="$n" '$4 ~ /^[0-9]+$/ && $NF != "total" {printf "  %-16s %7.2f\n", $NF, $4 / n}' \
        "$tmp/strace.txt" | sort -k2 -nr | head -20
    ;;
callgrind)
    sleep 2
    load 1 >/dev/null # warm-up, uninstrumented
    callgrind_control -i on "$wsgate_pid" >/dev/null
    n=$(load "$secs")
    callgrind_control -i off "$wsgate_pid" >/dev/null
    kill -INT "$wsgate_pid"
    wait "$wsgate_pid" || true
    out=$tmp/callgrind.out
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "messages: $n; user-space instructions per message: $((total / n))"
    callgrind_annotate "$out" 2>/dev/null | sed -n '/^Ir/,$p' | head -40
    ;;
*)
    echo "unknown tool $tool" >&2
    exit 2
    ;;
esac
