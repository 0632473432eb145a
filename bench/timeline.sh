#!/usr/bin/env bash
# bench/timeline.sh: issue #14's timeline cache, luaproxy beside nginx + ngx_lua in one run.
#
#   nginx-shdict     bench/timeline/nginx-timeline.conf + lua/timeline.lua: lua_shared_dict,
#                    ngx.location.capture to the backends, cjson; 127.0.0.1:8121
#   luaproxy-shdict  examples/timeline_cache.lua with timeline_lru_size = 0: luaproxy.cache
#                    only (bench/timeline_shdict.conf.lua); 127.0.0.1:8123
#   nginx-lru        the same nginx, with a per-worker lua-resty-lrucache in front of the
#                    dict (lua-resty-mlcache's two levels); 127.0.0.1:8122
#   luaproxy         examples/timeline_cache.lua as it comes (its per-worker table in front of
#                    luaproxy.cache; bench/timeline.conf.lua); 127.0.0.1:8120
# All serve GET /timeline/<user>: the backends' JSON array (~18 KB, tweet-like items) filtered
# to id, text and created_at (~4.5 KB), cached 300 s, with ETag and Cache-Control. The backend
# is one nginx on 127.0.0.1:9121/9122 (bench/timeline/backend.conf) that counts the fetches.
#
# Steps: start the backend, one nginx (both nginx servers) and two luaproxy processes; verify
# every target (200 JSON with the source's items, 304 on the ETag, 404, 405); warm the caches
# (USERS users, one fetch per user and cache); WARMUP s of wrk each; then ROUNDS rounds of
# `wrk -t$THREADS -c$CONNS -d${DURATION}s --latency` cycling over the USERS users
# (bench/timeline/wrk.lua), the targets in the same order every round; count the fetches again
# (a warm cache makes none); print a markdown table with the luaproxy/nginx ratios of the same
# run, design for design; stop everything it started (by the PIDs in its pid files).
#
# Reuses ../shared/bench (lib.sh: ports, pids, CPU accounting; wrk/report.lua). Needs Debian's
# nginx, libnginx-mod-http-lua, lua-cjson, wrk, python3, and luaproxy.so in the checkout.
#   bench/timeline.sh                      ROUNDS=3, c100, 10 s per run (about 3 minutes)
#   ROUNDS=5 CONNS=200 bench/timeline.sh
# Environment: ROUNDS (3), CONNS (100), THREADS (2), DURATION (10, at most 15), WARMUP (2),
# USERS (100), PROXY_WORKERS (2: nginx workers and luaproxy workers), BENCH_VAR (scratch,
# default: luaproxy-timeline-bench in the temporary folder).
# Results: the table on stdout; raw rows and the table under $BENCH_VAR/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
[[ -f $SHARED/lib.sh ]] || { echo "no peer harness at $SHARED" >&2; exit 1; }
export BENCH_VAR=${BENCH_VAR:-$(dirname "$(mktemp -u)")/luaproxy-timeline-bench}
. "$SHARED/lib.sh"

ROUNDS=${ROUNDS:-3}; CONNS=${CONNS:-100}; THREADS=${THREADS:-2}; DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}; USERS=${USERS:-100}; PROXY_WORKERS=${PROXY_WORKERS:-2}
((DURATION >= 1 && DURATION <= 15)) || die "DURATION must be 1..15 s"
[[ -f luaproxy.so ]] || die "no luaproxy.so in $ROOT (make install, or copy a build here)"
export USERS TIMELINE_REPORT=$SHARED/wrk/report.lua

declare -A PORT=([nginx-shdict]=8121 [luaproxy-shdict]=8123 [nginx-lru]=8122 [luaproxy]=8120)
TARGETS="nginx-shdict luaproxy-shdict nginx-lru luaproxy"
for port in 9121 9122 8121 8122 8123 8120; do port_busy "$port" && die "port $port already in use; stop whatever holds it first"; done

TS=$(date +%Y%m%d-%H%M%S)
OUT=$VAR/results
mkdir -p "$OUT" "$VAR/backend/data" "$VAR/backend/tmp" "$VAR/nginx-timeline/tmp" "$VAR/luaproxy" \
    "$VAR/luaproxy-shdict" "$VAR/nginx-shdict" "$VAR/nginx-lru"
TSV=$OUT/timeline-$TS.tsv
MD=$OUT/timeline-$TS.md

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$VAR/luaproxy/pid" TERM
    stop_pid "$VAR/luaproxy-shdict/pid" TERM
    stop_pid "$VAR/nginx-timeline/pid" TERM
    stop_pid "$VAR/backend/pid" TERM
    log "stopped everything this run started"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the upstream's timeline: 22 tweet-like items, the same for every user -----------------
python3 - "$VAR/backend/data/timeline.json" <<'PY'
import json, random, sys
random.seed(2011)
words = "proxy lua kahlua cache timeline json filter nginx worker latency fast object script table".split()
items = []
for i in range(22):
    text = " ".join(random.choice(words) for _ in range(20))[:140]
    items.append({
        # 14-digit ids: Debian's lua-cjson 2.1.0 prints 14 significant digits at most, so
        # longer ones (real tweet ids have 18-19) would not come out of the nginx peer intact
        "id": 48000000000000 + i * 7919, "id_str": str(48000000000000 + i * 7919),
        "text": text, "created_at": "Thu Mar 17 %02d:%02d:00 +0000 2011" % (i % 24, i),
        "source": "<a href=\"http://example.com\" rel=\"nofollow\">web</a>",
        "truncated": False, "in_reply_to_status_id": None, "retweet_count": i, "favorited": False,
        "entities": {"hashtags": [{"text": "lua", "indices": [0, 4]}], "urls": [], "user_mentions": []},
        "user": {"id": 42, "screen_name": "kahlua", "name": "Kahlua Proxy", "followers_count": 1500,
                 "description": "A scriptable object cache and HTTP proxy, in Java and Lua.",
                 "profile_image_url": "http://example.com/images/kahlua_normal.png"},
        "geo": None, "place": None, "lang": "en",
    })
json.dump(items, open(sys.argv[1], "w"))
PY

# ---- start ----------------------------------------------------------------------------------
rm -f "$VAR/backend/fetches9121.log" "$VAR/backend/fetches9122.log"
"$NGINX" -p "$VAR/backend/" -c "$ROOT/bench/timeline/backend.conf" -e "$VAR/backend/error.log" \
    -g "worker_processes 1; pid $VAR/backend/pid;" || die "backend nginx failed: $(cat "$VAR/backend/error.log")"
wait_port 9121 && wait_port 9122 || die "backend did not come up"
ln -sfn "$ROOT/bench/timeline/lua" "$VAR/nginx-timeline/lua"
"$NGINX" -p "$VAR/nginx-timeline/" -c "$ROOT/bench/timeline/nginx-timeline.conf" -e "$VAR/nginx-timeline/error.log" \
    -g "worker_processes $PROXY_WORKERS; pid $VAR/nginx-timeline/pid;" \
    || die "nginx-timeline failed: $(cat "$VAR/nginx-timeline/error.log")"
for lp in luaproxy luaproxy-shdict; do
    conf=bench/timeline.conf.lua
    [[ $lp == luaproxy-shdict ]] && conf=bench/timeline_shdict.conf.lua
    LUA_PATH='lua/?.lua;;' LUA_CPATH='./?.so;;' lua5.4 main.lua --config "$conf" \
        --workers "$PROXY_WORKERS" >"$VAR/$lp/output.log" 2>&1 </dev/null &
    echo $! >"$VAR/$lp/pid"
done
for t in $TARGETS; do wait_port "${PORT[$t]}" 30 || die "$t did not listen on ${PORT[$t]}"; done
for _ in 1 2 3 4 5 6 7 8 9 10; do [[ -s $VAR/nginx-timeline/pid && -s $VAR/backend/pid ]] && break; sleep 0.1; done
NPID=$(<"$VAR/nginx-timeline/pid")
declare -A PIDS=([nginx-shdict]=$NPID [nginx-lru]=$NPID [luaproxy]=$(<"$VAR/luaproxy/pid")
    [luaproxy-shdict]=$(<"$VAR/luaproxy-shdict/pid"))
BPID=$(<"$VAR/backend/pid")
log "up: backend pid $BPID, nginx pid $NPID, luaproxy pids ${PIDS[luaproxy]} and ${PIDS[luaproxy-shdict]}"

fetches() {
    sleep 1.5   # access_log flush=1s
    echo $(($(count_lines "$VAR/backend/fetches9121.log") + $(count_lines "$VAR/backend/fetches9122.log")))
}

# ---- verify ---------------------------------------------------------------------------------
VERIFY=$OUT/verify-timeline-$TS.txt
: >"$VERIFY"
for t in $TARGETS; do
    url=http://$HOST:${PORT[$t]}
    first=$(curl -s -m 10 -D "$VAR/$t/head" -o "$VAR/$t/body" -w '%{http_code}' "$url/timeline/verify" || echo ERR)
    ctype=$(awk -F': ' 'tolower($1) == "content-type" {print $2}' "$VAR/$t/head" | tr -d '\r')
    etag=$(awk -F': ' 'tolower($1) == "etag" {print $2}' "$VAR/$t/head" | tr -d '\r')
    cc=$(awk -F': ' 'tolower($1) == "cache-control" {print $2}' "$VAR/$t/head" | tr -d '\r')
    again=$(curl -s -m 10 -o /dev/null -w '%{http_code}/%header{x-cache}' "$url/timeline/verify" || echo ERR)
    cond=$(curl -s -m 10 -o /dev/null -H "If-None-Match: $etag" -w '%{http_code}' "$url/timeline/verify" || echo ERR)
    nf=$(curl -s -m 10 -o /dev/null -w '%{http_code}' "$url/nope" || echo ERR)
    post=$(curl -s -m 10 -o /dev/null -X POST -w '%{http_code}' "$url/timeline/verify" || echo ERR)
    size=$(wc -c <"$VAR/$t/body")
    verdict=PASS
    [[ $first == 200 && $ctype == application/json* && $again == 200/HIT && $cond == 304 && $nf == 404 \
        && $post == 405 && $cc == "public, max-age="* ]] || verdict=FAIL
    echo "verify $t (port ${PORT[$t]}): 200=$first type=$ctype bytes=$size cache-control='$cc' again=$again if-none-match=$cond 404=$nf POST=$post -> $verdict" \
        | tee -a "$VERIFY" >&2
done
same=$(python3 - "$VAR/backend/data/timeline.json" "$VAR"/{nginx-shdict,luaproxy-shdict,nginx-lru,luaproxy}/body <<'PY'
import json, sys
src, *bodies = (json.load(open(p)) for p in sys.argv[1:])
want = [{k: i[k] for k in ("id", "text", "created_at")} for i in src]
print("same items" if all(b == want for b in bodies) else "DIFFERENT ITEMS")
PY
)
echo "verify: every body holds the source's items filtered to id, text, created_at: $same" | tee -a "$VERIFY" >&2

# ---- warm the caches: every user once per proxy ---------------------------------------------
for t in $TARGETS; do
    curl -s -m 60 "http://$HOST:${PORT[$t]}/timeline/u[1-$USERS]" >/dev/null || die "warming $t failed"
done
warm_fetches=$(fetches)
log "caches warm: $warm_fetches upstream fetches so far (1 + $USERS users per cache: the nginx servers share one dict)"
if ((WARMUP > 0)); then
    for t in $TARGETS; do
        timeout $((WARMUP + 20)) wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -s bench/timeline/wrk.lua \
            "http://$HOST:${PORT[$t]}/" >/dev/null 2>&1 || true
    done
fi

# ---- rounds ---------------------------------------------------------------------------------
printf 'label\tround\trps\tp50_ms\tp99_ms\tbytes_per_resp\tnon2xx\tsock_err\trequests\tproxy_cpu_s\treq_per_cpu_s\tbox_busy_pct\n' >"$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
    for t in $TARGETS; do
        log "round $round: $t"
        p0=$(cpu_ticks "${PIDS[$t]}")
        read -r busy0 tot0 _ _ < <(box_ticks)
        res=$(timeout $((DURATION + 20)) wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --timeout 5s --latency \
            -s bench/timeline/wrk.lua "http://$HOST:${PORT[$t]}/" 2>&1 | grep '^WRKRESULT' || true)
        read -r busy1 tot1 _ _ < <(box_ticks)
        p1=$(cpu_ticks "${PIDS[$t]}")
        [[ -n $res ]] || { log "$t round $round: wrk gave no result"; continue; }
        declare -A r=()
        for kv in ${res#WRKRESULT }; do r[${kv%%=*}]=${kv#*=}; done
        awk -v l="$t" -v rd="$round" -v rps="${r[rps]}" -v p50="${r[p50_ms]}" -v p99="${r[p99_ms]}" \
            -v bytes="${r[bytes]}" -v n="${r[requests]}" -v non2xx="${r[non2xx]}" \
            -v se="$((r[connect] + r[read] + r[write] + r[timeout]))" -v p="$((p1 - p0))" -v hz="$CLK_TCK" \
            -v busy="$((busy1 - busy0))" -v tot="$((tot1 - tot0))" 'BEGIN {
                printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%.0f\t%s\t%s\t%s\t%.2f\t%.0f\t%.0f\n", l, rd, rps, p50, p99,
                    (n > 0 ? bytes / n : 0), non2xx, se, n, p / hz, (p > 0 ? n / (p / hz) : 0), (tot > 0 ? 100 * busy / tot : 0)
            }' | tee -a "$TSV" >&2
        unset r
    done
done
end_fetches=$(fetches)

# ---- summary --------------------------------------------------------------------------------
{
    echo "## timeline.sh run $TS"
    echo
    echo "- date: $(date -R); load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- machine: nproc=$(nproc), CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r)"
    echo "- wrk -t$THREADS -c$CONNS -d${DURATION}s --latency, GET /timeline/u1..u$USERS in turn (all cache hits), $ROUNDS rounds, order: $TARGETS; warm-up ${WARMUP}s each"
    echo "- proxies: $PROXY_WORKERS workers each; not pinned (wrk, both proxies and the backend share the CPUs)"
    echo "- upstream fetches: $warm_fetches while verifying and warming (1 + $USERS per cache; both nginx servers share one dict), $((end_fetches - warm_fetches)) during the wrk runs"
    echo
    sed 's/^/    /' "$VERIFY"
    echo
    echo "| target | rps per round | rps mean | p50 ms | p99 ms | bytes/response | req per proxy CPU-s | errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' 'NR > 1 {
            k = $1; if (!(k in c)) order[++n] = k
            c[k]++; rps[k] += $3; per[k] = per[k] (per[k] == "" ? "" : " / ") $3
            p50[k] += $4; p99[k] += $5; b[k] += $6; e[k] += $7 + $8; rpc[k] += $11
            byround[k, $2] = $3
        }
        END {
            for (i = 1; i <= n; i++) { k = order[i]
                printf "| %s | %s | %.0f | %.2f | %.2f | %.0f | %.0f | %d |\n", k, per[k], rps[k] / c[k],
                    p50[k] / c[k], p99[k] / c[k], b[k] / c[k], rpc[k] / c[k], e[k] }
            print ""
            split("luaproxy-shdict nginx-shdict luaproxy nginx-lru", pair, " ")
            for (j = 1; j <= 3; j += 2) {
                a = pair[j]; g = pair[j + 1]
                if (!(c[a] && c[g])) continue
                rs = ""
                for (r = 1; r <= c[a]; r++) if (byround[g, r] > 0) rs = rs (rs == "" ? "" : ", ") sprintf("%.2f", byround[a, r] / byround[g, r])
                printf "- %s / %s: req/s %.2f (per round: %s), p99 %.2f, req per CPU-s %.2f\n", a, g,
                    (rps[a] / c[a]) / (rps[g] / c[g]), rs, (p99[a] / c[a]) / (p99[g] / c[g]), (rpc[a] / c[a]) / (rpc[g] / c[g])
            }
        }' "$TSV"
} >"$MD"
echo
cat "$MD"
log "raw rows: $TSV"
log "table:    $MD"
