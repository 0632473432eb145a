#!/usr/bin/env bash
# bench/peers.sh: the seed workload (POST 5 KB in / 5 KB out, two backends, least connection,
# X-Api-Key required else 400) and a small GET, through luaproxy and, in the same run, the peers
# of ../shared/bench (nginx+ngx_lua, nginx+balancer_by_lua, plain nginx, HAProxy).
# One luaproxy build and policy per run. For issue #16's tables (least_conn and the router, each
# on Lua 5.4 and LuaJIT, beside nginx+ngx_lua and HAProxy in ONE run, medians of alternating
# rounds, the goals checked) use bench/all.sh; this script is for a quick look at one variant
# or at every peer (plain nginx, balancer_by_lua).
#
# Needs: Debian nginx, libnginx-mod-http-lua, haproxy, wrk (installed here if missing), and
# luaproxy built (`make install`). Everything listens on 127.0.0.1 and stops by itself.
#   bench/peers.sh                       all peers, ROUNDS=2
#   PEERS="nginx-lua" ROUNDS=4 bench/peers.sh
#   PIN=1 bench/peers.sh                 proxy alone on CPU 1, wrk + backend on CPU 0
#   LUAPROXY_LUA=luajit bench/peers.sh   luaproxy's LuaJIT build (make luajit) instead of Lua 5.4
#   ROUTER=1 bench/peers.sh              examples/api_router.lua with its access log and metrics
#                                        on (bench/router.conf.lua) instead of least_conn
# Results: the markdown table on stdout; raw rows under $BENCH_VAR (see ../shared/bench/README.md).
# The timeline cache (issue #14, examples/timeline_cache.lua beside nginx + ngx_lua) has a
# workload of its own on the same machinery: bench/timeline.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
[[ -x $SHARED/peers.sh ]] || { echo "no peer harness at $SHARED" >&2; exit 1; }

need=""
for p in nginx libnginx-mod-http-lua haproxy wrk; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [[ -n $need ]]; then
    SUDO=$([[ $(id -u) == 0 ]] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need
fi
# Debian starts an nginx on port 80 after installing it; the harness uses its own instances.

workers=${PROXY_WORKERS:-2}
conf=bench/luaproxy.conf.lua
[[ ${ROUTER:-0} == 1 ]] && conf=bench/router.conf.lua
[[ ${PIN:-0} == 1 ]] && workers=1
if [[ ${LUAPROXY_LUA:-lua5.4} == luajit ]]; then
    # The LuaJIT build of the same crate (what OpenResty runs its Lua on): `make luajit`.
    [[ -f target/luajit/lib/luaproxy.so ]] || make luajit >&2
    cmd="exec env LUA_PATH='lua/?.lua;;' LUA_CPATH='target/luajit/lib/?.so;;' luajit main.lua --config $conf --workers $workers"
    label=luaproxy-luajit
else
    cmd="exec env LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' lua5.4 main.lua --config $conf --workers $workers"
    label=luaproxy
fi
[[ ${ROUTER:-0} == 1 ]] && label=$label-router
EXTRA_LABEL=$label EXTRA_PORT=8090 exec "$SHARED/peers.sh" "$cmd"
