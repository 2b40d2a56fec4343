#!/usr/bin/env python3
"""A small HTTP/1.1 test server for the HTTP client specs (Python 3 stdlib only).

Usage: http_server.py [--port N] [--tls CERT KEY]
Listens on 127.0.0.1 (port 0 by default: any free port), over TLS with --tls, and
prints the port on stdout, then serves until killed. Endpoints:
  /echo                 any method: JSON {method, path, headers, body}
  /bytes/N              N bytes of "x" (Content-Length)
  /status/N             status N, body "status N"
  /slow/SECS            waits SECS, then "slow"
  /stream/N/SECS        N chunks "chunk I\\n" (chunked encoding), SECS apart
  /sse                  a text/event-stream: comments, multi-line data, id, retry,
                        events split across writes, CRLF and LF line ends
  /truncated            promises 1000 bytes, sends 100, closes the connection
  /redirect             302 to /echo
  /headers              a response with a repeated header (x-multi: a, b)
  /blackhole            the port of a listener whose accept queue is full, so a
                        connection to it never completes (connect timeouts)
"""
import argparse
import json
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def full_listener():
    """A listening socket that never accepts, its queue filled so that further
    connection attempts get no answer."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lsock.getsockname())
        fillers.append(c)
    return lsock, fillers


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    blackhole = None

    def log_message(self, fmt, *args):
        pass

    def send_body(self, status, body, ctype="text/plain", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def handle_any(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        name = parts[0]
        if name == "echo":
            doc = {"method": self.command, "path": self.path,
                   "headers": {k.lower(): v for k, v in self.headers.items()},
                   "body": body.decode("latin-1")}
            self.send_body(200, json.dumps(doc).encode(), "application/json")
        elif name == "bytes":
            self.send_body(200, b"x" * int(parts[1]))
        elif name == "status":
            code = int(parts[1])
            self.send_body(code, b"" if code in (204, 304) else b"status %d" % code)
        elif name == "slow":
            time.sleep(float(parts[1]))
            self.send_body(200, b"slow")
        elif name == "stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for i in range(int(parts[1])):
                time.sleep(float(parts[2]))
                self.chunk(b"chunk %d\n" % (i + 1))
            self.chunk(b"")
        elif name == "sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pieces = [b": hello\n\n", b"data: one\n\n",
                      b"event: update\r\nid: 7\r\ndata: line 1\r\ndata: line 2\r\n\r\n",
                      b"retry: 1500\ndata: sp", b"lit\n", b"\n",
                      b"data: last\r", b"\n\r\n", b"data: dropped at the end"]
            for p in pieces:
                self.chunk(p)
                time.sleep(0.02)
            self.chunk(b"")
        elif name == "truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"y" * 100)
            self.wfile.flush()
            self.close_connection = True
        elif name == "redirect":
            self.send_body(302, b"moved", extra=[("Location", "/echo")])
        elif name == "headers":
            self.send_body(200, b"ok", extra=[("X-Multi", "a"), ("X-Multi", "b")])
        elif name == "blackhole":
            if not Handler.blackhole:
                Handler.blackhole = full_listener()
            self.send_body(200, str(Handler.blackhole[0].getsockname()[1]).encode())
        else:
            self.send_body(404, b"not found")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048

    def handle_error(self, request, client_address):
        """Clients that hang up early are part of the tests."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = ap.parse_args()
    server = Server(("127.0.0.1", args.port), Handler)
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*args.tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
