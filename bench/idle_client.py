#!/usr/bin/env python3
"""bench/idle_client.py: N idle keep-alive client connections against one proxy (bench/idle.sh).

usage: idle_client.py PORT PIDS [--conns N] [--hold S] [--workload post5k|small|mixed]

Warms the proxy up (64 connections, N requests in all, closed), reads its memory, then opens N
keep-alive connections (at most 64 connecting or in a request at once), sends ONE request on
each and reads its response, keeps them all open and idle for HOLD seconds, reads the memory
again, then sends a second request on every connection (all must answer 200 on the same
connection) and closes them. Memory is the sum over PIDS and all their descendants of
/proc/PID/smaps_rollup's Pss, Private_Clean + Private_Dirty and Rss.

Prints one line: `IDLERESULT conns=N errors=E second_errors=E2 pss_before=B pss_after=A
priv_before=.. priv_after=.. rss_before=.. rss_after=.. first_errors=..` (bytes). Errors:
a connection that failed to connect, did not answer its first request with 200, or was no
longer usable (closed, reset, not 200) for its second. Every wait is bounded by a timeout.
"""
import argparse
import asyncio
import os
import resource
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("pids", help="comma-separated root PIDs of the proxy")
ap.add_argument("--conns", type=int, default=10000)
ap.add_argument("--hold", type=float, default=3.0)
ap.add_argument("--workload", default="mixed", choices=["post5k", "small", "mixed"])
ap.add_argument("--key", default=os.environ.get("API_KEY", "bench-key"))
ARGS = ap.parse_args()
HOST = "127.0.0.1"
TIMEOUT = 15.0
PARALLEL = 64

BODY = b"0123456789abcdef" * 320  # 5120 bytes, as wrk/post5k.lua
POST = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        b"X-Api-Key: " + ARGS.key.encode() + b"\r\nContent-Length: 5120\r\n\r\n" + BODY)
SMALL = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: " + ARGS.key.encode() + b"\r\n\r\n"


def request_for(i):
    if ARGS.workload == "post5k" or (ARGS.workload == "mixed" and i % 2 == 0):
        return POST
    return SMALL


def family(roots):
    """roots and every descendant (nginx's workers are the master's children)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out = set(r for r in roots if r in parent)
    grew = True
    while grew:
        grew = False
        for p, pp in parent.items():
            if p not in out and pp in out:
                out.add(p)
                grew = True
    return sorted(out)


def memory(roots):
    tot = {"pss": 0, "priv": 0, "rss": 0}
    for pid in family(roots):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    k, _, rest = line.partition(":")
                    if k in ("Pss", "Rss", "Private_Clean", "Private_Dirty"):
                        kb = int(rest.split()[0]) * 1024
                        if k == "Pss":
                            tot["pss"] += kb
                        elif k == "Rss":
                            tot["rss"] += kb
                        else:
                            tot["priv"] += kb
        except OSError:
            pass
    return tot


async def exchange(reader, writer, req):
    """One request and its response on an open connection; the status, or raises."""
    writer.write(req)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
            raise ConnectionError("server closes the connection")
    if length is None:
        raise ConnectionError("no content-length")
    await reader.readexactly(length)
    return status


async def open_one(i, sem, conns, errs):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, ARGS.port), TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1
            return
        try:
            status = await asyncio.wait_for(exchange(r, w, request_for(i)), TIMEOUT)
            if status != 200:
                raise ConnectionError(f"status {status}")
            conns.append((i, r, w))
        except Exception as e:  # noqa: BLE001 - every failure is counted, none is fatal
            errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1
            w.close()


async def again(i, r, w, sem, errs):
    async with sem:
        try:
            status = await asyncio.wait_for(exchange(r, w, request_for(i + 1)), TIMEOUT)
            if status != 200:
                raise ConnectionError(f"status {status}")
        except Exception as e:  # noqa: BLE001
            errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if ARGS.conns + 100 > hard:
        sys.exit(f"open-files hard limit {hard} is too low for {ARGS.conns} connections")
    roots = [int(p) for p in ARGS.pids.split(",") if p]
    sem = asyncio.Semaphore(PARALLEL)

    # Warm-up: as many requests as the run will make (on 64 connections), so what requests
    # leave behind however many connections carry them (garbage a collector has not reached
    # yet, allocator caches) is in the "before" figure, and the difference is the connections'.
    warm, werrs = [], {}
    await asyncio.gather(*(open_one(i, sem, warm, werrs) for i in range(64)))
    for _ in range(max(3, ARGS.conns // 64)):
        await asyncio.gather(*(again(i, r, w, sem, werrs) for i, r, w in warm))
    for _, _, w in warm:
        w.close()
    await asyncio.sleep(1.0)
    before = memory(roots)

    conns, errs = [], {}
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(i, sem, conns, errs) for i in range(ARGS.conns)))
    opened = time.monotonic() - t0
    await asyncio.sleep(ARGS.hold)
    after = memory(roots)

    errs2 = {}
    await asyncio.gather(*(again(i, r, w, sem, errs2) for i, r, w in conns))
    after2 = memory(roots)
    for _, _, w in conns:
        w.close()
    await asyncio.sleep(0.5)

    first = sum(errs.values())
    second = sum(errs2.values())
    print(f"IDLERESULT conns={len(conns)} errors={first + second} first_errors={first} "
          f"second_errors={second} pss_before={before['pss']} pss_after={after['pss']} "
          f"priv_before={before['priv']} priv_after={after['priv']} "
          f"rss_before={before['rss']} rss_after={after['rss']} pss_after_second={after2['pss']} "
          f"open_seconds={opened:.1f} warm_errors={sum(werrs.values())} "
          f"why={','.join(f'{k}:{v}' for k, v in {**errs, **errs2}.items()) or '-'}")


asyncio.run(main())
