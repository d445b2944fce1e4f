#!/usr/bin/env bash
# Profiles a release wsgate (or nginx, the anchor) under one load of the benchmark, on
# loopback.
#
#   bash bench/profile.sh TOOL MODE [SECONDS]
#
# TOOL: perf     `perf record -e cpu-clock -g` (no hardware counters needed), then the
#                top symbols, user space and kernel
#       stat     `perf stat`: CPU, context switches and migrations per message
#       strace   `strace -c -f`: system calls per message (or per churn cycle)
#       callgrind valgrind's exact user-space instruction count per message, then the
#                functions by self cost (slow: run at least 6 s); CACHE_SIM=1 adds
#                simulated L1 cache misses and mispredicted branches per message
# MODE: echo | bulk | latency | churn (as `wsgate-bench load --mode`), or
#       http: keep-alive `GET /small` (100 B; HTTP_PATH=/large: 16 KiB; HTTP_PATH=/post:
#       the POST of 4 KiB answered with 100 B; HTTP_CLOSE=1: a new connection per
#       request) with wrk (-t1,
#       CONNECTIONS, default 50) to an nginx origin made from bench/origin.conf,
#       figures per request; HTTP2=1: the benchmark's HTTP/2 row instead, GET 100 B
#       over TLS (a self-signed certificate made here with openssl) with h2load -t1
#       -c CONNECTIONS (default 10) -m 10, or
#       sse: CONNECTIONS (default 200) event streams at 10 events/s each from the
#       load generator's own backend (`wsgate-bench load --mode sse-load`), figures
#       per event (opening the streams included)
#
# Needs `cargo build --release --locked -p wsgate -p wsgate-bench` first, and perf,
# strace or valgrind (and for http: nginx and wrk; HTTP2=1: h2load and openssl) (Debian: linux-perf, strace,
# valgrind). Output goes to stdout; raw data stays in a temporary directory that is
# printed first. Environment: PROXY (`wsgate`, or `nginx`: the benchmark's nginx from
# bench/nginx.conf, no access log, WORKERS workers (default 1, and then no master
# process, so that one process does all the work: count instructions with one); or
# `haproxy`: the benchmark's HAProxy from bench/haproxy.cfg, no log, WORKERS threads
# (default 1));
# CONFIG and RUST_LOG are then wsgate's only);
# CONFIG (`default`: wsgate's defaults, as `wsgate` in a benchmark run — pings every
# 20 s, the admin listener on loopback, the INFO line per connection, written to a file;
# `lean`: as `wsgate-lean` — pings off, no admin listener, RUST_LOG=warn), CONNECTIONS
# (the load's connections), RUST_LOG (overrides the configuration's log level), WORKERS
# (wsgate's `workers`, default "auto"; nginx's `worker_processes`, default 1), WSGATE (another wsgate binary to profile, e.g.
# an earlier commit's build, for a before/after count). The admin listener is not
# scraped here.
set -euo pipefail

tool=${1:?TOOL: perf, stat, strace or callgrind}
mode=${2:?MODE: echo, bulk, latency, churn, http or sse}
secs=${3:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
tmp=$(mktemp -d)
unit=message
[ "$mode" = http ] && unit=request
[ "$mode" = sse ] && unit=event
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

if [ "$mode" = http ]; then
    # The benchmark's own origin, its placeholders filled in as `wsgate-bench run` does.
    small=$(printf '%0100d' 0)
    piece=$(printf '%02048d' 0)
    sed -e "s|{{LISTEN}}|127.0.0.1:$backend_port|" -e "s|{{DIR}}|$tmp|g" \
        -e "s|{{SMALL}}|$small|g" -e "s|{{PIECE}}|$piece|" \
        "$root/bench/origin.conf" >"$tmp/origin.conf"
    nginx -c "$tmp/origin.conf" -e "$tmp/origin-error.log" 2>"$tmp/echo.log" &
    echo_pid=$!
elif [ "$mode" = sse ]; then
    echo_pid="" # the load generator is the backend
else
    "$bin/wsgate-bench" echo --listen "127.0.0.1:$backend_port" 2>"$tmp/echo.log" &
    echo_pid=$!
fi
tls_wsgate="" tls_listen="" tls_nginx=""
if [ "$mode" = http ] && [ -n "${HTTP2:-}" ]; then
    # As the benchmark's certificate (bench/src/http.rs): ECDSA P-256, for 127.0.0.1.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
        -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null </dev/null
    tls_wsgate=$(printf '[tls]\ncert = "%s"\nkey = "%s"' "$tmp/cert.pem" "$tmp/key.pem")
    tls_listen=" ssl http2"
    tls_nginx="ssl_certificate $tmp/cert.pem; ssl_certificate_key $tmp/key.pem; ssl_protocols TLSv1.2 TLSv1.3;"
fi
cat >"$tmp/wsgate.toml" <<EOF
listen = "127.0.0.1:$listen_port"
backend = "http://127.0.0.1:$backend_port"
workers = ${WORKERS:-\"auto\"}
[websocket]
ping_interval = "$ping_interval"
[admin]
listen = "$admin_listen"
$tls_wsgate
EOF

wrap=()
if [ "$tool" = callgrind ]; then
    wrap=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$tmp/callgrind.out")
    # Simulated first-level caches (this host's sizes, no prefetching) and branch
    # predictors: counts of misses, which say where time goes that instructions do not.
    [ "${CACHE_SIM:-0}" = 1 ] && wrap+=(--cache-sim=yes --branch-sim=yes)
fi
case ${PROXY:-wsgate} in
wsgate)
    RUST_LOG=${RUST_LOG:-$level} "${wrap[@]}" "${WSGATE:-$bin/wsgate}" --config "$tmp/wsgate.toml" \
        2>"$tmp/wsgate.log" &
    ;;
nginx)
    mkdir -p "$tmp/proxy"
    sed -e "s|{{LISTEN}}|127.0.0.1:$listen_port|" -e "s|{{BACKEND}}|127.0.0.1:$backend_port|" \
        -e "s|{{DIR}}|$tmp/proxy|g" -e "s|{{WORKERS}}|${WORKERS:-1}|" -e "s|{{ACCESS_LOG}}|access_log off;|" \
        -e "s|{{LISTEN_TLS}}|$tls_listen|" -e "s|{{TLS}}|$tls_nginx|" "$root/bench/nginx.conf" >"$tmp/proxy.conf"
    if [ "${WORKERS:-1}" = 1 ]; then
        sed -i "s|^master_process on;|master_process off;|" "$tmp/proxy.conf"
    fi
    "${wrap[@]}" nginx -c "$tmp/proxy.conf" -e "$tmp/proxy/error.log" 2>"$tmp/wsgate.log" &
    ;;
haproxy)
    # As the benchmark's haproxy (THREADS = WORKERS, default 1), no log per request.
    mkdir -p "$tmp/proxy"
    bind_tls=""
    if [ -n "${HTTP2:-}" ]; then
        cat "$tmp/cert.pem" "$tmp/key.pem" >"$tmp/haproxy.pem"
        bind_tls=" ssl crt $tmp/haproxy.pem alpn h2,http/1.1 prefer-client-ciphers"
    fi
    sed -e "s|{{LISTEN}}|127.0.0.1:$listen_port|" -e "s|{{BACKEND}}|127.0.0.1:$backend_port|" \
        -e "s|{{DIR}}|$tmp/proxy|g" -e "s|{{THREADS}}|${WORKERS:-1}|" -e "s|{{MAXCONN}}|4000|g" \
        -e "s|{{LOG}}|no log|" -e "s|{{BIND_TLS}}|$bind_tls|" "$root/bench/haproxy.cfg" >"$tmp/proxy.cfg"
    "${wrap[@]}" haproxy -db -f "$tmp/proxy.cfg" 2>"$tmp/wsgate.log" &
    ;;
*)
    echo "unknown PROXY $PROXY: wsgate, nginx or haproxy" >&2
    exit 2
    ;;
esac
wsgate_pid=$!
cleanup() { kill "$wsgate_pid" ${echo_pid:+"$echo_pid"} 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$listen_port") 2>/dev/null && break
    sleep 0.1
done

load() {
    if [ "$mode" = http ] && [ -n "${HTTP2:-}" ]; then
        # h2load's succeeded requests ("requests: N total, N started, N done, N succeeded").
        h2load -t1 -c"${CONNECTIONS:-10}" -m10 -D"$1" "https://127.0.0.1:$listen_port/small" |
            awk '/^requests:/ {print $8}'
        return
    fi
    if [ "$mode" = http ]; then
        # wrk's total of completed requests ("N requests in ...").
        local script=()
        if [ "${HTTP_PATH:-}" = /post ]; then
            # The benchmark's POST row: 4 KiB bodies, a 100-byte answer.
            printf 'wrk.method = "POST"\nwrk.body = string.rep("x", 4096)\n' >"$tmp/post.lua"
            script=(-s "$tmp/post.lua")
        fi
        # HTTP_CLOSE=1: a new connection per request, as the benchmark's
        # `Connection: close` row.
        [ -n "${HTTP_CLOSE:-}" ] && script+=(-H "Connection: close")
        wrk -t1 -c"${CONNECTIONS:-50}" -d"${1}s" "${script[@]}" \
            "http://127.0.0.1:$listen_port${HTTP_PATH:-/small}" |
            awk '/requests in/ {print $1}'
        return
    fi
    if [ "$mode" = sse ]; then
        # Every event the streams received.
        "$bin/wsgate-bench" load --mode sse-load --connections "${CONNECTIONS:-200}" \
            --url "http://127.0.0.1:$listen_port/events" \
            --backend-listen "127.0.0.1:$backend_port" --duration "${1}s" --warmup 0s 2>&1 |
            sed -n 's/^RESULT //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["received"])'
        return
    fi
    "$bin/wsgate-bench" load --mode "$mode" ${CONNECTIONS:+--connections "$CONNECTIONS"} \
        --url "ws://127.0.0.1:$listen_port/" --duration "${1}s" --warmup 0s 2>&1 |
        sed -n 's/^RESULT //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'
}

case $tool in
perf)
    # nginx with WORKERS > 1: its master and workers.
    pids=$(pgrep -d, -P "$wsgate_pid" || true)
    perf record -F 999 -e cpu-clock -g -p "$wsgate_pid${pids:+,$pids}" -o "$tmp/perf.data" -- sleep "$secs" \
        2>"$tmp/perf.log" &
    perf_pid=$!
    n=$(load "$secs")
    wait "$perf_pid" || true
    echo "${unit}s: $n"
    perf report -i "$tmp/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null |
        grep '%' | head -5
    perf report -i "$tmp/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
        grep '%' | head -40
    ;;
stat)
    # Software counters only (no hardware counters needed): how often the proxy's
    # threads block and are woken again, per request. nginx with WORKERS > 1: its
    # master and workers.
    pids=$(pgrep -d, -P "$wsgate_pid" || true)
    perf stat -e task-clock,context-switches,cpu-migrations -p "$wsgate_pid${pids:+,$pids}" -x, \
        -o "$tmp/stat.txt" -- sleep "$secs" &
    stat_pid=$!
    n=$(load "$secs")
    wait "$stat_pid" || true
    echo "${unit}s: $n; per $unit:"
    awk -F, -v n="$n" '$3 ~ /^(task-clock|context-switches|cpu-migrations)$/ {
        if ($3 == "task-clock") printf "  %-18s %8.2f µs\n", "CPU", $1 * 1000 / n
        else printf "  %-18s %8.3f\n", $3, $1 / n }' "$tmp/stat.txt"
    ;;
strace)
    strace -c -f -p "$wsgate_pid" -o "$tmp/strace.txt" &
    strace_pid=$!
    sleep 0.5
    n=$(load "$secs")
    sleep 0.3
    kill -INT "$strace_pid"
    wait "$strace_pid" || true
    echo "${unit}s: $n; system calls per $unit:"
    awk -v n="$n" '$4 ~ /^[0-9]+$/ && $NF != "total" {printf "  %-16s %7.2f\n", $NF, $4 / n}' \
        "$tmp/strace.txt" | sort -k2 -nr | head -20
    ;;
callgrind)
    sleep 2
    load 1 >/dev/null # warm-up, uninstrumented
    callgrind_control -i on "$wsgate_pid" >/dev/null
    n=$(load "$secs")
    callgrind_control -i off "$wsgate_pid" >/dev/null
    # HAProxy under valgrind does not stop on SIGINT; on SIGTERM it does.
    if [ "${PROXY:-wsgate}" = haproxy ]; then kill -TERM "$wsgate_pid"; else kill -INT "$wsgate_pid"; fi
    wait "$wsgate_pid" || true
    out=$tmp/callgrind.out
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "${unit}s: $n; user-space instructions per $unit: $((total / n))"
    if [ "${CACHE_SIM:-0}" = 1 ]; then
        # The totals line: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim.
        callgrind_annotate "$out" 2>/dev/null | awk -v n="$n" -v unit="$unit" '/PROGRAM TOTALS/ {
            gsub(",", ""); v = 0
            for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) x[++v] = $i
            printf "per %s: L1 instruction misses %.0f, L1 data misses %.0f (reads %.0f, writes %.0f), last-level misses %.1f, mispredicted branches %.0f (conditional %.0f, indirect %.0f)\n", unit,
                x[4] / n, (x[5] + x[6]) / n, x[5] / n, x[6] / n, (x[7] + x[8] + x[9]) / n, (x[11] + x[13]) / n, x[11] / n, x[13] / n
        }'
    fi
    callgrind_annotate "$out" 2>/dev/null | sed -n '/^Ir/,$p' | head -40
    ;;
*)
    echo "unknown tool $tool" >&2
    exit 2
    ;;
esac
