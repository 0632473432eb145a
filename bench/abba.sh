#!/usr/bin/env bash
# bench/abba.sh DIR_A DIR_B [BLOCKS] [WORKLOAD]: two luaproxy builds (checkouts with their
# luaproxy.so in place) in ABBA blocks, each run 2 workers behind `wrk -t2 -c100` for 6 s after
# 2 s of warm-up, against the peer harness's backends. Prints req/s and proxy CPU µs per request
# per run, then B/A per block (geometric means) and their median. ABBA because on this machine
# the second of two back-to-back runs is systematically slower: plain ABAB favoured A by ~10 %.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); blocks=${3:-4}; wl=${4:-post5k}
SHARED=${SHARED_BENCH:-$here/../shared/bench}
tck=$(getconf CLK_TCK); rows=$(mktemp)
started=0
if ! "$SHARED/backend.sh" status >/dev/null 2>&1; then "$SHARED/backend.sh" start >/dev/null; started=1; fi
run() {
    local label=$1 dir=$2 pid t0 t1 res
    cd "$dir"
    LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' lua5.4 main.lua --config bench/luaproxy.conf.lua --workers 2 >/dev/null 2>&1 &
    pid=$!
    trap "kill $pid 2>/dev/null || true" EXIT
    sleep 1
    wrk -t2 -c100 -d2s -s "$SHARED/wrk/$wl.lua" http://127.0.0.1:8090/ >/dev/null 2>&1
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    res=$(wrk -t2 -c100 -d6s -s "$SHARED/wrk/$wl.lua" http://127.0.0.1:8090/ 2>&1)
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    awk -v b="$blk" -v l="$label" -v t="$((t1 - t0))" -v tck="$tck" \
        '/requests in/ {n = $1} /Requests\/sec/ {r = $2} END {printf "%s %s %s %.2f\n", b, l, r, t * 1e6 / tck / n}' <<<"$res" | tee -a "$rows"
    sleep 2
}
for blk in $(seq 1 "$blocks"); do run A "$A"; run B "$B"; run B "$B"; run A "$A"; done
[[ $started == 1 ]] && "$SHARED/backend.sh" stop >/dev/null
python3 - "$rows" <<'PY'
import math, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    b, label, rps, cpu = line.split()
    runs.setdefault(b, {}).setdefault(label, []).append((float(rps), float(cpu)))
g = lambda xs, i: math.exp(sum(math.log(x[i]) for x in xs) / len(xs))
rps = [g(v["B"], 0) / g(v["A"], 0) for v in runs.values()]
cpu = [g(v["B"], 1) / g(v["A"], 1) for v in runs.values()]
print("B/A req/s per block", [round(x, 3) for x in rps], "median", round(statistics.median(rps), 3))
print("B/A CPU per request per block", [round(x, 3) for x in cpu], "median", round(statistics.median(cpu), 3))
PY
rm -f "$rows"
