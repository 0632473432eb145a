#!/usr/bin/env bash
# bench/all.sh: every workload of issue #16 in one command, every target in the same run.
#
# Starts the peer harness's backend (127.0.0.1:9101/9102; one that the harness already runs is
# used as it is), nginx+ngx_lua (8081) and HAProxy (8083) (plus nginx-plain 8082 / nginx-luabal
# 8084 if named in PEERS), and four luaproxy targets on ports of their own:
#   luaproxy-leastconn-lua54   8095  bench/luaproxy.conf.lua (examples/least_conn.lua), Lua 5.4
#   luaproxy-leastconn-luajit  8096  the same on the LuaJIT build (`make luajit`, run when the
#                                    build is missing or older than the sources)
#   luaproxy-router-lua54      8097  bench/router.conf.lua (examples/api_router.lua, access log
#                                    and metrics on: metrics 9147, its own access log file)
#   luaproxy-router-luajit     8098  the same on LuaJIT (metrics 9148, its own access log file)
# verifies each (400 without X-Api-Key, 200 with it, 5 KB POST body in and out, both backends
# used), warms each up, then runs ROUNDS rounds of the harness's run.sh (post5k and small; wrk
# -t2 -c100) over every target, the order rotated each round so no target always goes first,
# the proxy's CPU counted over all its processes and threads. Then it stops everything and
# runs bench/idle.sh and bench/slow.sh (other #16 workloads) if they exist, appending their
# markdown. Results: the tables on stdout and in $BENCH_VAR/results/all-TIMESTAMP.md, the raw
# run.sh rows in all-TIMESTAMP.tsv (bench/all_report.py makes the tables from them again).
#
# Needs: Debian nginx, libnginx-mod-http-lua, haproxy, wrk, luajit (see ../shared/bench), the
# Lua 5.4 build in ./luaproxy.so (`make install` or cargo build + cp) and python3.
#   bench/all.sh                                   the full run: ~12 min with ROUNDS=3
#   DURATION=2 ROUNDS=1 WARMUP=1 HOOKS= bench/all.sh   a smoke run, ~2 min
#   PEERS="nginx-lua haproxy nginx-plain" bench/all.sh  plain nginx as well
#   VARIANTS="leastconn-lua54 router-lua54" bench/all.sh  a subset of the luaproxy targets
# Environment: ROUNDS=3 DURATION=10 (1..15 s) CONNS=100 THREADS=2 WORKLOADS="post5k small"
#   WARMUP=2 (s per target and workload, 0: none) PROXY_WORKERS=2 BACKEND_WORKERS=2
#   PEERS="nginx-lua haproxy" VARIANTS=(all four) HOOKS="idle slow" HOOK_TIMEOUT=1800
#   IDLE_ENV, SLOW_ENV: settings for those scripts, e.g. IDLE_ENV="CONNS=2000" (they run
#   without this script's CONNS, DURATION, THREADS and WORKLOADS, which mean other things there)
#   PORT_WAIT=0 (s to wait for the ports to be free, e.g. while another run ends)
#   REUSE_BACKEND=1 (the harness's backend, when another script already runs it, is used and
#   left running; 0: wait for its ports like the others')
#   STRICT=1 (stop when a target fails verification; 0: benchmark it anyway)
# Everything listens on 127.0.0.1; every wrk run ends by itself (-d plus a timeout guard); on
# exit, failure or Ctrl-C it stops only what it started (by the PIDs it recorded).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=$(cd "${SHARED_BENCH:-../shared/bench}" && pwd)
[[ -x $SHARED/run.sh ]] || { echo "no peer harness at $SHARED" >&2; exit 1; }
# log, die, port_busy, wait_port, alive, stop_pgroup; VAR = $BENCH_VAR (or the harness's default)
. "$SHARED/lib.sh"

ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
PEERS=${PEERS:-nginx-lua haproxy}
VARIANTS=${VARIANTS:-leastconn-lua54 leastconn-luajit router-lua54 router-luajit}
HOOKS=${HOOKS-idle slow}
HOOK_TIMEOUT=${HOOK_TIMEOUT:-1800}
PORT_WAIT=${PORT_WAIT:-0}
STRICT=${STRICT:-1}
REUSE_BACKEND=${REUSE_BACKEND:-1}
STALE_NOTE=""
export CONNS=${CONNS:-100} THREADS=${THREADS:-2} DURATION=${DURATION:-10}
export WORKLOADS=${WORKLOADS:-post5k small}
export PROXY_WORKERS=${PROXY_WORKERS:-2} BACKEND_WORKERS=${BACKEND_WORKERS:-2}
((DURATION >= 1 && DURATION <= 15)) || die "DURATION must be 1..15 s"
((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20"
((WARMUP >= 0 && WARMUP <= 15)) || die "WARMUP must be 0..15 s"
[[ " $PEERS " == *" nginx-lua "* && " $PEERS " == *" haproxy "* ]] ||
    log "PEERS lacks nginx-lua or haproxy: the ratio columns to it will be empty"

TS=$(date +%Y%m%d-%H%M%S)
OUT=$VAR/results
LP=$VAR/luaproxy-all          # per luaproxy target: its config, output, access log, pid
mkdir -p "$OUT" "$LP" "$VAR/hooks"
TSV=$OUT/all-$TS.tsv
MD=$OUT/all-$TS.md

# ---- the luaproxy targets -------------------------------------------------------------------
declare -A PORT PIDS
# not 8090 and 9146, which bench/peers.sh and other scripts use
declare -A VPORT=([leastconn-lua54]=8095 [leastconn-luajit]=8096 [router-lua54]=8097 [router-luajit]=8098)
declare -A VMETRICS=([router-lua54]=9147 [router-luajit]=9148)
for v in $VARIANTS; do [[ -n ${VPORT[$v]:-} ]] || die "unknown variant '$v' (known: ${!VPORT[*]})"; done

STARTED=()            # peer names we started
LP_STARTED=()         # luaproxy variants we started
BACKEND_STARTED=0
HOOK_PID=""
stop_proxies() {
    local v p
    for v in "${LP_STARTED[@]}"; do stop_pgroup "$LP/$v/pid"; done
    LP_STARTED=()
    for p in "${STARTED[@]}"; do "$BENCH/proxy.sh" stop "$p" || true; done
    STARTED=()
    if ((BACKEND_STARTED)); then "$BENCH/backend.sh" stop || true; BACKEND_STARTED=0; fi
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $HOOK_PID ]]; then echo "$HOOK_PID" >"$VAR/hooks/pid"; stop_pgroup "$VAR/hooks/pid"; fi
    stop_pgroup "$VAR/run-all.pid"
    stop_proxies
    log "stopped everything this run started"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- refuse to run on top of something else ------------------------------------------------
# The harness's backend nginx, when another script of the harness already runs it (same
# $BENCH_VAR), is used as it is and left running (REUSE_BACKEND=0: wait for it to go instead).
backend_reusable() { [[ $REUSE_BACKEND == 1 ]] && "$BENCH/backend.sh" status >/dev/null 2>&1; }
for p in $PEERS; do PORT[$p]=$("$BENCH/proxy.sh" port "$p"); done
ports=""
for p in $PEERS; do ports+=" ${PORT[$p]}"; done
for v in $VARIANTS; do ports+=" ${VPORT[$v]} ${VMETRICS[$v]:-}"; done
for ((waited = 0; ; waited += 5)); do
    busy="" check=$ports
    backend_reusable || check+=" 9101 9102"
    for port in $check; do if port_busy "$port"; then busy+=" $port"; fi; done
    [[ -z $busy ]] && break
    ((waited < PORT_WAIT)) || die "ports in use:$busy (another benchmark running?); stop it first or set PORT_WAIT"
    if ((waited % 60 == 0)); then log "ports in use:$busy; waiting (up to ${PORT_WAIT}s)"; fi
    sleep 5
done
T0=$(date +%s)

# newer_sources SO: the first Rust source or manifest newer than the build SO (none: up to date)
newer_sources() { find src Cargo.toml Cargo.lock -newer "$1" 2>/dev/null | head -1 || true; }
if [[ " $VARIANTS " == *luajit* ]]; then
    if [[ ! -f target/luajit/lib/luaproxy.so || -n $(newer_sources target/luajit/lib/luaproxy.so) ]]; then
        log "building the LuaJIT build (make luajit): missing or older than the sources"
        make luajit >&2
    fi
fi
if [[ " $VARIANTS " == *lua54* ]]; then
    [[ -f luaproxy.so ]] || die "no ./luaproxy.so (the Lua 5.4 build): make install, or cargo build --release + cp"
    stale=$(newer_sources luaproxy.so)
    if [[ -n $stale ]]; then
        STALE_NOTE="WARNING: ./luaproxy.so is older than $stale: the Lua 5.4 figures are of an older build (make install)"
        log "$STALE_NOTE"
    fi
fi

# ---- start ----------------------------------------------------------------------------------
BACKEND_NOTE="started by this run"
if backend_reusable; then
    BACKEND_NOTE="already running (pid $(<"$VAR/backend/nginx.pid")), used as it is and left running"
    log "backend $BACKEND_NOTE"
else
    BACKEND_STARTED=1
    "$BENCH/backend.sh" start
fi
BPID=$(<"$VAR/backend/nginx.pid")
for p in $PEERS; do
    STARTED+=("$p")
    "$BENCH/proxy.sh" start "$p"
    master=$("$BENCH/proxy.sh" pid "$p")
    # every process of the peer (run.sh also counts a PID's descendants)
    PIDS[$p]="$master $(pgrep -P "$master" | tr "\n" " " || true)"
done

start_variant() {
    local v=$1 port=${VPORT[$1]} d=$LP/$1 conf lua cpath
    mkdir -p "$d"
    case $v in
    leastconn-*) conf=bench/luaproxy.conf.lua ;;
    router-*) conf=bench/router.conf.lua ;;
    esac
    case $v in
    *-luajit) lua=luajit cpath='target/luajit/lib/?.so;;' ;;
    *) lua=lua5.4 cpath='./?.so;;' ;;
    esac
    # its own port, metrics port and access log: the same settings otherwise
    sed -e "s|^\( *listen = \)\"[^\"]*\"|\1\"127.0.0.1:$port\"|" \
        -e "s|^\( *metrics_listen = \)\"[^\"]*\"|\1\"127.0.0.1:${VMETRICS[$v]:-0}\"|" \
        -e "s|^\( *access_log = \)\"[^\"]*\"|\1\"$d/access.log\"|" "$conf" >"$d/conf.lua"
    grep -q "127.0.0.1:$port\"" "$d/conf.lua" || die "$v: could not set listen in $d/conf.lua"
    if [[ -n ${VMETRICS[$v]:-} ]]; then
        grep -q "$d/access.log" "$d/conf.lua" && grep -q ":${VMETRICS[$v]}\"" "$d/conf.lua" ||
            die "$v: could not set access_log/metrics_listen in $d/conf.lua"
    fi
    rm -f "$d/access.log"
    LP_STARTED+=("$v")
    # own process group (setsid) so that stopping it reaches every thread and child
    setsid env LUA_PATH='lua/?.lua;;' LUA_CPATH="$cpath" "$lua" main.lua --config "$d/conf.lua" \
        --workers "$PROXY_WORKERS" >"$d/output.log" 2>&1 </dev/null &
    echo $! >"$d/pid"
    wait_port "$port" 30 || { tail -20 "$d/output.log" >&2; die "luaproxy-$v did not listen on $port within 30 s"; }
    PORT[luaproxy-$v]=$port
    PIDS[luaproxy-$v]=$(<"$d/pid")
    log "luaproxy-$v up: pid ${PIDS[luaproxy-$v]}, port $port ($lua, $conf${VMETRICS[$v]:+, metrics ${VMETRICS[$v]}, access log $d/access.log})"
}
TARGETS=()
for p in $PEERS; do TARGETS+=("$p"); done
for v in $VARIANTS; do start_variant "$v"; TARGETS+=("luaproxy-$v"); done

# ---- verify ---------------------------------------------------------------------------------
body5k=$VAR/body5k.bin
head -c 5120 /dev/zero | tr '\0' x >"$body5k"
VERIFY=$OUT/all-verify-$TS.txt
: >"$VERIFY"
bad=0
for t in "${TARGETS[@]}"; do
    url=http://$HOST:${PORT[$t]}
    nokey=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$url/" || echo ERR)
    small=$(curl -s -o /dev/null -m 5 -H "X-Api-Key: $API_KEY" -w '%{http_code}/%{size_download}' "$url/small" || echo ERR)
    post=$(curl -s -o /dev/null -m 5 -H "X-Api-Key: $API_KEY" -X POST --data-binary @"$body5k" \
        -w '%{http_code}/%{size_download}/%{size_upload}' "$url/" || echo ERR)
    a=$(count_lines "$VAR/backend/be9101.log"); b=$(count_lines "$VAR/backend/be9102.log")
    for _ in $(seq 40); do curl -s -o /dev/null -m 5 -H "X-Api-Key: $API_KEY" "$url/small" || true; done
    sleep 1.5   # the backend's access log flushes every second
    a=$(($(count_lines "$VAR/backend/be9101.log") - a)); b=$(($(count_lines "$VAR/backend/be9102.log") - b))
    extra="" ok=1
    [[ $nokey == 400 && $small == 200/100 && $post == 200/5120/5120 && $a -gt 0 && $b -gt 0 ]] || ok=0
    v=${t#luaproxy-}
    if [[ $t == luaproxy-* && -n ${VMETRICS[$v]:-} ]]; then
        metrics=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://$HOST:${VMETRICS[$v]}/metrics" || echo ERR)
        logged=$(count_lines "$LP/$v/access.log")
        extra=" metrics=$metrics access-log-lines=$logged"
        [[ $metrics == 200 && $logged -ge 40 ]] || ok=0
    fi
    verdict=PASS; ((ok)) || { verdict=FAIL; bad=1; }
    echo "verify $t (port ${PORT[$t]}): no-key=$nokey small=$small post5k=$post (code/down/up) seq40-split=$a/$b$extra -> $verdict" |
        tee -a "$VERIFY" >&2
done
((bad == 0 || STRICT == 0)) || die "a target failed verification (STRICT=0 benchmarks it anyway); see $VERIFY"

# ---- warm-up (not recorded): LuaJIT compiles its traces, pools fill ----------------------
if ((WARMUP > 0)); then
    for t in "${TARGETS[@]}"; do
        for w in $WORKLOADS; do
            API_KEY=$API_KEY timeout $((WARMUP + 20)) wrk -t"$THREADS" -c"${CONNS%% *}" -d"${WARMUP}s" \
                -s "$BENCH/wrk/$w.lua" "http://$HOST:${PORT[$t]}/" >/dev/null 2>&1 || true
        done
    done
    log "warm-up done (${WARMUP}s per target and workload)"
fi

# ---- rounds: every target once per round, the starting target moving each round ------------
n=${#TARGETS[@]}
step=$((n / ROUNDS)); ((step >= 1)) || step=1
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
"$BENCH/run.sh" --header >"$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
    start=$(((round - 1) * step % n))
    order=()
    for ((i = 0; i < n; i++)); do order+=("${TARGETS[(start + i) % n]}"); done
    log "round $round/$ROUNDS: ${order[*]}"
    for t in "${order[@]}"; do
        # in the background, so that Ctrl-C or TERM stops the run at once
        ROUND=$round CPU_PIDS="${PIDS[$t]}" BACKEND_PIDS="$BPID" BACKEND_LOG_DIR="$VAR/backend" \
            setsid "$BENCH/run.sh" "${PORT[$t]}" "$t" >"$VAR/run-all.out" &
        echo $! >"$VAR/run-all.pid"
        wait "$!" || log "run.sh failed for $t"
        rm -f "$VAR/run-all.pid"
        cat "$VAR/run-all.out" >>"$TSV"
        sed 's/^/    /' "$VAR/run-all.out" >&2
        # the router's access log: a line per request; keep the disk use bounded
        if [[ $t == luaproxy-router-* ]]; then : >"$LP/${t#luaproxy-}/access.log"; fi
    done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
T_MAIN=$(($(date +%s) - T0))
stop_proxies

# ---- tables ----------------------------------------------------------------------------------
{
    echo "## bench/all.sh run $TS"
    echo
    echo "- date: $(date -R); checkout $(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet HEAD -- src lua main.lua examples 2>/dev/null || echo ' (modified)')"
    echo "- machine: nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r); load average (1/5/15 min) $LOAD0 before the rounds, $LOAD1 after"
    echo "- wrk -t$THREADS -c{$CONNS} -d${DURATION}s --latency, workloads: $WORKLOADS; $ROUNDS rounds, each target once per round, the order rotated by $step each round; warm-up ${WARMUP}s per target and workload"
    echo "- every proxy: $PROXY_WORKERS workers/threads; backend nginx ($BACKEND_NOTE): $BACKEND_WORKERS workers; nothing pinned (wrk, backend and proxy share the $(nproc) CPUs)"
    echo "- luaproxy: $(lua5.4 -v 2>&1 | awk '{print $1, $2; exit}'), $(luajit -v 2>&1 | awk '{print $1, $2; exit}'); leastconn = bench/luaproxy.conf.lua, router = bench/router.conf.lua (access log to a file and metrics on)"
    echo "- rounds took ${T_MAIN}s (with start, verification and warm-up)"
    [[ -z $STALE_NOTE ]] || echo "- **$STALE_NOTE**"
    echo
    echo "Verification:"
    echo
    sed 's/^/    /' "$VERIFY"
    echo
    echo "Medians over the rounds; ratios = the target's median ÷ the peer's median, same run;"
    echo "req/CPU-s = requests per CPU-second of the proxy's processes (user+sys; on loopback the"
    echo "kernel charges TCP receive work to the sender: approximate, the same for everyone);"
    echo "errors = non-2xx + socket errors over all rounds."
    echo
    python3 bench/all_report.py "$TSV"
} >"$MD"
cat "$MD"

# ---- the other #16 workloads: each starts (and stops) what it needs on the same ports ---------
for h in $HOOKS; do
    script=bench/$h.sh
    if [[ -x $script ]]; then
        log "running $script (up to ${HOOK_TIMEOUT}s)"
        t=$(date +%s)
        # own process group: the trap stops it (and what it started) on Ctrl-C or TERM
        # their CONNS, DURATION... mean other things: not ours, but ${NAME}_ENV (IDLE_ENV="CONNS=2000")
        envvar=${h^^}_ENV
        # shellcheck disable=SC2086 # word splitting of NAME=VALUE pairs wanted
        setsid timeout "$HOOK_TIMEOUT" env -u CONNS -u DURATION -u THREADS -u WORKLOADS ${!envvar:-} \
            "$script" >"$VAR/hooks/$h.out" &
        HOOK_PID=$!
        rc=0; wait "$HOOK_PID" || rc=$?
        HOOK_PID=""
        status="$(($(date +%s) - t)) s"
        ((rc == 0)) || status+=", exit $rc"
        [[ -z ${!envvar:-} ]] || status+=", ${!envvar}"
        printf '\n## %s (%s)\n\n' "$script" "$status" >>"$MD"
        cat "$VAR/hooks/$h.out" >>"$MD"
        printf '\n## %s (%s)\n\n' "$script" "$status"
        cat "$VAR/hooks/$h.out"
    else
        printf '\n## %s: not in this checkout, skipped\n' "$script" | tee -a "$MD"
    fi
done

log "took $(($(date +%s) - T0))s"
log "raw rows: $TSV"
log "tables:   $MD"
