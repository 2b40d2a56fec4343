#!/usr/bin/env python3
"""A raw TCP client for the HTTP server specs: sends exact bytes, reads with timing.

Usage: raw_http.py JSON, where JSON is {"port": N, "rcvbuf": BYTES (optional),
"steps": [...]} and each step is one of
  {"send": TEXT}                     the text's bytes (latin-1)
  {"sleep": SECS}
  {"read": SECS, "want": TEXT, "bytes": N, "quiet": true}
                                     read until TEXT has arrived (in this step's
                                     bytes), N bytes arrived, the peer closed, or SECS
                                     passed; quiet reads only count the bytes
  {"close": true}                    close the socket (abortively with "reset": true)
After the steps it prints {"chunks": [[t, TEXT], ...], "bytes": N, "eof": t or
null, "error": TEXT or null}, t in seconds since the connection was made. A dropped
connection ends the steps early.
"""
import json
import socket
import struct
import sys
import time


def main():
    spec = json.loads(sys.argv[1])
    sock = socket.socket()
    if spec.get("rcvbuf"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec["rcvbuf"])
    sock.connect(("127.0.0.1", spec["port"]))
    t0 = time.monotonic()
    out = {"chunks": [], "bytes": 0, "eof": None, "error": None}

    def elapsed():
        return round(time.monotonic() - t0, 4)

    def read(step):
        deadline = time.monotonic() + step["read"]
        want = step.get("want", "").encode("latin-1")
        got = b""
        start = out["bytes"]
        while True:
            if want and want in got:
                return
            if step.get("bytes") and out["bytes"] - start >= step["bytes"]:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return
            if not data:
                out["eof"] = elapsed()
                raise EOFError
            out["bytes"] += len(data)
            if not step.get("quiet"):
                got += data
                out["chunks"].append([elapsed(), data.decode("latin-1")])

    try:
        for step in spec["steps"]:
            if "send" in step:
                sock.sendall(step["send"].encode("latin-1"))
            elif "sleep" in step:
                time.sleep(step["sleep"])
            elif "read" in step:
                read(step)
            elif "close" in step:
                if step.get("reset"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                break
    except EOFError:
        pass
    except OSError as e:
        out["error"] = "%s: %s" % (type(e).__name__, e)
        out["eof"] = out["eof"] or elapsed()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
