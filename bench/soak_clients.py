#!/usr/bin/env python3
"""bench/soak_clients.py: the misbehaving clients of bench/soak.

usage: soak_clients.py HOST:PORT SECONDS OUT_JSON [--faults] [--threads N] [--pause S]

THREADS threads (default 4) each run random scenarios from SCENARIOS, one fresh connection per
scenario, pausing PAUSE seconds (default 0.05) between them, until SECONDS have passed. Each
scenario ends in one outcome: the status code(s) read, or "closed" (EOF before any answer),
"reset", "timeout", "truncated" (a head, then less body than announced), "hungup" (we left
first, on purpose), "badbody" (a 200 with the wrong body). At the end OUT_JSON gets
{"outcomes": {scenario: {outcome: n}}, "expected": {scenario: [outcomes]}, "unexpected": n}.
--faults adds /spin and /alloc (they need lua_budget and lua_memory_limit in the config).
The proxy's config is expected to set client_header_timeout and client_body_timeout to 2 s.
"""
import argparse
import json
import random
import socket
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("addr")
ap.add_argument("seconds", type=float)
ap.add_argument("out")
ap.add_argument("--faults", action="store_true")
ap.add_argument("--threads", type=int, default=4)
ap.add_argument("--pause", type=float, default=0.05)
ARGS = ap.parse_args()
HOST, PORT = ARGS.addr.rsplit(":", 1)
PORT = int(PORT)
BODY = b"0123456789abcdef" * 320  # 5120 bytes, as wrk's POSTs
GOOD_BODY_LEN = 5120              # what the good backends answer


class Closed(Exception):
    """EOF before the response was complete."""


class Truncated(Exception):
    """A response head, then less body than it announced."""


def connect(timeout=10):
    s = socket.create_connection((HOST, PORT), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise Closed
        self.buf += data

    def until(self, sep):
        while sep not in self.buf:
            self.fill()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_request=False):
        """(status, body) of one response; raises Closed/ConnectionError/timeout; a response
        cut after its head raises Truncated."""
        head = self.until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        try:
            if head_request or status in (204, 304) or 100 <= status < 200:
                return status, b""
            if "content-length" in fields:
                return status, self.exact(int(fields["content-length"]))
            if fields.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.until(b"\r\n").split(b";")[0], 16)
                    if size == 0:
                        while self.until(b"\r\n") != b"":
                            pass
                        return status, body
                    body += self.exact(size)
                    self.exact(2)
            while True:  # delimited by close
                try:
                    self.fill()
                except Closed:
                    body, self.buf = self.buf, b""
                    return status, body
        except (Closed, ConnectionError, socket.timeout) as e:
            raise Truncated(status) from e


def exchange(data, n=1, timeout=10, sock=None):
    """Sends data, reads n responses; the outcome: 'S1,S2,...' or how it failed."""
    sock = sock or connect(timeout)
    try:
        if data:
            sock.sendall(data)
        r = Reader(sock)
        got = []
        for _ in range(n):
            status, body = r.response()
            got.append((status, body))
        return got
    finally:
        sock.close()


def statuses(got):
    return ",".join(str(s) for s, _ in got)


def simple(data, n=1, timeout=10):
    return lambda: statuses(exchange(data, n, timeout))


def get(path, extra=b""):
    return b"GET " + path + b" HTTP/1.1\r\nHost: soak\r\n" + extra + b"\r\n"


def s_good_get():
    (status, body), = exchange(get(b"/good"))
    return str(status) if status != 200 or len(body) == GOOD_BODY_LEN else "badbody"


def s_read_post():
    (status, body), = exchange(b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n"
                               % len(BODY) + BODY)
    return str(status) if status != 200 or body == b"5120\n" else "badbody"


def s_read_chunked():
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(BODY[i:i + 1000]), BODY[i:i + 1000])
                      for i in range(0, len(BODY), 1000))
    (status, body), = exchange(b"POST /read HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + chunks + b"0\r\n\r\n")
    return str(status) if status != 200 or body == b"5120\n" else "badbody"


def s_pipelined():
    req = get(b"/good") + b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 5\r\n\r\nhello" + get(b"/good")
    got = exchange(req, n=3)
    ok = [len(got[0][1]) == GOOD_BODY_LEN, got[1][1] == b"5\n", len(got[2][1]) == GOOD_BODY_LEN]
    return statuses(got) if all(ok) or got[0][0] != 200 else "badbody"


def s_cl_lies_less():
    # Content-Length 5, then more bytes: the rest is read as the next request (malformed: 400)
    return statuses(exchange(b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 5\r\n\r\n"
                             b"helloGARBAGE\r\n\r\n", n=2))


def s_cl_lies_more():
    # Content-Length 100, 10 bytes sent, then silence: client_body_timeout (2 s) -> 408
    return statuses(exchange(b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 100\r\n\r\n0123456789"))


def hang_up(parts, gap=0.0):
    sock = connect()
    try:
        for p in parts:
            sock.sendall(p)
            if gap:
                time.sleep(gap)
    finally:
        sock.close()
    return "hungup"


def s_hangup_mid_body():
    return hang_up([b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 5120\r\n\r\n" + BODY[:1000]])


def s_hangup_mid_chunk():
    return hang_up([b"POST /good HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"1000\r\n" + BODY[:700]], gap=0.1)


def s_hangup_mid_head():
    return hang_up([b"GET /good HTTP/1.1\r\nHo"])


def s_hangup_waiting():
    # leaves while the upstream is (perhaps) slow to answer
    return hang_up([get(b"/hostile/left")], gap=0.3)


def s_slowloris_hangup():
    head = get(b"/good", b"X-Slow: " + b"s" * 40 + b"\r\n")
    return hang_up([head[i:i + 8] for i in range(0, 48, 8)], gap=0.2)


def s_slowloris_wait():
    # a partial head, then nothing: closed at client_header_timeout (2 s), without an answer
    sock = connect(timeout=10)
    try:
        sock.sendall(b"GET /good HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
        t = time.monotonic()
        for _ in range(4):  # a few more bytes, slower than anyone reasonable
            time.sleep(0.2)
            sock.sendall(b"s")
        data = sock.recv(65536)
        if data:
            return "answered:" + data.split(b" ", 2)[1].decode("latin-1", "replace")
        return "closed" if time.monotonic() - t < 8 else "closed-late"
    finally:
        sock.close()


def s_hostile():
    return statuses(exchange(get(b"/hostile/%d" % random.randrange(1000))))


def s_faults(path):
    return simple(get(path), timeout=15)


# name, weight, function, expected outcomes
SCENARIOS = [
    ("good_get", 4, s_good_get, {"200"}),
    ("read_post", 3, s_read_post, {"200"}),
    ("read_chunked", 2, s_read_chunked, {"200"}),
    ("pipelined", 2, s_pipelined, {"200,200,200"}),
    ("malformed_line", 1, simple(b"GARBAGE\r\n\r\n"), {"400"}),
    ("bad_version", 1, simple(b"GET / HTTP/9.9\r\nHost: soak\r\n\r\n"), {"505", "400"}),
    ("bad_method", 1, simple(b"G@T / HTTP/1.1\r\nHost: soak\r\n\r\n"), {"400"}),
    ("binary_junk", 1, simple(bytes(random.Random(7).randrange(256) for _ in range(300)) + b"\r\n\r\n"),
     {"400", "closed", "reset"}),
    ("no_host", 1, simple(b"GET / HTTP/1.1\r\n\r\n"), {"400"}),
    ("long_uri", 1, simple(get(b"/" + b"u" * 10000)), {"414"}),
    ("big_header", 1, simple(get(b"/good", b"X-Big: " + b"b" * 12000 + b"\r\n")), {"431"}),
    ("many_headers", 1, simple(get(b"/good", b"".join(b"X-H%d: v\r\n" % i for i in range(150)))), {"431"}),
    ("huge_head", 1, simple(get(b"/good", b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 4000) for i in range(40)))),
     {"431", "reset"}),
    ("nul_in_field", 1, simple(get(b"/good", b"X-Nul: a\x00b\r\n")), {"400"}),
    ("obs_fold", 1, simple(get(b"/good", b"X-Fold: a\r\n  folded\r\n")), {"400"}),
    ("traversal", 1, simple(get(b"/%2e%2e/etc/passwd")), {"400"}),
    ("bad_chunked", 1, simple(b"POST /read HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"zz\r\nhello\r\n0\r\n\r\n"), {"400"}),
    ("chunked_bare_lf", 1, simple(b"POST /read HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\nhello\r\n0\r\n\r\n"), {"400"}),
    ("te_gzip", 1, simple(b"POST /read HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: gzip\r\n\r\n"), {"501"}),
    ("cl_and_te", 1, simple(b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 5\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), {"400"}),
    ("dup_cl", 1, simple(b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
     {"400"}),
    ("cl_too_big", 1, simple(b"POST /read HTTP/1.1\r\nHost: soak\r\nContent-Length: 2000000\r\n\r\n"), {"413"}),
    ("cl_lies_less", 1, s_cl_lies_less, {"200,400"}),
    ("cl_lies_more", 1, s_cl_lies_more, {"408"}),
    ("hangup_mid_body", 1, s_hangup_mid_body, {"hungup"}),
    ("hangup_mid_chunk", 1, s_hangup_mid_chunk, {"hungup"}),
    ("hangup_mid_head", 1, s_hangup_mid_head, {"hungup"}),
    ("hangup_waiting", 1, s_hangup_waiting, {"hungup"}),
    ("slowloris_hangup", 1, s_slowloris_hangup, {"hungup"}),
    ("slowloris_wait", 1, s_slowloris_wait, {"closed"}),
    ("hostile", 6, s_hostile, {"200", "502", "504", "truncated"}),
    ("error", 1, simple(get(b"/error")), {"500"}),
]
if ARGS.faults:
    SCENARIOS += [
        ("spin", 1, s_faults(b"/spin"), {"500"}),
        ("alloc", 1, s_faults(b"/alloc"), {"500"}),
    ]

OUTCOMES = {name: {} for name, *_ in SCENARIOS}
LOCK = threading.Lock()


def run_one(fn):
    try:
        return fn()
    except Truncated:
        return "truncated"
    except Closed:
        return "closed"
    except ConnectionResetError:
        return "reset"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "oserror:" + (e.__class__.__name__)
    except (ValueError, IndexError):
        return "unparsable"


def worker(deadline, seed):
    rnd = random.Random(seed)
    names = [s for s in SCENARIOS for _ in range(s[1])]
    while time.monotonic() < deadline:
        name, _, fn, _ = rnd.choice(names)
        outcome = run_one(fn)
        with LOCK:
            OUTCOMES[name][outcome] = OUTCOMES[name].get(outcome, 0) + 1
        time.sleep(ARGS.pause)


def main():
    deadline = time.monotonic() + ARGS.seconds
    threads = [threading.Thread(target=worker, args=(deadline, i), daemon=True) for i in range(ARGS.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {name: sorted(exp) for name, _, _, exp in SCENARIOS}
    unexpected = sum(n for name, outs in OUTCOMES.items() for o, n in outs.items() if o not in expected[name])
    with open(ARGS.out, "w") as f:
        json.dump({"outcomes": OUTCOMES, "expected": expected, "unexpected": unexpected}, f, indent=1)


if __name__ == "__main__":
    main()
