#!/usr/bin/env bash
# bench/slow.sh: slow backends (issue #16, the router's real case). Two backends on 127.0.0.1,
# 9201 answering at once and 9202 after 10 ms to 5 s (bench/slow/backend.conf, one nginx with
# ngx_lua), and 2,000 keep-alive clients (bench/slow/client.py) sending GET with X-Api-Key in
# a loop for DURATION seconds through each proxy in turn, pausing 0 to 2 * THINK_MS between
# requests (default 1000: ~2,000 req/s; with no pause the Python client saturates first and
# every latency is its own queue, see the client lag column):
#   direct           the fast backend alone, no proxy: the machine's and the client's own floor
#   luaproxy         least_conn (bench/slow/luaproxy.conf.lua)            127.0.0.1:8191
#   luaproxy-router  examples/api_router.lua (bench/slow/router.conf.lua) 127.0.0.1:8192
#   luaproxy-luajit  the LuaJIT build, least_conn, when target/luajit/lib/luaproxy.so exists  :8193
#   nginx-lua        nginx + ngx_lua, the peer harness's least-conn design (bench/slow/nginx-lua.conf) :8194
#   haproxy          HAProxy balance leastconn (bench/slow/haproxy.cfg)  127.0.0.1:8195
# and two reference rows without least connection, where the slow backend holds about half the
# clients at once (the harder case for head-of-line blocking):
#   luaproxy-rr      bench/slow/round_robin.lua                           127.0.0.1:8196
#   haproxy-rr       HAProxy balance roundrobin (the same haproxy.cfg)    127.0.0.1:8197
# One markdown table on stdout, a row per proxy: requests to the fast / slow backend (share),
# fast-backend latency p50/p99/max, slow-backend p50/p99, errors, non-2xx, client loop lag.
# No head-of-line blocking: fast p99 stays in milliseconds while slow answers take seconds.
# Least connection: the slow backend's share well below 50 %.
#
# Needs nginx, libnginx-mod-http-lua, haproxy (Debian), python3, luaproxy built (./luaproxy.so)
# and the peer harness (../shared/bench, for its peers/lua/textrazor.lua).
#   bench/slow.sh                                   every proxy, 2000 connections, 20 s each
#   PROXIES="luaproxy haproxy" DURATION=10 CONNS=500 THINK_MS=250 bench/slow.sh
# After each luaproxy and nginx-lua run it logs the balancer's in-flight counts (all 0 expected).
# Scratch files and per-proxy JSON summaries: $SLOW_VAR (default /tmp/luaproxy-slow-bench).
# Stops only what it started (by the PIDs it recorded), also on Ctrl-C or error.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
VAR=${SLOW_VAR:-/tmp/luaproxy-slow-bench}
CONNS=${CONNS:-2000}
DURATION=${DURATION:-20}
THINK_MS=${THINK_MS:-1000}
WORKERS=${PROXY_WORKERS:-2}
PROXIES=${PROXIES:-direct luaproxy luaproxy-router luaproxy-luajit nginx-lua haproxy luaproxy-rr haproxy-rr}
NGINX=/usr/sbin/nginx
HAPROXY=/usr/sbin/haproxy

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
port_busy() { ss -Hltn "sport = :$1" | grep -q .; }
wait_port() {
    local i
    for ((i = 0; i < ${2:-30} * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
# stop PID: TERM, up to 10 s, then KILL; luaproxy runs in its own session, so its group
stop() {
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$pid" || return 0; sleep 0.1; done
    log "pid $pid did not exit, SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

STARTED=()
cleanup() {
    local p
    for p in "${STARTED[@]}"; do stop "$p"; done
    STARTED=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for bin in $NGINX $HAPROXY python3; do command -v "$bin" >/dev/null || die "$bin is missing"; done
[[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ]] || die "libnginx-mod-http-lua is missing"
[[ -f luaproxy.so ]] || die "build luaproxy first (make install, or cargo build + cp libluaproxy.so luaproxy.so)"
# 2000 clients, as many proxy-side and upstream connections: every process started here
# inherits this (luaproxy also raises its own soft limit to the hard one)
ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 3 * CONNS + 100)) || die "ulimit -n $(ulimit -n) is too low for $CONNS connections"

mkdir -p "$VAR/backend/tmp" "$VAR/results"
for p in 9201 9202; do port_busy $p && die "port $p already in use (not ours?)"; done
"$NGINX" -p "$VAR/backend/" -c "$PWD/bench/slow/backend.conf" -e "$VAR/backend/error.log" \
    -g "worker_processes 2; pid $VAR/backend/nginx.pid;" || die "backend nginx did not start"
for _ in 1 2 3 4 5 6 7 8 9 10; do [[ -s $VAR/backend/nginx.pid ]] && break; sleep 0.1; done
STARTED+=("$(<"$VAR/backend/nginx.pid")")
wait_port 9201 10 && wait_port 9202 10 || die "backends did not come up ($VAR/backend/error.log)"
log "backends up: 9201 fast, 9202 slow (10 ms - 5 s)"

port_of() {
    case $1 in
    direct) echo 9201 ;; luaproxy) echo 8191 ;; luaproxy-router) echo 8192 ;; luaproxy-luajit) echo 8193 ;;
    nginx-lua) echo 8194 ;; haproxy) echo 8195 ;; luaproxy-rr) echo 8196 ;; haproxy-rr) echo 8197 ;; *) die "unknown proxy '$1'" ;;
    esac
}

# start NAME: starts the proxy, prints its PID (the group leader for luaproxy)
start() {
    local name=$1 d=$VAR/$1
    mkdir -p "$d/tmp"
    case $name in
    luaproxy | luaproxy-router | luaproxy-rr)
        local conf=bench/slow/luaproxy.conf.lua extra=()
        [[ $name == luaproxy-router ]] && conf=bench/slow/router.conf.lua
        [[ $name == luaproxy-rr ]] && extra=(--policy bench/slow/round_robin.lua --listen 127.0.0.1:8196)
        LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' setsid lua5.4 main.lua --config $conf \
            --workers "$WORKERS" "${extra[@]}" >"$d/out.log" 2>&1 </dev/null &
        echo $!
        ;;
    luaproxy-luajit)
        LUA_PATH='lua/?.lua;;' LUA_CPATH='target/luajit/lib/?.so;;' setsid luajit main.lua \
            --config bench/slow/luaproxy.conf.lua --listen 127.0.0.1:8193 --workers "$WORKERS" \
            >"$d/out.log" 2>&1 </dev/null &
        echo $!
        ;;
    nginx-lua)
        [[ -d $SHARED/peers/lua ]] || die "no peer harness at $SHARED (its peers/lua/textrazor.lua)"
        ln -sfn "$(cd "$SHARED/peers/lua" && pwd)" "$d/lua"
        "$NGINX" -p "$d/" -c "$PWD/bench/slow/nginx-lua.conf" -e "$d/error.log" \
            -g "worker_processes $WORKERS; pid $d/pid;" || die "nginx-lua did not start"
        for _ in 1 2 3 4 5 6 7 8 9 10; do [[ -s $d/pid ]] && break; sleep 0.1; done
        cat "$d/pid"
        ;;
    haproxy | haproxy-rr)
        local balance=leastconn port=8195
        [[ $name == haproxy-rr ]] && balance=roundrobin port=8197
        BALANCE=$balance PORT=$port PROXY_THREADS=$WORKERS "$HAPROXY" -D -p "$d/pid" -f bench/slow/haproxy.cfg >"$d/out.log" 2>&1 \
            || die "haproxy did not start: $(cat "$d/out.log")"
        for _ in 1 2 3 4 5 6 7 8 9 10; do [[ -s $d/pid ]] && break; sleep 0.1; done
        cat "$d/pid"
        ;;
    esac
}

header=--header
for name in $PROXIES; do
    if [[ $name == luaproxy-luajit && ! -f target/luajit/lib/luaproxy.so ]]; then
        log "skipping luaproxy-luajit: no target/luajit/lib/luaproxy.so (make luajit)"
        continue
    fi
    port=$(port_of "$name")
    pid=
    if [[ $name != direct ]]; then
        port_busy "$port" && die "port $port already in use (not ours?)"
        pid=$(start "$name")
        STARTED+=("$pid")
        wait_port "$port" 30 || die "$name did not come up on $port (see $VAR/$name/)"
    fi
    # check: a request answers 200 from a named backend, none without the key gets through
    ok=$(timeout 10 curl -s -o /dev/null -D - -H 'X-Api-Key: check' "http://127.0.0.1:$port/" | tr -d '\r' \
        | awk 'NR==1{s=$2} tolower($1)=="x-backend:"{b=$2} END{print s" "b}')
    nokey=$(timeout 10 curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)
    log "$name up on $port (pid $pid): with key -> $ok, without -> $nokey"
    timeout $((${DURATION%.*} + 60)) python3 bench/slow/client.py --port "$port" --label "$name" \
        --conns "$CONNS" --duration "$DURATION" --think-ms "$THINK_MS" $header \
        --slow-peak http://127.0.0.1:9202/_bench/peak --json "$VAR/results/$name.json"
    header=
    # every request has ended: the balancers' in-flight counts must be back at 0
    case $name in
    luaproxy-rr) ;;
    luaproxy*) log "$name in flight after the run: $(timeout 5 curl -s "http://127.0.0.1:$port/admin/backends/")" ;;
    nginx-lua) log "$name in flight after the run: $(timeout 5 curl -s "http://127.0.0.1:$port/_bench/inflight" | tr '\n' ' ')" ;;
    esac
    if [[ -n $pid ]]; then
        stop "$pid"
        unset 'STARTED[${#STARTED[@]}-1]'
    fi
    sleep 2   # let the closed connections' sockets settle before the next proxy
done
log "$CONNS connections, ${DURATION} s each, think time uniform 0-$((2 * THINK_MS)) ms; JSON in $VAR/results/"
