#!/usr/bin/env python3
"""A raw-socket HTTP/1.1 upstream for the specs (spec/support/util.lua: util.python_upstream).

usage: upstream.py MODE PORT_FILE LOG_FILE [DATA_FILE]

Binds 127.0.0.1:0, writes the port to PORT_FILE, and logs one line per request or event to
LOG_FILE (flushed at once). Every connection is served by its own thread. Modes:

  record    answers "conn=C n=N" (200, keep-alive) and logs "conn=C n=N METHOD PATH body=LEN";
            a request for /drop... that arrives on a reused connection (N > 1) is read whole,
            logged, and the connection is closed without an answer (what an upstream that
            restarts, or closes an idle connection just as a request arrives, looks like).
  cut       reads the head and at most 64 KiB of the body, logs "cut after BYTES", and closes
            (the unread rest makes the close a reset); requests without a body get 200.
  chunked   answers DATA_FILE's bytes chunked (chunk sizes 1, 2, 3, 100, 4096, 65536, 7, ...,
            and a trailer field), keep-alive.
  close     answers DATA_FILE's bytes with no length, delimited by closing the connection
            (path /http10: an HTTP/1.0 status line).
  hostile   answers with a broken head chosen by the path (see HOSTILE) and closes.
  mute      reads each request whole, logs it, and closes without answering (a backend that
            dies while it handles the request).
"""
import os
import socket
import sys
import threading

MODE, PORT_FILE, LOG_FILE = sys.argv[1], sys.argv[2], sys.argv[3]
DATA = open(sys.argv[4], "rb").read() if len(sys.argv) > 4 else b""
LOG_LOCK = threading.Lock()

HOSTILE = {
    "/cl-dup": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "/cl-alpha": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    "/cl-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "/cl-neg": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "/cl-huge": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
    "/cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
}


def log(line):
    with LOG_LOCK:
        with open(LOG_FILE, "a") as f:
            f.write(line + "\n")


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            self.fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        return method, path, headers

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        out, self.buf = self.buf.split(b"\r\n", 1)
        return out

    def body(self, headers, limit=None):
        """The request body (decoded), or, with `limit`, at most that many raw bytes of it."""
        if "content-length" in headers:
            n = int(headers["content-length"])
            if limit is not None:
                while len(self.buf) < min(n, limit):
                    self.fill()
                got = self.buf[:limit]
                return got
            return self.exact(n)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            if limit is not None:
                while len(self.buf) < limit:
                    self.fill()
                return self.buf[:limit]
            out = b""
            while True:
                size = int(self.line().split(b";")[0], 16)
                if size == 0:
                    while self.line() != b"":
                        pass
                    return out
                out += self.exact(size)
                self.exact(2)
        return b""


def answer(sock, status, body, extra=b""):
    sock.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n" + extra + b"\r\n" + body)


def chunked(data):
    sizes, out, i, k = [1, 2, 3, 100, 4096, 65536, 7], [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(b"%x\r\n" % len(data[i:i + n]) + data[i:i + n] + b"\r\n")
        i, k = i + n, k + 1
    out.append(b"0\r\nX-Trailer: t\r\n\r\n")
    return b"".join(out)


def serve(sock, cid):
    c = Conn(sock)
    n = 0
    try:
        while True:
            method, path, headers = c.head()
            n += 1
            if MODE == "cut":
                if "content-length" in headers or "transfer-encoding" in headers:
                    got = c.body(headers, limit=65536)
                    log("cut after %d" % len(got))
                    return
                answer(sock, b"200 OK", b"ok")
                continue
            body = c.body(headers)
            log("conn=%d n=%d %s %s body=%d" % (cid, n, method, path, len(body)))
            if MODE == "record":
                if path.startswith("/drop") and n > 1:
                    log("conn=%d closed without answering" % cid)
                    return
                answer(sock, b"200 OK", b"conn=%d n=%d" % (cid, n))
            elif MODE == "chunked":
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(DATA))
            elif MODE == "close":
                line = b"HTTP/1.0 200 OK\r\n" if path == "/http10" else b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                sock.sendall(line + b"Content-Type: application/octet-stream\r\n\r\n" + DATA)
                return
            elif MODE == "mute":
                return
            elif MODE == "hostile":
                sock.sendall(HOSTILE.get(path, HOSTILE["/ok"]))
                return
    except (EOFError, ConnectionError):
        pass
    finally:
        sock.close()


def main():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    with open(PORT_FILE + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(PORT_FILE + ".tmp", PORT_FILE)
    cid = 0
    while True:
        sock, _ = srv.accept()
        cid += 1
        threading.Thread(target=serve, args=(sock, cid), daemon=True).start()


if __name__ == "__main__":
    main()
