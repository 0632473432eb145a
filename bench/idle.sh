#!/usr/bin/env bash
# bench/idle.sh: memory per idle keep-alive client connection (issue #16), luaproxy beside
# nginx+ngx_lua and HAProxy in the same run. For each proxy, one after another: start it (2
# workers / threads), run bench/idle_client.py (warm-up; memory; CONNS keep-alive connections
# with ONE request each, post5k and small GET alternately, over both backends; all held idle
# HOLD seconds; memory again; a second request on every connection; close), stop it. Prints a
# markdown table: proxy | connections | errors | memory before | after | per connection.
# Memory = the sum of Pss (/proc/PID/smaps_rollup) over the proxy's processes; Private and Rss
# are in the raw lines (stderr and $OUT).
#
#   bench/idle.sh                          10,000 connections, every proxy
#   CONNS=2000 PROXIES="luaproxy" bench/idle.sh
#   LUAPROXY_LUA=luajit bench/idle.sh      the LuaJIT build too (`make luajit`; also when
#                                          target/luajit/lib/luaproxy.so exists)
#
# Ports 8181 (nginx+ngx_lua), 8183 (HAProxy), 8190 (luaproxy): not the harness's, so a peer
# benchmark another checkout runs at the same time is left alone (the harness's backends on
# 9101/9102 are shared: started here only if not running, and then stopped here).
# Peers' own caps: the harness's haproxy.cfg says `maxconn 5000` (global and defaults), so
# HAProxy runs from a copy with both raised to CONNS+1000 and `no strict-limits` (its wish for 2
# descriptors per connection is above the hard limit of 20,000 here); nginx-lua.conf has
# worker_connections 8192 per worker (2 workers: room for 16,384 client and upstream
# connections in all, if the kernel spreads the clients evenly enough), kept. luaproxy uses
# bench/idle.conf.lua (max_connections 50000, keepalive_timeout 300 s). The open-files soft
# limit is raised to the hard one (the peers inherit it). Everything on 127.0.0.1; each client
# run is bounded by `timeout`; only the processes started here are stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
[[ -x $SHARED/backend.sh ]] || { echo "no peer harness at $SHARED" >&2; exit 1; }
CONNS=${CONNS:-10000}
HOLD=${HOLD:-3}
WORKLOAD=${WORKLOAD:-mixed}
PROXIES=${PROXIES:-nginx-lua haproxy luaproxy}
if [[ ${LUAPROXY_LUA:-} == luajit || -f target/luajit/lib/luaproxy.so ]] && [[ $PROXIES != *luajit* ]]; then
    PROXIES="$PROXIES luaproxy-luajit"
fi
ulimit -n "$(ulimit -Hn)"
(( CONNS + 200 <= $(ulimit -n) )) || { echo "open-files limit $(ulimit -n) too low for CONNS=$CONNS" >&2; exit 1; }
scratch=$(mktemp -d "${TMPDIR:-/tmp}/luaproxy-idle.XXXXXX")
chmod 755 "$scratch"    # nginx's workers run as nobody and read the Lua under it
OUT=${OUT:-$scratch/idle.txt}
started_backend=0
lp_pid=""
hap_pid=""
nginx_pid=""

cleanup() {
    [[ -n $lp_pid ]] && { kill "$lp_pid" 2>/dev/null || true; wait "$lp_pid" 2>/dev/null || true; }
    [[ -n $hap_pid ]] && { kill "$hap_pid" 2>/dev/null || true; }
    [[ -n $nginx_pid ]] && { kill "$nginx_pid" 2>/dev/null || true; }
    [[ $started_backend == 1 ]] && "$SHARED/backend.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

# stop_wait PID: TERM it, wait up to 10 s for it to go, then KILL it
stop_wait() {
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
}

wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2; return 1
}

for port in 8181 8183 8190; do
    ! ss -Hltn "sport = :$port" | grep -q . || { echo "port $port is in use" >&2; exit 1; }
done
if ! "$SHARED/backend.sh" status >/dev/null 2>&1; then "$SHARED/backend.sh" start; started_backend=1; fi

# measure LABEL PORT PID: one client run; appends "LABEL IDLERESULT ..." to $OUT
measure() {
    local line
    line=$(timeout $((HOLD + 240)) python3 bench/idle_client.py "$2" "$3" --conns "$CONNS" \
        --hold "$HOLD" --workload "$WORKLOAD" | grep IDLERESULT) || line="IDLERESULT failed=1"
    echo "$1 $line" | tee -a "$OUT" >&2
}

for p in $PROXIES; do
    case $p in
    nginx-lua)
        # the harness's proxy.sh start, on port 8181 and from this run's own prefix
        mkdir -p "$scratch/nginx-lua/tmp"
        ln -sfn "$(cd "$SHARED" && pwd)/peers/lua" "$scratch/nginx-lua/lua"
        sed "s/listen 127.0.0.1:8081/listen 127.0.0.1:8181/" "$SHARED/peers/nginx-lua.conf" \
            >"$scratch/nginx-lua.conf"
        /usr/sbin/nginx -p "$scratch/nginx-lua/" -c "$scratch/nginx-lua.conf" -e "$scratch/nginx-lua/error.log" \
            -g "worker_processes 2; pid $scratch/nginx-lua/pid;"
        wait_port 8181
        for _ in $(seq 1 50); do [[ -s $scratch/nginx-lua/pid ]] && break; sleep 0.1; done
        nginx_pid=$(<"$scratch/nginx-lua/pid")
        measure nginx-lua 8181 "$nginx_pid"
        stop_wait "$nginx_pid"; nginx_pid=""
        ;;
    haproxy)
        # `no strict-limits`: HAProxy sizes its descriptors for 2 per connection (a client and a
        # server side), above the hard limit here; idle clients need one each.
        sed -e "s/maxconn 5000/maxconn $((CONNS + 1000))/" -e "s/^global$/global\n    no strict-limits/" \
            -e "s/bind 127.0.0.1:8083/bind 127.0.0.1:8183/" \
            "$SHARED/peers/haproxy.cfg" >"$scratch/haproxy.cfg"
        PROXY_THREADS=2 /usr/sbin/haproxy -D -p "$scratch/haproxy.pid" -f "$scratch/haproxy.cfg" \
            >"$scratch/haproxy.log" 2>&1 || { cat "$scratch/haproxy.log" >&2; exit 1; }
        wait_port 8183
        hap_pid=$(<"$scratch/haproxy.pid")
        measure haproxy 8183 "$hap_pid"
        stop_wait "$hap_pid"; hap_pid=""
        ;;
    luaproxy | luaproxy-luajit)
        if [[ $p == luaproxy-luajit ]]; then
            [[ -f target/luajit/lib/luaproxy.so ]] || make luajit >&2
            LUA_PATH='lua/?.lua;;' LUA_CPATH='target/luajit/lib/?.so;;' luajit main.lua \
                --config bench/idle.conf.lua --workers 2 >"$scratch/$p.log" 2>&1 &
        else
            LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' lua5.4 main.lua \
                --config bench/idle.conf.lua --workers 2 >"$scratch/$p.log" 2>&1 &
        fi
        lp_pid=$!
        wait_port 8190
        measure "$p" 8190 "$lp_pid"
        kill "$lp_pid"; wait "$lp_pid" 2>/dev/null || true; lp_pid=""
        ;;
    *) echo "unknown proxy $p" >&2; exit 2 ;;
    esac
    sleep 1
done

echo
echo "$CONNS idle keep-alive connections, one request each ($WORKLOAD), held ${HOLD} s; memory = Pss summed over the proxy's processes"
echo
echo "| proxy | connections | errors | memory before | after | per connection |"
echo "|---|---:|---:|---:|---:|---:|"
while read -r label _ rest; do
    declare -A f=()
    for kv in $rest; do f[${kv%%=*}]=${kv#*=}; done
    if [[ -n ${f[failed]:-} ]]; then echo "| $label | failed | | | | |"; continue; fi
    per=$(( (f[pss_after] - f[pss_before]) / (f[conns] > 0 ? f[conns] : 1) ))
    printf '| %s | %s | %s | %.1f MB | %.1f MB | %d B (%.1f KB) |\n' "$label" "${f[conns]}" \
        "${f[errors]}" "$(bc -l <<<"${f[pss_before]} / 1048576")" "$(bc -l <<<"${f[pss_after]} / 1048576")" \
        "$per" "$(bc -l <<<"$per / 1024")"
    unset f
done <"$OUT"
echo
echo "raw: $OUT" >&2
