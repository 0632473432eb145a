#!/usr/bin/env python3
"""bench/soak_hostile.py: the hostile upstream of bench/soak.

usage: soak_hostile.py PORT STATS_FILE

Listens on 127.0.0.1:PORT; each request gets the next mode of MODES (round robin over all
connections, so a connection the proxy keeps in its pool sees them too), and every kind of
misbehaviour keeps coming for the whole soak. On SIGTERM (or SIGINT) it writes
{"mode": connections} as JSON to STATS_FILE and exits. A thread per connection; every
connection is closed within a few seconds whatever the proxy does.
"""
import json
import random
import signal
import socket
import struct
import sys
import threading
import time

PORT, STATS_FILE = int(sys.argv[1]), sys.argv[2]
BODY = b"h" * 5120


def ok(body=BODY, extra=b""):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def read_request(sock, buf):
    """Reads one request (head and Content-Length body); returns the bytes after it."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError
        buf += data
    head, buf = buf.split(b"\r\n\r\n", 1)
    n = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v.strip() or 0)
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise EOFError
        buf += data
    return buf[n:]


def reset(sock):
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# Each mode answers one request: it gets the socket and the bytes read after the request, and
# returns whether the connection may serve another request.
def m_ok(sock, buf):
    sock.sendall(ok())
    return True


def m_slow(sock, buf):
    # the proxy's read timeout is 1 s: about half of these become 504
    time.sleep(random.uniform(0.4, 1.6))
    sock.sendall(ok())
    return False


def m_trickle(sock, buf):
    # the head, then the body 512 bytes every 0.1 s (each wait under the read timeout)
    data = ok()
    sock.sendall(data[:200])
    for i in range(200, len(data), 512):
        time.sleep(0.1)
        sock.sendall(data[i:i + 512])
    return False


def m_hang(sock, buf):
    # never answers; closes after the proxy gave up (504)
    time.sleep(2.5)
    return False


def m_reset_mid_body(sock, buf):
    sock.sendall(ok()[:1500])
    time.sleep(0.05)
    reset(sock)
    return False


def m_short_body(sock, buf):
    sock.sendall(ok()[:3000])  # promises 5120 body bytes, sends some, then a plain close
    return False


def m_close_silent(sock, buf):
    return False


def m_reset_silent(sock, buf):
    reset(sock)
    return False


def m_garbage_head(sock, buf):
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
    return False


def m_bad_status(sock, buf):
    sock.sendall(b"HTTP/1.1 2OO OK\r\nContent-Length: 5\r\n\r\nhello")
    return False


def m_bad_field(sock, buf):
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\nX\x00Y: z\r\n\r\nhello")
    return False


def m_huge_head(sock, buf):
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(80))  # ~80 KB
    sock.sendall(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 5\r\n\r\nhello")
    return False


def m_cl_te(sock, buf):
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n")
    return False


def m_dup_cl(sock, buf):
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
    return False


def m_bad_chunked(sock, buf):
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"400\r\n" + b"c" * 1024 + b"\r\nzz-not-hex\r\nmore\r\n0\r\n\r\n")
    return False


def m_stray_after(sock, buf):
    # a good answer with bytes after it on a keep-alive connection: the pool must not hand
    # them to the next request
    sock.sendall(ok(b"ok, then stray bytes") + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSMUGGLE")
    return True


def m_stray_later(sock, buf):
    # the same, the stray bytes arriving while the connection sits idle in the pool
    sock.sendall(ok(b"ok, stray bytes to follow"))
    time.sleep(0.2)
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSMUGGLE")
    return True


def m_many_interim(sock, buf):
    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 40 + ok())
    return False


def m_keepalive_then_close(sock, buf):
    # keep-alive advertised, closed right after: the pooled connection is dead on reuse
    sock.sendall(ok())
    time.sleep(0.05)
    return False


MODES = [
    ("ok", m_ok), ("slow", m_slow), ("trickle", m_trickle), ("hang", m_hang),
    ("reset_mid_body", m_reset_mid_body), ("short_body", m_short_body),
    ("close_silent", m_close_silent), ("reset_silent", m_reset_silent),
    ("garbage_head", m_garbage_head), ("bad_status", m_bad_status), ("bad_field", m_bad_field),
    ("huge_head", m_huge_head), ("cl_te", m_cl_te), ("dup_cl", m_dup_cl),
    ("bad_chunked", m_bad_chunked), ("stray_after", m_stray_after),
    ("stray_later", m_stray_later),
    ("many_interim", m_many_interim), ("keepalive_then_close", m_keepalive_then_close),
]
STATS = {name: 0 for name, _ in MODES}
LOCK = threading.Lock()
N = 0


def next_mode():
    global N
    with LOCK:
        name, mode = MODES[N % len(MODES)]
        N += 1
        STATS[name] += 1
    return mode


def serve(sock):
    sock.settimeout(5)
    buf = b""
    try:
        while True:
            buf = read_request(sock, buf)
            if not next_mode()(sock, buf):
                break
    except (EOFError, OSError, ValueError):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def finish(*_):
    with LOCK:
        with open(STATS_FILE, "w") as f:
            json.dump(STATS, f)
    sys.exit(0)


def main():
    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(256)
    while True:
        sock, _ = srv.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
