#!/usr/bin/env bash
# bench/reload.sh: issue #12's stop-and-reload acceptance under load, against the peer
# harness's nginx backends (started here if not running).
#   1. wrk -t2 -c50 POSTs 5 KB (post5k) for RELOAD_SECONDS (20) while a loop sends SIGHUP
#      every RELOAD_EVERY (2) s, after touching the policy; the same wrk run without reloads
#      comes first, for the latency beside it. Passes with 0 socket errors, 0 non-2xx and a
#      "reloaded" log line per SIGHUP.
#   2. 10 requests that take 2 s (/slow) are in flight when SIGTERM comes: all 10 must answer
#      200 and the process must exit 0.
# Prints a markdown table for BENCHMARKS.md; exit 1 if a check fails.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED_BENCH:-$here/../shared/bench}
SECS=${RELOAD_SECONDS:-20}; EVERY=${RELOAD_EVERY:-2}; PORT=${RELOAD_PORT:-8093}
out=$(mktemp -d /tmp/reload.XXXXXX)
started=0
if ! "$SHARED/backend.sh" status >/dev/null 2>&1; then "$SHARED/backend.sh" start >/dev/null; started=1; fi
cd "$here"
policy=$out/reload_policy.lua
cp bench/reload_policy.lua "$policy"
cat >"$out/conf.lua" <<CONF
return { listen = "127.0.0.1:$PORT", backends = { "127.0.0.1:9101", "127.0.0.1:9102" },
         policy = "$policy", workers = 2, keepalive_requests = 1000000, log_level = "notice" }
CONF
pid=
cleanup() {
    [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null
    [[ $started == 1 ]] && "$SHARED/backend.sh" stop >/dev/null
}
trap cleanup EXIT
start_proxy() {
    LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' lua5.4 main.lua --config "$out/conf.lua" >"$out/$1.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && return 0; sleep 0.05; done
    echo "proxy did not start"; cat "$out/$1.log"; exit 1
}
run_wrk() { # label, hup(0/1)
    start_proxy "$1"
    local hups=0 loop=
    if [[ $2 == 1 ]]; then
        ( for _ in $(seq 1 $((SECS / EVERY - 1))); do sleep "$EVERY"; touch "$policy"; kill -HUP "$pid"; done ) &
        loop=$!
        hups=$((SECS / EVERY - 1))
    fi
    wrk -t2 -c50 -d"${SECS}s" --latency -H 'X-Api-Key: bench' -s "$SHARED/wrk/post5k.lua" \
        "http://127.0.0.1:$PORT/" >"$out/$1.wrk" 2>&1
    [[ -n $loop ]] && wait "$loop"
    sleep 0.5
    kill -TERM "$pid"; wait "$pid"; local code=$?; pid=
    local reloaded failed rps p50 p99 max errs non2xx
    reloaded=$(grep -c "reloaded: policy" "$out/$1.log")
    failed=$(grep -c "reload failed" "$out/$1.log")
    rps=$(awk '/Requests\/sec/ {print $2}' "$out/$1.wrk")
    p50=$(awk '$1 == "50%" {print $2}' "$out/$1.wrk"); p99=$(awk '$1 == "99%" {print $2}' "$out/$1.wrk")
    max=$(awk '/Latency/ && !/Distribution/ {print $4; exit}' "$out/$1.wrk")
    errs=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$out/$1.wrk"); errs=${errs:-0}
    non2xx=$(awk '/Non-2xx/ {print $5}' "$out/$1.wrk"); non2xx=${non2xx:-0}
    echo "| $1 | $hups | $reloaded | $failed | $rps | $p50 | $p99 | $max | $errs | $non2xx | $code |"
    [[ $errs == 0 && $non2xx == 0 && $reloaded == "$hups" && $failed == 0 && $code == 0 ]]
}
ok=0
echo "| run | SIGHUPs | reloaded | failed | req/s | p50 | p99 | max | socket errors | non-2xx | exit |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
run_wrk "no reload" 0 || ok=1
run_wrk "SIGHUP every ${EVERY}s" 1 || ok=1

start_proxy drain
for i in $(seq 1 10); do
    curl -s -o /dev/null -w "%{http_code}\n" -m 10 -H 'X-Api-Key: bench' "http://127.0.0.1:$PORT/slow" >"$out/slow.$i" &
done
sleep 0.5
t0=$(date +%s.%N)
kill -TERM "$pid"; wait "$pid"; code=$?; pid=
took=$(echo "$(date +%s.%N) - $t0" | bc)
wait
oks=$(cat "$out"/slow.* | grep -c '^200$')
echo
echo "SIGTERM with 10 slow (2 s) requests in flight: $oks of 10 answered 200; exit status $code after ${took%???????} s"
[[ $oks == 10 && $code == 0 ]] || ok=1
echo "(logs and wrk output: $out)"
exit $ok
