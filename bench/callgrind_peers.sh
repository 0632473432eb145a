#!/usr/bin/env bash
# bench/callgrind_peers.sh: instructions per request of the peers, measured as bench/callgrind.sh
# measures luaproxy: HAProxy (1 thread) and nginx+ngx_lua (1 worker, no master) with the peer
# harness's own configs (ports moved to 8183 and 8181 so a peer run can go on beside), under
# valgrind --tool=callgrind, 2 s of wrk warm-up, counters zeroed, 8 s measured.
#   bench/callgrind_peers.sh                 both peers, post5k and small, wrk -c1
#   PEERS=haproxy WORKLOADS=small CONNS=4 bench/callgrind_peers.sh
# Prints one line per peer and workload: requests, instructions, per request, and the top
# functions by their own instructions per request.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED_BENCH:-$here/../shared/bench}
conns=${CONNS:-1}
work=$(mktemp -d "${TMPDIR:-/tmp}/luaproxy-callgrind-peers.XXXXXX")
started=0
vpid=
cleanup() {
    [[ -n $vpid ]] && kill "$vpid" 2>/dev/null || true
    [[ $started == 1 ]] && "$SHARED/backend.sh" stop >/dev/null || true
}
trap cleanup EXIT
if ! "$SHARED/backend.sh" status >/dev/null 2>&1; then "$SHARED/backend.sh" start >/dev/null; started=1; fi

# top N functions by self cost per request, from a callgrind file (names are compressed)
top() {
    python3 - "$1" "$2" "${TOP:-8}" <<'PY'
import re, sys, collections
path, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names, cost, fn, skip = {}, collections.Counter(), None, False
def name(s):
    m = re.match(r'\((\d+)\)(?: (.*))?', s)
    if not m: return s
    if m.group(2) is not None: names[m.group(1)] = m.group(2)
    return names.get(m.group(1), '?')
for line in open(path):
    if line.startswith('fn='): fn = name(line[3:].strip()); continue
    if line.startswith('cfn='): name(line[4:].strip()); continue
    if line.startswith('calls='): skip = True; continue
    if line[:1].isdigit() or line[:1] in '+-*':
        if skip: skip = False; continue
        parts = line.split()
        if len(parts) >= 2 and fn: cost[fn] += int(parts[1])
print('   top:', ', '.join(f'{f[:40]} {c // n}' for f, c in cost.most_common(k)))
PY
}

measure() { # label port workload
    local label=$1 port=$2 wl=$3 out=$work/$1.$3
    for _ in $(seq 1 60); do curl -s -o /dev/null -H 'X-Api-Key: k' "http://127.0.0.1:$port/small" && break; sleep 1; done
    wrk -t1 -c"$conns" -d2s -s "$SHARED/wrk/$wl.lua" "http://127.0.0.1:$port/" >/dev/null 2>&1
    callgrind_control -z "$vpid" >/dev/null
    local res reqs total
    res=$(timeout 30 wrk -t1 -c"$conns" -d8s -s "$SHARED/wrk/$wl.lua" "http://127.0.0.1:$port/" 2>&1)
    callgrind_control -d "$vpid" >/dev/null
    sleep 1
    reqs=$(awk '/requests in/ {print $1}' <<<"$res")
    total=$(callgrind_annotate "$out.cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "$label $wl: $reqs requests, $total instructions, $(( total / reqs )) per request"
    grep -i "non-2xx\|socket errors" <<<"$res" || true
    top "$out.cg.1" "$reqs"
}

for peer in ${PEERS:-haproxy nginx-lua}; do
    for wl in ${WORKLOADS:-post5k small}; do
        out=$work/$peer.$wl
        case $peer in
        haproxy)
            sed 's/127.0.0.1:8083/127.0.0.1:8183/' "$SHARED/peers/haproxy.cfg" >"$work/haproxy.cfg"
            PROXY_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
                haproxy -f "$work/haproxy.cfg" -db >"$out.log" 2>&1 &
            vpid=$!; port=8183 ;;
        nginx-lua)
            mkdir -p "$work/ngx/tmp" "$work/ngx/logs"
            ln -sfn "$SHARED/peers/lua" "$work/ngx/lua"
            sed 's/127.0.0.1:8081/127.0.0.1:8181/' "$SHARED/peers/nginx-lua.conf" >"$work/ngx/nginx.conf"
            valgrind --tool=callgrind --callgrind-out-file="$out.cg" nginx -p "$work/ngx/" \
                -c "$work/ngx/nginx.conf" \
                -g "daemon off; master_process off; worker_processes 1; pid $work/ngx/nginx.pid;" \
                >"$out.log" 2>&1 &
            vpid=$!; port=8181 ;;
        *) echo "unknown peer $peer" >&2; exit 2 ;;
        esac
        measure "$peer" "$port" "$wl"
        kill "$vpid" 2>/dev/null || true
        wait "$vpid" 2>/dev/null || true
        vpid=
    done
done
echo "(profiles under $work)"
