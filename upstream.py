"""upstream: SOS's own small HTTP/1.1 client, for talking to blob-servers.

sos-server and replicate keep pooled keep-alive connections (Pool) to the
blob-servers, send requests (Exchange: the reply comes later, so one thread
can send to several members before reading any answer) and read replies
(Reply).  http.client parses every reply's header block with the email
package, which cost more than the rest of a small fetch.
"""

import http.client
import json
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from rules import (BYTES, CHUNK, DIGITS, HEXDIGITS, MAX_CHUNK_LINE,
                   MAX_HEADER_BYTES, MAX_HEADERS, MAX_REQUEST_LINE, FilePart)

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 60.0
POOL_IDLE = 5.0           # seconds an idle upstream connection is reused


class Unreachable(Exception):
    """A server could not be asked, or its answer could not be used."""


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
        if isinstance(body, BYTES):
            if len(body) <= CHUNK:
                self.sock.sendall(data + body)      # one segment for a small one
            else:
                # Joined, a chunk of megabytes was copied whole, holding the
                # GIL: 29% of a chunked upload's GIL-holding samples.
                self.sock.sendall(data)
                self.sock.sendall(body)
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
        if isinstance(body, BYTES) or (body is None and method in ("POST", "PUT")):
            headers["Content-Length"] = str(len(body or b""))
        return Exchange(self, url, method, path, body, headers)


class Exchange:
    """A request sent on a pooled connection, its reply still to come."""

    def __init__(self, pool, url, method, path, body, headers):
        self.pool, self.url, self.method = pool, url, method
        self.request = (method, path, headers, body)
        # Only a body that can be sent again may go on a reused connection.
        self.once = not (body is None or isinstance(body, (*BYTES, FilePart))
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
