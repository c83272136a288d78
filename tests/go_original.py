"""A stand-in for the Go original's blob-server, for mixed-cluster tests.

The Go original is a foreign program we must stay compatible with, not one
of our components, so a small imitation of its API is fair game (exactly as
shared/seed/ORIGINAL.md describes it):

    GET  /alive        "alive"
    GET  /blobs        every id as one JSON array, unsorted; query ignored
    POST /blob/<id>    store the body and its X-* headers; {"id","status","size"}
    GET  /blob/<id>    the bytes, X-* headers, X-Mime-Type as Content-Type
    HEAD /blob/<id>    200 or 404, no Content-Length

No /digests, no /stats, no paging, no verification: those are ours.  Like
Go's net/http, bodies over 2 KiB go out chunked (no Content-Length).
"""

import http.server
import json
import random
import re
import threading

ID_RE = re.compile(r"[a-z0-9]+")
GO_CHUNKING = 2048        # net/http buffers this much before going chunked


def canonical(name):
    return "-".join(p.capitalize() for p in name.split("-"))


class GoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        self.server.requests.append(self.requestline)

    def reply(self, status, body=b"", headers=(), chunked=False):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 4096):
                piece = body[i:i + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def blob_id(self):
        blob_id = self.path.split("?")[0][len("/blob/"):]
        if not ID_RE.fullmatch(blob_id):
            self.reply(500, b"alphanumeric IDs only\n")
            return None
        return blob_id

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/alive":
            self.reply(200, b"alive")
        elif path == "/blobs":
            ids = list(self.server.blobs)
            random.shuffle(ids)
            self.reply(200, json.dumps(ids).encode(),
                       [("Content-Type", "application/json")])
        elif path.startswith("/blob/"):
            blob_id = self.blob_id()
            if blob_id is None:
                return
            found = self.server.blobs.get(blob_id)
            if found is None:
                self.reply(404, b"Not found\n")
                return
            data, meta = found
            headers = sorted(meta.items())
            if "X-Mime-Type" in meta:
                headers.append(("Content-Type", meta["X-Mime-Type"]))
            self.reply(200, data, headers, chunked=len(data) > GO_CHUNKING)
        else:
            self.reply(404, b"404 page not found\n")

    def do_HEAD(self):
        if self.path.startswith("/blob/"):
            blob_id = self.blob_id()
            if blob_id is not None:
                self.send_response(200 if blob_id in self.server.blobs else 404)
                self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def do_POST(self):
        if not self.path.startswith("/blob/"):
            self.reply(404, b"404 page not found\n")
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        blob_id = self.blob_id()
        if blob_id is None:
            return
        meta = {canonical(k): v for k, v in self.headers.items()
                if k.lower().startswith("x-")}
        self.server.blobs[blob_id] = (bytes(data), meta)
        self.reply(200, json.dumps({"id": blob_id, "status": "OK",
                                    "size": len(data)}).encode())


class GoOriginal:
    """The imitation, serving on an ephemeral loopback port in a thread.

    .blobs is {id: (bytes, {X-Header: value})}; .requests the request lines."""

    def __init__(self):
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GoHandler)
        self.srv.blobs = self.blobs = {}
        self.srv.requests = self.requests = []
        self.url = "http://127.0.0.1:%d" % self.srv.server_port
        threading.Thread(target=self.srv.serve_forever,
                         kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()
