"""wire: what crosses the wire between SOS's programs and their clients.

blob.py (blob-server), sos.py (sos-server) and replicate.py share this
module, so each of them reads as the program it is.  It holds, top to bottom:

- The API's rules: which ids are valid, which hash a content id commits to,
  which X-* headers are a blob's metadata, the shard rule (``ab/cd/<id>``,
  whose first half is the bucket of /digests), and the headers every blob
  reply carries.
- Serving HTTP: a lean HTTP/1.1 handler with hard limits (request line,
  header count and size, chunk lines), deadlines enforced by one reaper
  thread, bodies by Content-Length or chunked, JSON errors, replies whose
  body is skipped for HEAD in one place, sendfile, Prometheus metrics and a
  Common Log Format access log written off the request path.
- Processes: workers sharing a port (SO_REUSEPORT), signals taken with
  sigwait, a graceful drain on SIGTERM, log reopening on SIGHUP.
- Settings: token files, TLS, the flags every server shares, and an
  argparse that takes the Go original's ``-port 4001`` spelling.
- Talking to servers: keep-alive connections to blob-servers (Pool, Reply).

It imports the standard library only, and everything it needs at import
time: a blob-server imports it before chrooting into its store.
"""

import argparse
import bisect
import collections
import ctypes
import email.utils
import hashlib
import hmac
import http.client
import http.server
import json
import logging
import mimetypes
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

VERSION = "1.0.0"

ID_RE = re.compile(r"[a-z0-9]{1,128}")
HEX_RE = re.compile(r"[0-9a-f]+")
RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
CONTENT_HASHES = {40: hashlib.sha1, 64: hashlib.sha256}
PAD = "-"                 # pads short ids in shard names; sorts before [a-z0-9]
CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024    # replies up to this size go out in a single write
HASH_KEEPS_GIL = 16 * 1024   # hash_update: hashed in 2 KiB pieces up to this

# Metadata: X-* headers stored with a blob.  Proxy and our own headers are not.
META_EXCLUDED = ("X-Forwarded-", "X-Real-Ip", "X-Sos-", "X-Cluster-",
                 "X-Content-Type-Options")
MAX_META_BYTES = 8192
MAX_META_HEADERS = 32

# HTTP limits.
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16384
MAX_CHUNK_LINE = 1024
IDLE_TIMEOUT = 10.0       # seconds a client may leave a write of ours, or a
                          # small body we drain, unfinished
HEAD_TIMEOUT = 10.0       # seconds to wait for, and read, a request head
MIN_RATE = 64 * 1024      # bytes/s a body or response must average, after
RATE_GRACE = 10.0         # ...this many seconds of slack
DRAIN_TIMEOUT = 30.0      # SIGTERM: how long in-flight requests may finish
REAPER_PERIOD = 0.25      # how often deadlines are looked at
PR_SET_PDEATHSIG = 1      # prctl(2)
DIGITS = re.compile(rb"[0-9]{1,19}")
HEXDIGITS = re.compile(rb"[0-9a-fA-F]{1,16}")
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Host: reg-name, IPv4 or [IPv6], and an optional port (RFC 9112 3.2).
HOST = re.compile(r"(?:[A-Za-z0-9\-._~%!$&'()*+,;=]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
           "CONNECT"}
# Objects never change, so a year of freshness; an error or a live figure
# must never be stored (a 404 is cacheable by default, RFC 9110 15.1).
IMMUTABLE = "max-age=31536000, immutable"
NO_STORE = "no-store"
# Served blobs are whatever their uploaders sent: never let a browser run one
# as a page of our origin.
SANDBOX = [("X-Content-Type-Options", "nosniff"),
           ("Content-Security-Policy", "default-src 'none'; sandbox")]
# A compressed file is served as what it is, never with a Content-Encoding
# that would make a browser unpack it.
ENCODED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                 "xz": "application/x-xz", "compress": "application/x-compress",
                 "br": "application/x-brotli"}

STATUS_LINES = {s: "HTTP/1.1 %d %s\r\n" % (s, s.phrase) for s in HTTPStatus}

# Upstream connections (sos-server and replicate to blob-servers).
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 60.0
POOL_IDLE = 5.0           # seconds an idle upstream connection is reused

log = logging.getLogger("wire")
access_log = logging.getLogger("access")


# --- The API's rules ----------------------------------------------------------

class InvalidId(ValueError):
    """Not an id: ids are 1-128 lowercase letters and digits."""


class BadMetadata(ValueError):
    """An X-* header value that can't be stored or sent back."""


class TooMuchMetadata(BadMetadata):
    """More X-* metadata than a blob may carry."""


class Missing(LookupError):
    """No such blob."""


class Corrupt(ValueError):
    """Bytes that do not hash to the content id they were sent under."""


def parse_size(text):
    """Parse '512M', '2G', '1048576' into bytes; raise ValueError otherwise."""
    m = re.fullmatch(r"([0-9]+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError("bad size %r (use e.g. 512M, 2G)" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def valid_id(blob_id):
    """True for ids the original accepted: lowercase letters and digits."""
    return isinstance(blob_id, str) and ID_RE.fullmatch(blob_id) is not None


def content_hash(blob_id):
    """The hash constructor an id commits to (SHA-1, SHA-256), else None."""
    ctor = CONTENT_HASHES.get(len(blob_id))
    return ctor if ctor and HEX_RE.fullmatch(blob_id) else None


def hash_update(h, data):
    """h.update(data), keeping the GIL for small data: hashlib lets go of it
    for 2 KiB or more, and under load taking it back cost a small fetch
    more than hashing (9% of a 4 KiB fetch's GIL-holding samples)."""
    if len(data) > HASH_KEEPS_GIL:
        h.update(data)
        return
    view = memoryview(data)
    for i in range(0, len(view), 2047):
        h.update(view[i:i + 2047])


def shard(blob_id):
    """(d1, d2): the directories blob_id lives under (``ab/cd/abcd...``).

    d1 is also the id's bucket in /digests.  Short ids pad with "-", which
    sorts before every id character, so walking the tree in name order yields
    ids in sorted order ("a" < "a0..." and its leaf "a-" < "a0")."""
    padded = blob_id[:4].ljust(4, PAD)
    return padded[:2], padded[2:]


def compatible(shard_path, prefix):
    """Can ids starting with prefix live under shard_path ("ab", "abcd")?"""
    stem = shard_path.rstrip(PAD)
    return stem.startswith(prefix) or prefix.startswith(stem)


def canonical_header(name):
    """Go's CanonicalMIMEHeaderKey: 'x-mime-type' -> 'X-Mime-Type'."""
    return "-".join(part.capitalize() for part in name.split("-"))


def blob_metadata(pairs):
    """The X-* headers of an upload that are stored with the blob.

    Takes (name, value) pairs; returns {Canonical-Name: value}.  Raises
    BadMetadata for values that could inject CR/LF or are too large.
    """
    meta = {}
    for name, value in pairs:
        if name[:2] not in ("X-", "x-"):
            continue              # most headers: skip before canonicalizing
        key = canonical_header(name)
        if key.startswith(META_EXCLUDED):
            continue
        # A hand-edited sidecar may hold numbers or lists: refused, not sent.
        if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
            raise BadMetadata("header %s: printable ASCII only" % key)
        meta[key] = value
    if len(meta) > MAX_META_HEADERS or sum(
            len(k) + len(v) for k, v in meta.items()) > MAX_META_BYTES:
        raise TooMuchMetadata("too much X-* metadata (max %d headers, %d bytes)"
                          % (MAX_META_HEADERS, MAX_META_BYTES))
    return meta


def blob_headers(blob_id, meta, ext="", private=False):
    """The headers of every reply that shows a blob (200, 206, 304): its ETag,
    caching (private: only the client may keep it, for a reply that needed
    a token), type (X-Mime-Type, else guessed from the name's .ext) and its
    stored X-* metadata.  send() adds the sandbox to every reply."""
    mime = meta.get("X-Mime-Type")
    if not mime and ext:
        mime, encoding = mimetypes.guess_type("x." + ext)
        mime = ENCODED_TYPES.get(encoding, mime)
    return [("ETag", '"%s"' % blob_id), ("Accept-Ranges", "bytes"),
            ("Cache-Control", "private, " + IMMUTABLE if private else IMMUTABLE),
            ("Content-Type", mime or "application/octet-stream")] + \
        sorted(meta.items())


def _names(header, etag, weak):
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or '"%s"' % etag in tags or (weak and 'W/"%s"' % etag in tags)


def precondition(headers, etag):
    """Evaluate If-Match and If-None-Match for an existing resource (RFC 9110
    13.2.2): 412, 304, or None to go on."""
    if "if-match" in headers and not _names(headers["if-match"], etag, False):
        return HTTPStatus.PRECONDITION_FAILED
    if "if-none-match" in headers and _names(headers["if-none-match"], etag, True):
        return HTTPStatus.NOT_MODIFIED
    return None


def http_range(headers, etag, size, method="GET"):
    """Apply the preconditions and Range to a resource of `size` bytes.

    Returns (status, offset, count, extra headers): 200 whole, 206 partial,
    304 not modified, 412 precondition failed, 416 unsatisfiable.  One range
    only; anything else (multiple ranges, other units), and any Range on HEAD,
    is ignored and the whole body sent, as RFC 9110 14.2 allows."""
    status = precondition(headers, etag)
    if status:
        return status, 0, 0, []
    rng = headers.get("range") if method == "GET" else None
    m = rng and RANGE.fullmatch(rng.strip())
    if not m or (not m.group(1) and not m.group(2)) or (
            headers.get("if-range") and headers["if-range"] != '"%s"' % etag):
        return HTTPStatus.OK, 0, size, []
    first, last = m.groups()
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return HTTPStatus.OK, 0, size, []
    else:
        start, end = max(0, size - int(last)), size - 1
    if start >= size or (not first and int(last) == 0):
        return (HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, 0, 0,
                [("Content-Range", "bytes */%d" % size)])
    return (HTTPStatus.PARTIAL_CONTENT, start, end - start + 1,
            [("Content-Range", "bytes %d-%d/%d" % (start, end, size))])


def chunked(chunks):
    """Frame an iterable of byte strings as a chunked body (RFC 9112 7.1)."""
    for chunk in chunks:
        if chunk:
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


# --- Serving HTTP ---------------------------------------------------------------

class HTTPError(Exception):
    """An error reply: status plus message, sent as {"error": message}."""

    def __init__(self, status, message=None, headers=()):
        self.status = HTTPStatus(status)
        self.message = message or self.status.phrase
        self.headers = headers
        super().__init__(self.message)


class FilePart:
    """A reply body read from an open file descriptor: count bytes from
    offset.  The caller closes the fd."""

    def __init__(self, fd, offset, count):
        self.fd, self.offset, self.count = fd, offset, count

    def chunks(self):
        """The bytes by pread: no file position, which dup'ed fds share."""
        end = self.offset + self.count
        for offset in range(self.offset, end, CHUNK):
            yield os.pread(self.fd, min(CHUNK, end - offset), offset)


class Tally:
    """One connection's request figures, kept without a lock: only its own
    thread writes them.  Histogram counts are per bucket, not cumulative."""

    def __init__(self):
        self.requests = {}        # (route, status) -> count
        self.latency = {}         # route -> [count per bucket..., +Inf, sum]
        self.bytes = [0, 0]       # in, out

    def observe(self, route, status, seconds, bytes_in, bytes_out):
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = [0] * (len(Metrics.BUCKETS) + 2)
        hist[bisect.bisect_left(Metrics.BUCKETS, seconds)] += 1
        hist[-1] += seconds
        self.bytes[0] += bytes_in
        self.bytes[1] += bytes_out

    def add(self, other):
        """Add other's figures into these."""
        for key, n in list(other.requests.items()):
            self.requests[key] = self.requests.get(key, 0) + n
        for route, hist in list(other.latency.items()):
            mine = self.latency.setdefault(route, [0] * len(hist))
            for i, n in enumerate(list(hist)):
                mine[i] += n
        self.bytes = [a + b for a, b in zip(self.bytes, other.bytes)]


class Metrics:
    """Request counters and latency histograms in Prometheus text format.

    Hand-written (stdlib only): counters by route and status, bytes in and
    out, and a latency histogram per route.  Programs add their own gauges
    and counters at render time.  Each connection counts into a Tally of its
    own, summed when /metrics is scraped, so no request waits on a lock
    that every other request takes too."""

    BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

    def __init__(self, prefix):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.closed = Tally()     # the figures of connections that ended
        self.open = set()         # the Tallies of live connections

    def tally(self):
        """A new connection's Tally; hand it back with retire()."""
        t = Tally()
        with self.lock:
            self.open.add(t)
        return t

    def retire(self, t):
        with self.lock:
            self.open.discard(t)
            self.closed.add(t)

    def total(self):
        with self.lock:
            total = Tally()
            for t in [self.closed, *self.open]:
                total.add(t)
        return total

    def render(self, extra=()):
        """The exposition text; extra is [(name, type, help, [(labels, value)])]."""
        p = self.prefix
        t = self.total()
        families = [
            ("%s_requests_total" % p, "counter", "HTTP requests by route and status",
             [({"route": r, "status": str(st)}, n)
              for (r, st), n in sorted(t.requests.items())]),
            ("%s_http_bytes_total" % p, "counter", "HTTP body bytes by direction",
             [({"direction": "in"}, t.bytes[0]), ({"direction": "out"}, t.bytes[1])])]
        hist_lines = []
        for route, hist in sorted(t.latency.items()):
            cumulative = 0
            for bound, n in zip(self.BUCKETS + ("+Inf",), hist):
                cumulative += n
                hist_lines.append('%s_request_seconds_bucket{route="%s",le="%s"} %d'
                                  % (p, route, bound, cumulative))
            hist_lines.append('%s_request_seconds_sum{route="%s"} %.6f'
                              % (p, route, hist[-1]))
            hist_lines.append('%s_request_seconds_count{route="%s"} %d'
                              % (p, route, cumulative))
        out = []
        for name, kind, text, samples in families + list(extra):
            out.append("# HELP %s %s\n# TYPE %s %s" % (name, text, name, kind))
            for labels, value in samples:
                lab = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\")
                                            .replace('"', '\\"')) for k, v in
                               sorted(labels.items()))
                out.append("%s%s %s" % (name, "{%s}" % lab if lab else "", value))
        out.append("# HELP %s_request_seconds Request latency by route\n"
                   "# TYPE %s_request_seconds histogram" % (p, p))
        out.extend(hist_lines)
        return "\n".join(out) + "\n"


class Handler(http.server.BaseHTTPRequestHandler):
    """A lean HTTP/1.1 handler with hard limits.

    It parses the request head itself (BaseHTTPRequestHandler's parser has no
    limits on header count or block size and goes through the email package),
    reads bodies with Content-Length or chunked encoding, answers Expect:
    100-continue only once the request was accepted, and turns HTTPError and
    unexpected exceptions into JSON replies.  Subclasses map (method, first
    path segment) to a method in `routes`; HEAD runs GET's method, and the
    body is left out in one place, send().
    """

    protocol_version = "HTTP/1.1"
    routes = {}
    open_routes = ()          # routes that need no token
    # Exceptions and the replies they become (None: the exception's text).
    # Programs add their own domain's.
    exceptions = {InvalidId: (HTTPStatus.BAD_REQUEST,
                              "invalid id: lowercase letters and digits only"),
                  Missing: (HTTPStatus.NOT_FOUND, "not found"),
                  Corrupt: (HTTPStatus.UNPROCESSABLE_ENTITY, None),
                  BadMetadata: (HTTPStatus.BAD_REQUEST, None),
                  TooMuchMetadata: (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, None)}
    tls_failed = False        # the TLS handshake failed: nothing to handle
    sandbox = True            # replies carry SANDBOX (not our own pages)
    linger = False            # unread request bytes: half-close gently

    # The socket stays blocking: the server's reaper enforces every deadline
    # (it shuts a late connection down, which wakes a blocked recv or send).
    # A socket timeout would cost a poll() before most reads, on every request.
    timeout = None

    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.watch(self)
        self.tally = self.server.metrics.tally()
        if self.server.tls:
            # The handshake runs here, in the connection's own thread and under
            # its deadline, so a silent client can't stall the accept loop.
            self.server.set_deadline(self, HEAD_TIMEOUT)
            try:
                # The handshake runs on self.request, so the reaper can
                # reach the socket it is blocked on (wrap_socket's own
                # handshake would hide it until done).
                self.request = self.server.tls.wrap_socket(
                    self.request, server_side=True, do_handshake_on_connect=False)
                self.request.do_handshake()
            except OSError as e:
                log.info("TLS handshake with %s failed: %s", self.client_address[0], e)
                self.request.close()
                self.tls_failed = True
                return
        super().setup()

    def handle(self):
        if not self.tls_failed:
            super().handle()

    def finish(self):
        self.server.metrics.retire(self.tally)
        if self.tls_failed:
            self.server.unwatch(self)
            return
        try:
            if self.linger:
                # Closing with unread request bytes makes the kernel send a
                # reset, which can destroy our reply before the client reads
                # it: half-close and swallow what is still coming, briefly.
                self.server.set_deadline(self, 2.0)
                self.connection.shutdown(socket.SHUT_WR)
                while self.connection.recv(CHUNK):
                    pass
        except OSError:
            pass
        self.server.unwatch(self)
        try:
            super().finish()
        except OSError:
            pass

    spread_from = None

    def spread(self, length):
        """For a body of `length` bytes (None: unknown) larger than SMALL_BODY,
        let this request's thread (and threads it starts) run on every CPU
        until the request ends.  A large transfer's work is in the kernel and
        in hashlib, which don't hold the GIL: kept to its worker's CPU, a
        1 GiB verified fetch ran at 0.31x nginx, not 0.43x."""
        if length is not None and length <= SMALL_BODY:
            return
        if self.server.cpus and not self.spread_from:
            self.spread_from = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.server.cpus)

    def handle_one_request(self):
        self.close_connection = True
        self.head_sent = False
        self.body_pending = False
        self.body_left = 0
        self.requestline = self.command = ""
        self.request_version = "HTTP/1.1"
        self.route = "unknown"
        self.status = 0
        self.sent = self.received = 0
        self.server.set_deadline(self, HEAD_TIMEOUT)
        started = time.monotonic()
        try:
            if not self.read_head():
                return
            self.close_connection = not self.keep_alive()
            # The head is in: the client is no longer late.  Our own work
            # (a cold /digests of a million blobs takes over 10 s) must not
            # be cut off; body reads and replies set deadlines of their own.
            self.server.set_deadline(self, None)
            self.server.set_busy(self, True)
            self.dispatch()
        except HTTPError as e:
            self.fail(e)
        except (OSError, ValueError) as e:
            # The client went away, timed out, or the deadline closed it.
            if not isinstance(e, (ConnectionError, TimeoutError)) and not \
                    self.server.expired(self):
                log.exception("error on %s %s", self.command, self.path)
                self.fail(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR))
            self.close_connection = True
        except Exception:
            log.exception("error on %s %s", self.command, self.path)
            self.fail(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            if self.spread_from:
                os.sched_setaffinity(0, self.spread_from)
                self.spread_from = None
            self.server.set_busy(self, False)
            if self.status:
                self.tally.observe(self.route, self.status,
                                   time.monotonic() - started, self.received,
                                   self.sent)
        if self.body_pending:
            # An unread body: the next request can't be found after it.
            self.close_connection = True
            self.linger = True

    def fail(self, err):
        """Send an error reply, or cut the connection if a reply has begun.

        The connection stays open when the request was read whole (a 404
        must not cost a keep-alive client a new connection and handshake);
        send() closes it when an unread body is in the way."""
        if self.head_sent:
            self.close_connection = True
            return
        try:
            self.send_json(err.status, {"error": err.message}, err.headers)
        except OSError:
            pass

    # Request parsing.

    def _readline(self, limit, status):
        line = self.rfile.readline(limit + 1)
        if len(line) > limit:
            raise HTTPError(status)
        return line

    def read_head(self):
        """Read the request line and headers; False on a clean EOF."""
        line = self._readline(MAX_REQUEST_LINE, HTTPStatus.REQUEST_URI_TOO_LONG)
        if line in (b"\r\n", b"\n"):       # tolerated before a request (RFC 9112)
            line = self._readline(MAX_REQUEST_LINE, HTTPStatus.REQUEST_URI_TOO_LONG)
        if not line:
            return False
        self.requestline = line.rstrip(b"\r\n").decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not line.endswith(b"\n"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
        self.request_version = version.decode()
        self.command = method.decode("latin-1")
        self.path = target.decode("latin-1")
        self.headers = headers = {}
        self.header_list = []
        total = 0
        while True:
            line = self._readline(MAX_HEADER_BYTES,
                                  HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            total += len(line)
            if total > MAX_HEADER_BYTES or len(self.header_list) >= MAX_HEADERS:
                raise HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "truncated header")
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.fullmatch(name):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed header")
            name = name.decode().lower()
            value = value.strip(b" \t\r\n").decode("latin-1")
            if "\r" in value or "\n" in value or "\0" in value:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed header")
            if name in headers:
                if name in ("content-length", "transfer-encoding", "host"):
                    raise HTTPError(HTTPStatus.BAD_REQUEST, "duplicate " + name)
                headers[name] += ", " + value
            else:
                headers[name] = value
            self.header_list.append((name, value))
        self.body_pending = "transfer-encoding" in headers or \
            headers.get("content-length", "0") != "0"
        host = headers.get("host")
        if (host is None and self.request_version == "HTTP/1.1") or (
                host is not None and not HOST.fullmatch(host)):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "missing or invalid Host")
        if self.command not in METHODS:
            raise HTTPError(HTTPStatus.NOT_IMPLEMENTED, "unknown method")
        return True

    def keep_alive(self):
        conn = self.headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"

    def dispatch(self):
        path, _, self.query = self.path.partition("?")
        if path.startswith(("http://", "https://")):      # absolute-form
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        if not path.startswith("/"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad request target")
        first, _, self.rest = path[1:].partition("/")
        method = self.routes.get(
            ("GET" if self.command == "HEAD" else self.command, first))
        if method is None:
            allowed = sorted({m for m, p in self.routes if p == first} |
                             ({"HEAD"} if ("GET", first) in self.routes else set()))
            if allowed:
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, headers=[
                    ("Allow", ", ".join(allowed))])
            raise HTTPError(HTTPStatus.NOT_FOUND, "Invalid method or location.")
        self.route = first
        token = self.server.token
        if token and first not in self.open_routes and not self.authorized(token):
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "missing or wrong token",
                            [("WWW-Authenticate", "Bearer")])
        try:
            getattr(self, method)()
        except Exception as e:
            mapped = self.exceptions.get(type(e))
            if mapped is None:
                raise
            raise HTTPError(mapped[0], mapped[1] or str(e)) from None

    def authorized(self, token):
        """Does the request carry `Authorization: Bearer <token>`?  Compared
        in constant time, so a guess learns nothing from the reply's timing."""
        given = self.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, b"Bearer " + token.encode())

    def params(self):
        """Query parameters as {name: last value}."""
        return {k: v[-1] for k, v in parse_qs(self.query).items()}

    # Request bodies.

    def body_length(self):
        """The declared body length, None for chunked; HTTPError otherwise."""
        te = self.headers.get("transfer-encoding")
        cl = self.headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise HTTPError(HTTPStatus.BAD_REQUEST,
                                "Content-Length with Transfer-Encoding")
            if te.lower() != "chunked":
                raise HTTPError(HTTPStatus.NOT_IMPLEMENTED,
                                "unsupported Transfer-Encoding")
            return None
        if cl is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED)
        if not DIGITS.fullmatch(cl.encode("latin-1")):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        return int(cl)

    def body(self, length):
        """Yield the request body in chunks (length None: chunked encoding).

        Sends 100 Continue first if the client asked, so a refused request
        never has its body sent.  The client must keep up MIN_RATE on average
        after RATE_GRACE seconds, or the connection is cut."""
        self.server.set_deadline(self, RATE_GRACE)
        self.spread(length)
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.body_left = 1 if length is None else length
        start = time.monotonic()
        received = 0
        chunks = self._chunked() if length is None else self._sized(length)
        for chunk in chunks:
            received += len(chunk)
            self.received = received
            self.server.set_deadline(self, RATE_GRACE + received / MIN_RATE
                                     - (time.monotonic() - start))
            yield chunk
        self.body_pending = False
        # The deadline paces the client's sending.  Once all is in, our own
        # work (fsync, or the sos-server's upstream calls, bounded by their
        # own timeouts) must not be cut short: the client would see a dropped
        # connection for an upload that may well have been stored.
        self.server.set_deadline(self, None)

    def _sized(self, length):
        while self.body_left:
            chunk = self.rfile.read1(min(CHUNK, self.body_left))
            if not chunk:
                raise ConnectionError("body ended early")
            self.body_left -= len(chunk)
            if not self.body_left:
                # All read, even if the consumer fails on this last chunk:
                # drain() must not wait for bytes that will never come.
                self.body_pending = False
            yield chunk

    def _chunked(self):
        while True:
            line = self._readline(MAX_CHUNK_LINE, HTTPStatus.BAD_REQUEST)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not HEXDIGITS.fullmatch(size):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunked body")
            left = int(size, 16)
            if left == 0:
                break
            while left:
                chunk = self.rfile.read1(min(CHUNK, left))
                if not chunk:
                    raise ConnectionError("body ended early")
                left -= len(chunk)
                yield chunk
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunked body")
        for _ in range(MAX_HEADERS):       # trailers, ignored
            line = self._readline(MAX_HEADER_BYTES, HTTPStatus.BAD_REQUEST)
            if line in (b"\r\n", b"\n"):
                return
            if not line:
                raise ConnectionError("body ended early")
        raise HTTPError(HTTPStatus.BAD_REQUEST, "too many trailers")

    def drain(self, limit=64 * 1024):
        """Discard a small unread body so the connection can be reused."""
        try:
            length = self.body_length()
        except HTTPError:
            return
        if self.body_pending and length is not None and length <= limit and \
                self.body_left in (0, length):
            self.body_left = length
            self.server.set_deadline(self, IDLE_TIMEOUT)
            for _ in self._sized(length):
                pass
            self.body_pending = False

    # Replies.

    def write_head(self, status, headers=(), length=None, first=b""):
        """Send the status line and headers, and `first` body bytes with them
        (one write for a small reply); the caller sends the rest."""
        out = [STATUS_LINES[status], "Server: %s\r\nDate: %s\r\n" % (
            self.server.version, self.server.date())]
        for name, value in headers:
            out.append("%s: %s\r\n" % (name, value))
        if length is not None and status != HTTPStatus.NOT_MODIFIED:
            # A 304's Content-Length would have to be the 200's (RFC 9110
            # 8.6): send none.
            out.append("Content-Length: %d\r\n" % length)
        if self.close_connection:
            out.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            out.append("Connection: keep-alive\r\n")
        out.append("\r\n")
        # Logged before it is sent: once a client has the reply, the log
        # has the line.
        self.log_request(int(status), length if length is not None else "-")
        # The client must take the reply at MIN_RATE (after RATE_GRACE), or
        # the reaper cuts it off: sockets have no timeout of their own.
        self.server.set_deadline(self, RATE_GRACE + (length or 0) / MIN_RATE)
        self.wfile.write("".join(out).encode("latin-1") + first)
        self.head_sent = True
        self.status = int(status)
        self.sent = length or 0

    def send(self, status, headers=(), body=b"", length=None):
        """Send a reply; HEAD gets the same head and no body.

        body is bytes, a FilePart (sent with sendfile; the caller closes the
        file), or an iterable of byte strings: `length` bytes in all, or if
        length is None, sent chunked (to HTTP/1.0, until the connection
        closes)."""
        if self.body_pending and "100-continue" not in self.headers.get("expect", ""):
            self.drain()
        if self.body_pending:
            self.close_connection = True
        head = self.command == "HEAD"
        headers = list(headers)
        if not any(name == "Cache-Control" for name, _ in headers):
            headers.append(("Cache-Control", NO_STORE))
        if self.sandbox:
            headers += SANDBOX
        if isinstance(body, bytes):
            self.write_head(status, headers, len(body), b"" if head else body)
            return
        if isinstance(body, FilePart):
            self.send_file(status, headers, body, head)
            return
        if length is None:
            if self.request_version == "HTTP/1.0":
                self.close_connection = True
            else:
                headers.append(("Transfer-Encoding", "chunked"))
                body = chunked(body)
        self.write_head(status, headers, length)
        if not head:
            self.spread(length)     # before the body's threads start
            for data in body:
                if length is None:      # no overall deadline: one per write
                    self.server.set_deadline(self, IDLE_TIMEOUT)
                self.wfile.write(data)

    def send_file(self, status, headers, part, head):
        if part.count <= SMALL_BODY and not head:
            # A small file goes out with its head in one write: cheaper than
            # sendfile's setup, and a file that shrank under us is found
            # before anything is sent.
            data = os.pread(part.fd, part.count, part.offset)
            if len(data) != part.count:
                raise HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                "file changed while being read")
            self.write_head(status, headers, part.count, data)
            return
        self.write_head(status, headers, part.count)
        if part.count and not head:
            self.spread(part.count)
            with open(part.fd, "rb", closefd=False) as f:
                sent = self.connection.sendfile(f, part.offset, part.count)
            if sent != part.count:
                log.error("%s: sent %d of %d bytes: file changed?", self.path,
                          sent, part.count)
                self.close_connection = True

    def send_json(self, status, obj, headers=()):
        self.send(status, list(headers) + [("Content-Type", "application/json")],
                  json.dumps(obj).encode() + b"\n")

    def send_text(self, status, text, content_type="text/plain; charset=utf-8"):
        self.send(status, [("Content-Type", content_type)], text.encode())

    def log_request(self, code="-", size="-"):
        line = '%s - - [%s] "%s" %s %s' % (self.client_address[0],
                                           self.server.date(clf=True),
                                           self.requestline, code, size)
        writer = access_log.handlers[0] if access_log.handlers else None
        if type(writer) is AccessLogWriter:
            writer.append(line)      # no LogRecord, no handler lock
        else:
            access_log.info("%s", line)

    def log_message(self, format, *args):
        log.info("%s " + format, self.client_address[0], *args)


class Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server that cuts off clients past their deadline and
    can drain in-flight requests on shutdown."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address, handler, name, metrics, token=None, tls=None,
                 reuse_port=False):
        """Bind to address; handler serves each connection.  name goes in the
        Server header, metrics counts the requests (servers may share one),
        every request must carry `Authorization: Bearer <token>` if a token
        is given, tls is an ssl.SSLContext to serve HTTPS."""
        self.version = "%s/%s" % (name, VERSION)
        self.metrics = metrics
        self.token = token
        self.tls = tls
        self.reuse_port = reuse_port
        self.cpus = None         # every CPU, once serve_workers pinned workers
        self._watched = {}       # handler -> [deadline, busy]
        self._watch_lock = threading.Lock()
        self._date = (0, "", "")
        super().__init__(address, handler)

    def serve_forever(self, poll_interval=0.5):
        # Threads start here, not in __init__, so a bound server can be forked.
        threading.Thread(target=self._reaper, daemon=True).start()
        super().serve_forever(poll_interval)

    def server_bind(self):
        # HTTPServer.server_bind calls getfqdn(), which may hang on DNS and
        # fails after a chroot.  We need neither.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind(self.server_address)
        except OSError as e:
            raise OSError(e.errno, "cannot listen on %s:%d: %s" % (
                self.server_address[0], self.server_address[1], e.strerror)) from None
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = self.server_address[:2]

    def date(self, clf=False):
        """The Date header value (or the access log's), formatted once a second."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, email.utils.formatdate(now, usegmt=True),
                          time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now)))
        return self._date[2 if clf else 1]

    def watch(self, handler):
        with self._watch_lock:
            self._watched[handler] = [None, False]

    def unwatch(self, handler):
        with self._watch_lock:
            self._watched.pop(handler, None)

    def set_deadline(self, handler, seconds):
        """Cut handler's connection `seconds` from now (None: no deadline)."""
        entry = self._watched.get(handler)
        if entry:
            entry[0] = None if seconds is None else time.monotonic() + seconds

    def set_busy(self, handler, busy):
        entry = self._watched.get(handler)
        if entry:
            entry[1] = busy

    def expired(self, handler):
        entry = self._watched.get(handler)
        return bool(entry and entry[0] and entry[0] < time.monotonic())

    def busy(self):
        return sum(1 for _, busy in list(self._watched.values()) if busy)

    def _reaper(self):
        # One thread enforces every connection's deadline, rather than a
        # timer per socket: a slow client is shut down, which wakes its
        # handler thread out of recv/send with an error.
        while True:
            time.sleep(REAPER_PERIOD)
            now = time.monotonic()
            with self._watch_lock:
                late = [h for h, (d, _) in self._watched.items() if d and d < now]
            for h in late:
                try:
                    # h.request, not h.connection: during a TLS handshake
                    # (in setup) only the former exists.
                    h.request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drain(self, timeout=DRAIN_TIMEOUT):
        """Stop accepting and wait for in-flight requests; True if all ended."""
        self.shutdown()
        self.socket.close()
        end = time.monotonic() + timeout
        while self.busy() and time.monotonic() < end:
            time.sleep(0.05)
        return not self.busy()



# --- Processes: signals, workers, logs -----------------------------------------

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve(servers, on_stop=None):
    """Run servers until SIGTERM or SIGINT, then drain them; returns exit code.

    Signals are blocked and taken with sigwait rather than handled: a handler
    runs between two bytecodes of the main thread, and one that set an Event
    while the main thread was inside Event.wait() deadlocked on its lock.
    Threads inherit the mask, so it must be set before any thread starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.stack_size(512 * 1024)    # thousands of idle clients stay cheap
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    while signal.sigwait(SIGNALS) == signal.SIGHUP:
        reopen_logs()
    log.info("shutting down: draining in-flight requests")
    ok = all([srv.drain() for srv in servers])
    if on_stop:
        on_stop()
    for handler in access_log.handlers:
        handler.flush()
    if not ok:
        log.warning("some requests did not finish within %ds", DRAIN_TIMEOUT)
    return 0


def die_with_parent():
    """Have the kernel send this (forked) process SIGTERM when its parent
    dies: a worker must not go on serving a port once its master was killed
    (kill -9, the OOM killer), where nobody would ever stop it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass                    # not Linux: workers stop with the master's SIGTERM
    if os.getppid() == 1:       # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def serve_workers(workers, on_start=None, pin=True):
    """Serve each worker's servers in a process of its own.

    workers is a list of lists of servers; the workers' servers are bound to
    the same ports with SO_REUSEPORT, and the kernel spreads connections
    across them.  This process serves the first worker and, on SIGTERM,
    stops the others and waits for them.  on_start runs in every process
    once forked (threads don't survive a fork, so none may start before).

    With pin and several workers, each keeps to a CPU of its own, in turn
    over the CPUs this process may use.  A worker's threads take turns on
    one GIL anyway; handing it over on one CPU is cheap, while waking a
    thread on another (idle) CPU cost more than the request itself: blob
    GETs over 16 connections ran at 13k/s and 117 us of CPU each unpinned,
    31k/s and 50 us pinned."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)     # see serve()
    cpus = sorted(os.sched_getaffinity(0)) if pin and len(workers) > 1 else []
    for srv in (srv for servers in workers for srv in servers):
        srv.cpus = set(cpus) or None
    children = []
    for index, servers in enumerate(workers[1:], 1):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            keep_to_cpu(cpus, index)
            for other in workers:
                if other is not servers:
                    for srv in other:
                        srv.socket.close()
            if on_start:
                on_start()
            os._exit(serve(servers))
        children.append(pid)
        for srv in servers:
            srv.socket.close()
    keep_to_cpu(cpus, 0)
    if on_start:
        on_start()
    code = serve(workers[0])
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = code or (os.waitstatus_to_exitcode(status) != 0)
    return int(code)


def keep_to_cpu(cpus, index):
    """Keep this thread, and the threads it starts, to cpus[index] (in turn)."""
    if cpus:
        try:
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})
        except OSError:
            pass                # the CPU went away meanwhile: run anywhere


def setup_logging(verbose, access_log_file=None, serving=True):
    """Log to stderr; a server's access log (Common Log Format) there too, or
    to a file."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if serving:
        access_log.propagate = False
        access_log.addHandler(AccessLogWriter(access_log_file))


class AccessLogWriter(logging.Handler):
    """The access log's output.  Request threads only append a line; a
    background thread writes them out every 0.2 s, so no request waits on a
    slow disk or pipe (with a plain handler, one thread's write held a lock
    that every other request queued behind).

    A file is reopened on SIGHUP through a descriptor of its directory, so
    even a blob-server that chrooted into its store can follow logrotate
    (once privileges are dropped, that directory must be writable by --user).
    """

    def __init__(self, path=None):
        super().__init__()
        self.path = path and os.path.abspath(path)
        self.dir_fd = self.path and os.open(os.path.dirname(self.path),
                                            os.O_RDONLY | os.O_DIRECTORY)
        self.lines = collections.deque()
        self.stream = None
        self.reopen = True
        self.writing = False           # a writer thread runs in this process
        self.write_lock = threading.Lock()
        # Threads don't survive a fork: a forked worker starts its own.
        os.register_at_fork(after_in_child=lambda: setattr(self, "writing", False))
        if self.path:
            self.flush()               # a bad path fails now, not later

    def emit(self, record):
        self.append(record.getMessage())

    def append(self, line):
        self.lines.append(line)
        if not self.writing:
            self.writing = True
            threading.Thread(target=self._write_forever, daemon=True).start()

    def _write_forever(self):
        while True:
            time.sleep(0.2)
            try:
                self.flush()
            except OSError:
                # A full or failing log disk costs the lines of this round,
                # not the writer: without it they would pile up in memory.
                continue

    def flush(self):
        with self.write_lock:
            lines = []
            while self.lines:
                lines.append(self.lines.popleft())
            if self.path and self.reopen:
                self.reopen = False
                name = os.path.basename(self.path)
                try:
                    stream = open(name, "a", encoding="utf-8", opener=lambda _, f:
                                  os.open(name, f | os.O_NOFOLLOW, 0o644,
                                          dir_fd=self.dir_fd))
                except OSError as e:
                    if not self.stream:
                        raise               # at start-up: a bad path is fatal
                    log.error("cannot reopen %s, still writing the old file: %s",
                              self.path, e)
                else:
                    if self.stream:
                        self.stream.close()
                    self.stream = stream
            if lines:
                out = self.stream or sys.stderr
                out.write("\n".join(lines) + "\n")
                out.flush()


def reopen_logs():
    """SIGHUP: reopen the access log file, so logrotate can move it away."""
    for handler in access_log.handlers:
        if isinstance(handler, AccessLogWriter) and handler.path:
            handler.reopen = True
            handler.flush()


# --- Settings: tokens, TLS, flags ---------------------------------------------

def read_token(path):
    """The secret in a token file, stripped; exits with a message if unusable."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit("cannot read token file %s: %s" % (path, e))
    if not token or not all(" " < c <= "~" for c in token):
        sys.exit("token file %s: expected one printable ASCII word" % path)
    return token


def tls_context(cert, key):
    """A server-side SSL context, or None without a certificate."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def add_server_args(parser):
    """Flags every server shares: workers, logging, tokens and TLS."""
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes sharing the port(s) (default: one per "
                        "CPU, %(default)s here)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let workers move between CPUs (by default each "
                        "of several workers keeps to a CPU of its own)")
    parser.add_argument("--access-log", metavar="FILE",
                        help="write the access log here (reopened on SIGHUP) "
                        "instead of stderr")
    parser.add_argument("--cluster-token", metavar="FILE",
                        help="shared secret of sos-server, replicate and "
                        "blob-servers")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with "
                        "this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="its private key")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that also takes Go-style single-dash long flags (-port 4001)."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        longs = {s for a in self._actions for s in a.option_strings
                 if s.startswith("--")}
        fixed = []
        for arg in args:
            name = arg.split("=", 1)[0]
            if name.startswith("-") and not name.startswith("--") and \
                    "-" + name in longs:
                arg = "-" + arg
            fixed.append(arg)
        return super().parse_args(fixed, namespace)



# --- Talking to blob-servers --------------------------------------------------

class Headers:
    """A reply's header fields: get() by any case, items() as sent."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.index = {name.lower(): value for name, value in pairs}

    def get(self, name, default=None):
        return self.index.get(name.lower(), default)

    def items(self):
        return list(self.pairs)


class Connection:
    """One keep-alive connection to a server: a socket and its reader.

    Our own small HTTP/1.1 client: http.client parses every reply's header
    block with the email package, which cost more than the rest of a small
    fetch.  It speaks what blob-servers (ours and the Go original's) send:
    Content-Length, chunked or close-delimited bodies."""

    def __init__(self, url, connect_timeout, timeout, ssl_context):
        parts = urlsplit(url)
        self.host = parts.netloc
        sock = socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
            connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if parts.scheme == "https":
                sock = ssl_context.wrap_socket(sock, server_hostname=parts.hostname)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def close(self):
        self.rfile.close()
        self.sock.close()

    def send(self, method, path, headers, body):
        head = "".join(["%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, self.host)] +
                       ["%s: %s\r\n" % kv for kv in headers.items()] + ["\r\n"])
        data = head.encode("latin-1")
        if isinstance(body, bytes):
            self.sock.sendall(data + body)
            return
        self.sock.sendall(data)
        if isinstance(body, FilePart):
            if isinstance(self.sock, ssl.SSLSocket):
                body = body.chunks()        # TLS can't sendfile
            else:
                # No copy through our memory.  os.sendfile takes the offset,
                # so senders sharing the fd (dup'ed) don't race on it.
                with open(body.fd, "rb", closefd=False) as f:
                    self.sock.sendfile(f, body.offset, body.count)
                return
        for chunk in body or ():
            self.sock.sendall(chunk)

    def receive(self, method):
        """Read a reply's status line and headers: (status, Headers, framing)."""
        while True:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("closed without a reply")
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or \
                    not DIGITS.fullmatch(parts[1]):
                raise http.client.BadStatusLine(line[:100])
            status = int(parts[1])
            pairs = []
            while True:
                line = self.rfile.readline(MAX_HEADER_BYTES + 1)
                if line in (b"\r\n", b"\n"):
                    break
                name, sep, value = line.partition(b":")
                if not sep or not line.endswith(b"\n") or len(pairs) > MAX_HEADERS * 2:
                    raise http.client.HTTPException("bad header %r" % line[:100])
                pairs.append((name.decode("latin-1").strip(),
                              value.strip().decode("latin-1")))
            if status >= 200:     # a 100 Continue is followed by the reply
                break
        headers = Headers(pairs)
        close = "close" in headers.get("connection", "").lower() or \
            parts[0] == b"HTTP/1.0" and \
            "keep-alive" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            length = None
        else:
            cl = headers.get("content-length")
            length = int(cl) if cl and DIGITS.fullmatch(cl.encode()) else -1
            close = close or length == -1     # delimited by the close
        return status, headers, length, close


class Reply:
    """A server's answer: status, headers, and a body to read or stream.

    close() hands the connection back to the pool when the body was read to
    its end, and drops it otherwise.  Always close a Reply."""

    def __init__(self, pool, url, conn, status, headers, length, will_close):
        self.pool, self.url, self.conn = pool, url, conn
        self.status, self.headers = status, headers
        self.left = length        # body bytes to come; None: chunked; -1: to EOF
        self.chunk_left = 0
        self.will_close = will_close

    def read(self, n=None):
        """Up to n bytes of the body (all of it if n is None); b"" at its end."""
        if n is None:
            out = bytearray()
            while chunk := self.read(CHUNK):
                out += chunk
            return bytes(out)
        rfile = self.conn.rfile
        if self.left is None:                       # chunked
            if not self.chunk_left:
                line = rfile.readline(MAX_CHUNK_LINE)
                size = line.split(b";", 1)[0].strip()
                if not HEXDIGITS.fullmatch(size):
                    raise http.client.IncompleteRead(b"")
                self.chunk_left = int(size, 16)
                if not self.chunk_left:
                    while rfile.readline(MAX_HEADER_BYTES) not in (b"\r\n", b"\n", b""):
                        pass                        # trailers
                    self.left = 0
                    return b""
            data = rfile.read(min(n, self.chunk_left))
            if not data:
                raise http.client.IncompleteRead(b"")
            self.chunk_left -= len(data)
            if not self.chunk_left:
                rfile.readline(3)                   # the chunk's CRLF
            return data
        if self.left == -1:
            return rfile.read1(n) if n else b""
        data = rfile.read(min(n, self.left))
        if len(data) < min(n, self.left):
            raise http.client.IncompleteRead(data, self.left - len(data))
        self.left -= len(data)
        return data

    def readinto(self, buffer):
        """read() into buffer: how many bytes it now holds (0 at the end)."""
        if self.left is None or self.left == -1:
            data = self.read(len(buffer))
            buffer[:len(data)] = data
            return len(data)
        n = min(len(buffer), self.left)
        got = self.conn.rfile.readinto(memoryview(buffer)[:n]) if n else 0
        if got < n:
            raise http.client.IncompleteRead(b"", self.left - got)
        self.left -= got
        return got

    def json(self):
        try:
            return json.loads(self.read())
        finally:
            self.close()

    def close(self):
        if self.conn is None:
            return
        if self.left == 0 and not self.will_close:
            self.pool.put(self.url, self.conn)
        else:
            self.conn.close()
        self.conn = None


class Pool:
    """Keep-alive connections to blob-servers, reused across requests.

    The original opened a connection per request; reuse saves a handshake and
    a thread start on the server for every fetch.
    """

    def __init__(self, connect_timeout=CONNECT_TIMEOUT, timeout=READ_TIMEOUT,
                 token=None, ssl_context=None):
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.token = token
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._idle = {}
        self._lock = threading.Lock()

    def put(self, url, conn):
        with self._lock:
            idle = self._idle.setdefault(url, [])
            if len(idle) < 64:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def _connection(self, url, fresh=False):
        with self._lock:
            idle = self._idle.get(url)
            while idle and not fresh:
                since, conn = idle.pop()
                # blob-servers close connections idle for HEAD_TIMEOUT (10 s):
                # don't bet a request on one that may be closing.
                if time.monotonic() - since < POOL_IDLE:
                    return conn, True
                conn.close()
        return Connection(url, self.connect_timeout, self.timeout,
                          self.ssl_context), False

    def request(self, url, method, path, body=None, headers=None):
        """Send a request to the blob-server at url; returns a Reply.

        body is None, bytes, a FilePart (sent with sendfile), a callable
        returning a fresh iterable of chunks (so a request on a stale
        keep-alive connection can be resent), or an iterable that can be sent
        only once (on a new connection, then); a FilePart or an iterable needs
        a Content-Length or Transfer-Encoding in headers.
        Raises OSError (incl. timeouts) and http.client.HTTPException when the
        server can't be reached or answers nonsense."""
        return self.send(url, method, path, body, headers).reply()

    def send(self, url, method, path, body=None, headers=None):
        """Send a request (as request()) without waiting for its reply: an
        Exchange, whose reply() is the Reply.  A caller sends to several
        servers, then reads their replies: they work at once, on one thread."""
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if isinstance(body, bytes) or (body is None and method in ("POST", "PUT")):
            headers["Content-Length"] = str(len(body or b""))
        return Exchange(self, url, method, path, body, headers)


class Exchange:
    """A request sent on a pooled connection, its reply still to come."""

    def __init__(self, pool, url, method, path, body, headers):
        self.pool, self.url, self.method = pool, url, method
        self.request = (method, path, headers, body)
        # Only a body that can be sent again may go on a reused connection.
        self.once = not (body is None or isinstance(body, (bytes, FilePart))
                         or callable(body))
        self._send(fresh=self.once)

    def _send(self, fresh):
        self.conn, self.reused = self.pool._connection(self.url, fresh)
        method, path, headers, body = self.request
        try:
            self.conn.send(method, path, headers, body() if callable(body) else body)
        except (BrokenPipeError, ConnectionResetError):
            # The retry takes a new connection: when one idle connection was
            # stale (the blob-server restarted), the others in the pool are too.
            self.conn.close()
            if not self.reused:
                raise
            self._send(fresh=True)
        except BaseException:
            self.conn.close()
            raise

    def fileno(self):
        return self.conn.sock.fileno()

    def reply(self):
        """Wait for the reply's head: a Reply (close it)."""
        try:
            return Reply(self.pool, self.url, self.conn,
                         *self.conn.receive(self.method))
        except (http.client.RemoteDisconnected, ConnectionResetError):
            self.conn.close()
            if not self.reused:
                raise
            self._send(fresh=True)
            return self.reply()
        except BaseException:
            self.conn.close()
            raise
