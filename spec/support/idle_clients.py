#!/usr/bin/env python3
"""Many idle keep-alive clients for spec/idle_spec.lua.

usage: idle_clients.py PORT N IDLE_SECONDS

Opens N keep-alive connections to 127.0.0.1:PORT (at most 64 opening at once), each sends one
request (a GET, or a POST with a 5 KB body, alternately) and reads its answer; all are then
left idle for IDLE_SECONDS; then every connection sends more, by its number modulo 3:
  0  a GET whose head arrives in three pieces, 50 ms apart (across all such connections at
     once), the first piece a single byte;
  1  two GETs pipelined in one write (two answers, in order);
  2  a POST with a 5 KB body.
Every answer must be the handler's ("METHOD PATH BODYLENGTH", status 200) on the same
connection. Prints one JSON line: {"opened", "first_ok", "second_ok", "errors": {why: n}}.
Every wait is bounded (10 s per step).
"""
import asyncio
import json
import resource
import sys

PORT, N, IDLE = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
STEP = 10.0
BODY = b"0123456789abcdef" * 320  # 5120 bytes


def get(path):
    return f"GET {path} HTTP/1.1\r\nHost: idle\r\n\r\n".encode()


def post(path):
    return (f"POST {path} HTTP/1.1\r\nHost: idle\r\nContent-Length: {len(BODY)}\r\n\r\n"
            .encode() + BODY)


async def answer(reader, want):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = (await reader.readexactly(length)).decode()
    if status != 200 or body != want:
        raise ValueError(f"status {status} body {body!r}, wanted {want!r}")


async def first(i, sem, conns, errors):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), STEP)
            path = f"/first/{i}"
            if i % 2:
                w.write(post(path))
                want = f"POST {path} {len(BODY)}"
            else:
                w.write(get(path))
                want = f"GET {path} 0"
            await asyncio.wait_for(answer(r, want), STEP)
            conns[i] = (r, w)
        except Exception as e:  # noqa: BLE001 - counted, the spec shows them
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1


async def second(i, r, w, errors, pieces_sent):
    try:
        if i % 3 == 0:
            await asyncio.wait_for(pieces_sent.wait(), STEP)
            await asyncio.wait_for(answer(r, f"GET /pieces/{i} 0"), STEP)
        elif i % 3 == 1:
            w.write(get(f"/pipe/{i}/a") + get(f"/pipe/{i}/b"))
            await asyncio.wait_for(answer(r, f"GET /pipe/{i}/a 0"), STEP)
            await asyncio.wait_for(answer(r, f"GET /pipe/{i}/b 0"), STEP)
        else:
            w.write(post(f"/post/{i}"))
            await asyncio.wait_for(answer(r, f"POST /post/{i} {len(BODY)}"), STEP)
        return True
    except Exception as e:  # noqa: BLE001
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        return False


async def send_pieces(conns, done):
    heads = {i: get(f"/pieces/{i}") for i in conns if i % 3 == 0}
    cuts = lambda h: (h[:1], h[1:len(h) // 2], h[len(h) // 2:])  # noqa: E731
    for k in range(3):
        for i, h in heads.items():
            conns[i][1].write(cuts(h)[k])
        await asyncio.sleep(0.05)
    done.set()


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < N + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, N + 1000), hard))
    sem = asyncio.Semaphore(64)
    conns, errors = {}, {}
    await asyncio.gather(*(first(i, sem, conns, errors) for i in range(N)))
    await asyncio.sleep(IDLE)
    pieces_sent = asyncio.Event()
    results = await asyncio.gather(send_pieces(conns, pieces_sent),
                                   *(second(i, r, w, errors, pieces_sent)
                                     for i, (r, w) in conns.items()))
    for r, w in conns.values():
        w.close()
    print(json.dumps({"opened": N, "first_ok": len(conns),
                      "second_ok": sum(1 for x in results[1:] if x), "errors": errors}))


asyncio.run(main())
