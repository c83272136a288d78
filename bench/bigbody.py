#!/usr/bin/env python3
"""bigbody: the large-object client of bench/bench.py's chunk rows.

    bigbody.py upload URL FILE [--times N]
    bigbody.py fetch URL

upload POSTs FILE to URL (sos-server's /upload) and prints one JSON line:
status, seconds (first byte sent to reply read), tail (the last byte handed
to the kernel to the reply's status line: what the server still did after
the client was done; loopback's send buffer, a few MiB at most, is in it)
and the reply.  With --times 1 the file goes by sendfile; with N > 1 it is
sent N times over, every 1 MiB block's first 8 bytes replaced by its
number, so no two chunks are alike, and the body's SHA-1 is computed here
(sha1) for fetch to be checked against.

fetch GETs URL and prints status, seconds, bytes and the body's SHA-1.
"""

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
from urllib.parse import urlsplit

BLOCK = 1 << 20


def connect(url):
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=600), u.path


def upload(url, path, times):
    conn, target = connect(url)
    size = os.path.getsize(path) * times
    conn.putrequest("POST", target)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    start = time.monotonic()
    h = None
    with open(path, "rb") as f:
        if times == 1:
            conn.sock.sendfile(f)
        else:
            h = hashlib.sha1()
            block = bytearray(BLOCK)
            n = 0
            for _ in range(times):
                f.seek(0)
                while got := f.readinto(block):
                    view = memoryview(block)[:got]
                    view[:8] = n.to_bytes(8, "big")
                    n += 1
                    h.update(view)
                    conn.sock.sendall(view)
    last = time.monotonic()
    reply = conn.getresponse()
    answered = time.monotonic()
    body = reply.read()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = body.decode("utf-8", "replace")[:500]
    print(json.dumps({"status": reply.status, "seconds": answered - start,
                      "tail": answered - last, "size": size, "answer": answer,
                      "sha1": h.hexdigest() if h else None}))


def fetch(url):
    conn, target = connect(url)
    start = time.monotonic()
    conn.request("GET", target)
    reply = conn.getresponse()
    h, size, buf = hashlib.sha1(), 0, bytearray(BLOCK)
    try:
        while got := reply.readinto(buf):
            h.update(memoryview(buf)[:got])
            size += got
    except (OSError, http.client.HTTPException) as e:
        print("fetch cut short after %d bytes: %s" % (size, e), file=sys.stderr)
    print(json.dumps({"status": reply.status, "seconds": time.monotonic() - start,
                      "size": size, "sha1": h.hexdigest()}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upload")
    u.add_argument("url")
    u.add_argument("file")
    u.add_argument("--times", type=int, default=1)
    f = sub.add_parser("fetch")
    f.add_argument("url")
    args = p.parse_args()
    if args.cmd == "upload":
        upload(args.url, args.file, args.times)
    else:
        fetch(args.url)


if __name__ == "__main__":
    main()
