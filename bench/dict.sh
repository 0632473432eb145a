#!/usr/bin/env bash
# bench/dict.sh: shared-dict operations per second from Lua, luaproxy.shared against
# ngx.shared.DICT inside Debian's nginx + ngx_lua, in the same run, with 1 and 2 workers
# (2 = both CPUs hammering the same dict). Both sides run the same loops (bench/dict_ops.lua):
# get over 1000 keys, set over them (32-byte values), incr on one hot counter; luaproxy.cache
# get/set ride along. luaproxy is measured on its Lua 5.4 build and on a LuaJIT build (nginx's
# Lua is LuaJIT).
#   bench/dict.sh                 ROUNDS=3, SECONDS_PER_OP=1
# Needs nginx, libnginx-mod-http-lua, luajit2 (installed here if missing) and `make install`
# (or ./luaproxy.so). Everything listens on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_OP:-1}
PORT=${DICT_BENCH_PORT:-8095}

need=""
for p in nginx libnginx-mod-http-lua luajit2; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [[ -n $need ]]; then
    SUDO=$([[ $(id -u) == 0 ]] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need
fi
cargo build --quiet --release --locked --no-default-features --features luajit,module --target-dir target/luajit
mkdir -p target/luajit/lib
cp target/luajit/release/libluaproxy.so target/luajit/lib/luaproxy.so
[[ -f luaproxy.so ]] || { cargo build --quiet --release --locked --no-default-features --features lua54,module; cp target/release/libluaproxy.so luaproxy.so; }

VAR=$(mktemp -d "${TMPDIR:-/tmp}/luaproxy-dict-bench.XXXXXX")
trap '[[ -f $VAR/nginx.pid ]] && kill "$(cat "$VAR/nginx.pid")" 2>/dev/null; rm -rf "$VAR"' EXIT

nginx_run() { # workers -> "get=N set=N incr=N"
    local w=$1
    cat > "$VAR/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes $w;
pid $VAR/nginx.pid;
error_log $VAR/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    lua_package_path "$PWD/bench/?.lua;;";
    lua_shared_dict bench 64m;
    lua_shared_dict ctl 1m;
    init_worker_by_lua_block {
        ngx.timer.at(0, function()
            require("dict_ops").run(ngx.shared.bench, ngx.shared.ctl,
                function() ngx.update_time() return ngx.now() end, ngx.sleep,
                ngx.worker.count(), $SECS)
        end)
    }
    server {
        listen 127.0.0.1:$PORT;
        location /results {
            content_by_lua_block {
                local ctl = ngx.shared.ctl
                if (ctl:get("done") or 0) < ngx.worker.count() then return ngx.exit(503) end
                ngx.say(string.format("get=%.0f set=%.0f incr=%.0f counter=%d",
                    ctl:get("ops:get"), ctl:get("ops:set"), ctl:get("ops:incr"),
                    ngx.shared.bench:get("counter")))
            }
        }
    }
}
CONF
    nginx -p "$VAR" -c "$VAR/nginx.conf" -e "$VAR/error.log"
    local out=""
    for _ in $(seq 200); do
        out=$(curl -s -f -m 2 "http://127.0.0.1:$PORT/results" || true)
        [[ -n $out ]] && break
        sleep 0.1
    done
    [[ -f $VAR/nginx.pid ]] && kill "$(cat "$VAR/nginx.pid")"
    for _ in $(seq 50); do [[ -f $VAR/nginx.pid ]] || break; sleep 0.1; done
    [[ -n $out ]] || { echo "nginx run failed:" >&2; cat "$VAR/error.log" >&2; exit 1; }
    echo "$out"
}

results=$VAR/rows.txt
for round in $(seq "$ROUNDS"); do
    for w in 1 2; do
        echo "nginx+ngx_lua w=$w $(nginx_run "$w")" | tee -a "$results"
        echo "luaproxy-lua5.4 w=$w $(LUA_CPATH='./?.so;;' LUA_PATH='lua/?.lua;;' timeout 120 lua5.4 bench/dict.lua "$w" "$SECS")" | tee -a "$results"
        echo "luaproxy-luajit w=$w $(LUA_CPATH='target/luajit/lib/?.so;;' LUA_PATH='lua/?.lua;;' timeout 120 luajit bench/dict.lua "$w" "$SECS")" | tee -a "$results"
    done
done

# Median of the rounds per target, workers and operation; ratios against nginx of the same run.
echo
lua5.4 - "$results" <<'LUA'
local rows = {}
for line in io.lines(arg[1]) do
    local target, w = line:match("^(%S+) w=(%d)")
    for op, v in line:gmatch("(%w[%w_]*)=(%d+)") do
        if op ~= "w" then
            local k = target .. "|" .. w .. "|" .. op
            rows[k] = rows[k] or {}
            table.insert(rows[k], tonumber(v))
        end
    end
end
local function median(t)
    if not t then return nil end
    table.sort(t)
    return t[(#t + 1) // 2]
end
print("| workers | operation | nginx+ngx_lua ops/s | luaproxy LuaJIT ops/s | ratio | luaproxy Lua 5.4 ops/s | ratio |")
print("|---|---|---:|---:|---:|---:|---:|")
for _, w in ipairs{ "1", "2" } do
    for _, op in ipairs{ "get", "set", "incr", "cache_get", "cache_set" } do
        local n = median(rows["nginx+ngx_lua|" .. w .. "|" .. op])
        local j = median(rows["luaproxy-luajit|" .. w .. "|" .. op])
        local l = median(rows["luaproxy-lua5.4|" .. w .. "|" .. op])
        local function f(v) return v and string.format("%.2fM", v / 1e6) or "-" end
        local function r(v) return (v and n) and string.format("%.2f×", v / n) or "-" end
        print(string.format("| %s | %s | %s | %s | %s | %s | %s |", w, op, f(n), f(j), r(j), f(l), r(l)))
    end
end
LUA
