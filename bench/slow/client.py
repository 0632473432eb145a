#!/usr/bin/env python3
"""bench/slow/client.py: the load of bench/slow.sh (issue #16, slow backends).

CONNS keep-alive connections to 127.0.0.1:PORT, each sending `GET /` with X-Api-Key in a loop
for DURATION seconds, with a think time drawn uniformly from 0 to 2 * THINK_MS between its
requests (a fixed seed, so runs compare). Per request it records the latency (request written
-> whole response read) and the backend that answered (the `X-Backend` response header), and
prints one markdown table row: requests to the fast / slow backend (share), fast-backend
latency p50/p99/max, slow-backend latency p50/p99, errors, non-2xx, and the client's own event
loop lag (p99, max), the resolution of every latency figure in the row.

Python 3 stdlib only; the connections are spread over PROCS processes (one asyncio loop each)
so the client is not the bottleneck. Bounded: a request waits at most 15 s; the run stops
DURATION + ramp + 15 s after it started whatever is in flight (counted as errors).

  python3 bench/slow/client.py --port 8191 --label luaproxy [--conns 2000] [--duration 20]
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import time
import urllib.request

REQ_TIMEOUT = 15.0
RAMP = 2.0  # connections open spread over the first RAMP seconds


class Stats:
    def __init__(self):
        self.lat = {"fast": [], "slow": [], "other": []}
        self.errors = {}
        self.non2xx = 0
        self.lag = []

    def error(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        raise ValueError("response without a length")
    return status, headers


async def conn_loop(idx, args, stats, end):
    rng = random.Random(args.seed * 100003 + idx)
    await asyncio.sleep(rng.uniform(0, RAMP))
    req = (f"GET /item/{idx} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
           f"X-Api-Key: bench-key-{idx % 50}\r\n\r\n").encode()
    think = args.think_ms / 1000.0
    reader = writer = None
    while time.monotonic() < end:
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", args.port), REQ_TIMEOUT)
            t0 = time.perf_counter()
            writer.write(req)
            status, headers = await asyncio.wait_for(read_response(reader), REQ_TIMEOUT)
            ms = (time.perf_counter() - t0) * 1000.0
            be = headers.get("x-backend", "other")
            stats.lat.get(be, stats.lat["other"]).append(ms)
            if not 200 <= status < 300:
                stats.non2xx += 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError, IndexError) as e:
            stats.error(type(e).__name__)
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.1)
            continue
        if think > 0:
            await asyncio.sleep(rng.uniform(0, 2 * think))
    if writer is not None:
        writer.close()


async def lag_probe(stats, end):
    # how late a 10 ms timer fires: the client's own scheduling delay
    while time.monotonic() < end:
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        stats.lag.append((time.perf_counter() - t0) * 1000.0 - 10.0)


async def run_proc(first, count, args, start):
    stats = Stats()
    end = start + args.duration
    tasks = [asyncio.ensure_future(conn_loop(first + i, args, stats, end)) for i in range(count)]
    probe = asyncio.ensure_future(lag_probe(stats, end))
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, end + RAMP + REQ_TIMEOUT - time.monotonic()))
    for t in pending:
        t.cancel()
        stats.error("unfinished")
    await probe
    return stats


def proc_main(first, count, args, start, q):
    stats = asyncio.run(run_proc(first, count, args, start))
    q.put((stats.lat, stats.errors, stats.non2xx, stats.lag))


def pct(xs, p):
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


def fmt_ms(v):
    if v != v:
        return "-"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--label", default="proxy")
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--think-ms", type=float, default=1000.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--header", action="store_true", help="print the table header first")
    ap.add_argument("--slow-peak", help="URL of the slow backend's peak in-flight count "
                    "(its /_bench/reset is called before the run)")
    args = ap.parse_args()

    def backend_get(path):
        with urllib.request.urlopen(args.slow_peak.rsplit("/", 1)[0] + "/" + path, timeout=5) as r:
            return r.read().decode().strip()
    if args.slow_peak:
        backend_get("reset")

    start = time.monotonic() + 0.5
    q = mp.Queue()
    per = [args.conns // args.procs + (1 if i < args.conns % args.procs else 0) for i in range(args.procs)]
    procs, first = [], 0
    for n in per:
        p = mp.Process(target=proc_main, args=(first, n, args, start, q))
        p.start()
        procs.append(p)
        first += n
    lat = {"fast": [], "slow": [], "other": []}
    errors, non2xx, lag = {}, 0, []
    for _ in procs:
        l, e, n2, lg = q.get(timeout=args.duration + RAMP + REQ_TIMEOUT + 30)
        for k in lat:
            lat[k].extend(l[k])
        for k, v in e.items():
            errors[k] = errors.get(k, 0) + v
        non2xx += n2
        lag.extend(lg)
    for p in procs:
        p.join(10)
    for k in lat:
        lat[k].sort()
    lag.sort()
    peak = backend_get("peak") if args.slow_peak else "-"
    nf, ns, no = len(lat["fast"]), len(lat["slow"]), len(lat["other"])
    total = nf + ns + no
    share = lambda n: 100.0 * n / total if total else 0.0
    s = {
        "label": args.label, "conns": args.conns, "duration": args.duration,
        "think_ms": args.think_ms, "requests": total, "rps": total / args.duration,
        "fast": nf, "slow": ns, "other": no,
        "fast_share": share(nf), "slow_share": share(ns),
        "fast_p50": pct(lat["fast"], 50), "fast_p99": pct(lat["fast"], 99),
        "fast_p999": pct(lat["fast"], 99.9),
        "fast_max": lat["fast"][-1] if nf else float("nan"),
        "fast_over_100ms": sum(1 for x in lat["fast"] if x > 100), "fast_over_1s": sum(1 for x in lat["fast"] if x > 1000),
        "slow_p50": pct(lat["slow"], 50), "slow_p99": pct(lat["slow"], 99),
        "errors": sum(errors.values()), "error_kinds": errors, "non2xx": non2xx,
        "slow_peak_inflight": peak, "lag_p99": pct(lag, 99), "lag_max": lag[-1] if lag else float("nan"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    if args.header:
        print("| proxy | requests (req/s) | to fast (share) | to slow (share) | fast p50 | fast p99 "
              "| fast max | fast > 1 s | slow p50 | slow p99 | slow peak in flight | errors | non-2xx | client lag p99 / max |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errs = str(s["errors"]) + (" (" + ", ".join(f"{k} {v}" for k, v in errors.items()) + ")" if errors else "")
    print(f"| {args.label} | {total} ({s['rps']:.0f}) | {nf} ({s['fast_share']:.1f} %) "
          f"| {ns} ({s['slow_share']:.1f} %) | {fmt_ms(s['fast_p50'])} | {fmt_ms(s['fast_p99'])} "
          f"| {fmt_ms(s['fast_max'])} | {s['fast_over_1s']} | {fmt_ms(s['slow_p50'])} | {fmt_ms(s['slow_p99'])} "
          f"| {peak} | {errs} | {non2xx}{' + ' + str(no) + ' unlabelled' if no else ''} "
          f"| {fmt_ms(s['lag_p99'])} / {fmt_ms(s['lag_max'])} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
