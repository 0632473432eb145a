#!/usr/bin/env bash
# bench/callgrind.sh [DIR] [LABEL]: instructions per proxied post5k request of the luaproxy in
# DIR (a checkout with its luaproxy.so built in place; default: this one). One worker under
# valgrind --tool=callgrind in front of the peer harness's backends (started and stopped here
# if not running); 2 s of `wrk -t1 -c4` to warm up, counters zeroed, 8 s measured, dumped.
# Instruction counts do not depend on the machine's speed; with CONNS > 1 they do a little on
# how many requests one wake-up serves (a loaded machine batches fewer): A/B with CONNS=1.
# CONF=bench/router.conf.lua: the API router with its access log and metrics instead.
# CONNS: wrk connections (4; 1 makes every request its own wake-up: steadiest for A/B).
# LUA: the interpreter (default lua5.4; a build with symbols names the VM's functions).
# PORT: where CONF listens (8090 in both configs above). WORKLOAD=small: the small GET.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=$(cd "${1:-$here}" && pwd); label=${2:-$(basename "$dir")}
SHARED=${SHARED_BENCH:-$here/../shared/bench}
out=${TMPDIR:-/tmp}/luaproxy-callgrind.$label.$$
started=0
port=${PORT:-8090}
wl=${WORKLOAD:-post5k}
if ! "$SHARED/backend.sh" status >/dev/null 2>&1; then "$SHARED/backend.sh" start >/dev/null; started=1; fi
cd "$dir"
LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' valgrind --tool=callgrind --callgrind-out-file="$out" \
    ${LUA:-lua5.4} main.lua --config "${CONF:-bench/luaproxy.conf.lua}" --workers 1 >"$out.log" 2>&1 &
vpid=$!
trap 'kill $vpid 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do curl -s -o /dev/null http://127.0.0.1:$port/ && break; sleep 1; done
wrk -t1 -c${CONNS:-4} -d2s -s "$SHARED/wrk/$wl.lua" http://127.0.0.1:$port/ >/dev/null 2>&1
callgrind_control -z "$vpid" >/dev/null
res=$(wrk -t1 -c${CONNS:-4} -d8s -s "$SHARED/wrk/$wl.lua" http://127.0.0.1:$port/ 2>&1)
callgrind_control -d "$vpid" >/dev/null
sleep 1
kill "$vpid" 2>/dev/null; wait "$vpid" 2>/dev/null || true
[[ $started == 1 ]] && "$SHARED/backend.sh" stop >/dev/null
reqs=$(awk '/requests in/ {print $1}' <<<"$res")
total=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$label: $reqs requests, $total instructions, $(( total / reqs )) per request (profile: $out.1)"
