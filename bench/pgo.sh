#!/usr/bin/env bash
# Builds wsgate with profile-guided optimisation (PGO): an instrumented build runs the
# benchmark's own loads on loopback (bench/profile.sh), and the release build then lays
# out and inlines its code by what they recorded. An experiment, not the default build:
# see bench/README.md, "the caches".
#
#   bash bench/pgo.sh [OUT]
#
# OUT: where the optimised binary goes (default target/pgo/wsgate). The profile stays
# beside it (OUT.profdata). Needs llvm-profdata from the toolchain's llvm-tools
# (`rustup component add llvm-tools`) and what `bench/profile.sh stat` needs for its
# loads: perf, nginx, wrk, h2load and openssl (Debian: linux-perf, nginx-light, wrk,
# nghttp2-client, openssl). Takes about ten minutes on two CPUs (two release builds;
# the instrumented one is incremental after the first run).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/pgo/wsgate}
profdata=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
if [ -z "$profdata" ]; then
    echo "llvm-profdata not found: rustup component add llvm-tools" >&2
    exit 2
fi
# A fixed place for the raw counts: the flags stay the same from one run to the next,
# so the instrumented build is incremental.
raw=$root/target/pgo-raw

echo "pgo: instrumented build" >&2
CARGO_TARGET_DIR=$root/target/pgo-generate RUSTFLAGS="-Cprofile-generate=$raw" \
    cargo build --release --locked -p wsgate --manifest-path "$root/Cargo.toml"
instrumented=$root/target/pgo-generate/release/wsgate
# The build scripts ran instrumented too: only wsgate's runs below count.
rm -rf "$raw"

# Each load runs the default configuration (as a user starts wsgate) for a few seconds;
# wsgate writes its counts when it exits.
for load in "http" "http HTTP_CLOSE=1" "http HTTP_PATH=/post" "http HTTP_PATH=/large" \
    "http HTTP2=1" "echo" "churn" "sse"; do
    set -- $load
    mode=$1
    shift
    echo "pgo: training on $mode $*" >&2
    env "$@" WSGATE="$instrumented" bash "$root/bench/profile.sh" stat "$mode" 3 >/dev/null
done
mkdir -p "$(dirname "$out")"
"$profdata" merge -o "$out.profdata" "$raw"

echo "pgo: optimised build" >&2
# From scratch: cargo does not see a profile change (its path, in the flags, stays the
# same), and every crate is built with it.
rm -rf "$root/target/pgo-use"
CARGO_TARGET_DIR=$root/target/pgo-use RUSTFLAGS="-Cprofile-use=$out.profdata" \
    cargo build --release --locked -p wsgate --manifest-path "$root/Cargo.toml"
cp "$root/target/pgo-use/release/wsgate" "$out"
echo "pgo: $out" >&2
