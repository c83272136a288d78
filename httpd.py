"""httpd: a lean HTTP/1.1 server with hard limits, which every SOS server runs.

Handler parses the request head itself (limits on the request line, header
count and size, chunk lines), reads bodies by Content-Length or chunked,
turns exceptions into JSON error replies along the class hierarchy, skips
the body of HEAD in one place (send), and sends files with sendfile.
Server enforces every connection's deadlines from one reaper thread and
drains in-flight requests on shutdown.  AccessLogWriter writes the Common
Log Format access log off the request path.
"""

import collections
import email.utils
import hmac
import http.server
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from urllib.parse import parse_qs

from rules import (CHUNK, DIGITS, HEXDIGITS, MAX_CHUNK_LINE, MAX_HEADER_BYTES,
                   MAX_HEADERS, MAX_REQUEST_LINE, VERSION, BadMetadata, Corrupt,
                   FilePart, InvalidId, Missing, TooMuchMetadata, chunked)

SMALL_BODY = 64 * 1024    # replies up to this size go out in a single write
# Deadlines: a socket has no timeout of its own; the reaper enforces these.
IDLE_TIMEOUT = 10.0       # seconds a client may leave a chunked write of ours,
                          # or a small body we drain, unfinished
HEAD_TIMEOUT = 10.0       # seconds to wait for, and read, a request head
MIN_RATE = 64 * 1024      # bytes/s a body or response must average, after
RATE_GRACE = 10.0         # ...this many seconds of slack
DRAIN_TIMEOUT = 30.0      # SIGTERM: how long in-flight requests may finish
REAPER_PERIOD = 0.25      # how often deadlines are looked at
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Host: reg-name, IPv4 or [IPv6], and an optional port (RFC 9112 3.2).
HOST = re.compile(r"(?:[A-Za-z0-9\-._~%!$&'()*+,;=]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE",
           "CONNECT"}
# An error or a live figure must never be stored (a 404 is cacheable by
# default, RFC 9110 15.1).
NO_STORE = "no-store"
# Served blobs are whatever their uploaders sent: never let a browser run one
# as a page of our origin.
SANDBOX = [("X-Content-Type-Options", "nosniff"),
           ("Content-Security-Policy", "default-src 'none'; sandbox")]

STATUS_LINES = {s: "HTTP/1.1 %d %s\r\n" % (s, s.phrase) for s in HTTPStatus}

log = logging.getLogger("httpd")
access_log = logging.getLogger("access")


class HTTPError(Exception):
    """An error reply: status plus message, sent as {"error": message}."""

    def __init__(self, status, message=None, headers=()):
        self.status = HTTPStatus(status)
        self.message = message or self.status.phrase
        self.headers = headers
        super().__init__(self.message)


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
            # Along the class hierarchy: a subclass of a mapped exception
            # is answered as its nearest mapped ancestor.
            mapped = next(filter(None, map(self.exceptions.get, type(e).__mro__)),
                          None)
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

    def param_list(self, name):
        """Every value of a query parameter given once or more, in order."""
        return parse_qs(self.query).get(name, [])

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
        names = {name for name, _ in headers}
        if "Cache-Control" not in names:
            headers.append(("Cache-Control", NO_STORE))
        # Every reply is sandboxed; a page of our own sets its own policy.
        headers += [h for h in SANDBOX if h[0] not in names]
        if not (head or isinstance(body, (bytes, FilePart))) and \
                length is not None and length <= SMALL_BODY:
            # A small body goes out with its head, in one write.
            body = b"".join(body)
            if len(body) != length:
                raise ValueError("body of %d bytes, not %d" % (len(body), length))
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

    def __init__(self, address, handler, name, metrics, *, token=None, tls=None,
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
