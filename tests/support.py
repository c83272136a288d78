"""The tests' one scaffolding module: HTTP clients, polling, the store
layout, replicate's summary, and our servers in process or as real
processes.  Every test module (and the fault suite's kit.py) imports each
name from here; conftest.py files hold only fixtures built on it.

    request, get_json       one HTTP exchange on a new connection (http.client)
    RawConnection, Reply    the one raw client: bytes as given on a socket,
    raw_exchange            replies read as they came off the wire (1xx
                            recorded in .interim, never silently skipped),
                            against a deadline
    wait_for                poll a predicate against a deadline
    sha1, blob_path         content ids and where a store keeps a blob
    flip_bit, flip_byte     damage a stored file as a failing disk would
    summary, summary_total  replicate's summary tables, parsed in one place
    run_replicate           replicate.main in this process
    replicate_process       replicate.py as a process, run to its end

    canned_server           a stand-in that sends given bytes as its reply

  In this process (make_server on port 0, serving in a daemon thread):
    InProcessServer         one server from a make_server
    blob_servers            a factory of in-process blob-servers
    stop_hard               stop one as a crash would
    InProcessSos            a sos-server (upload and download) over groups
    InProcessCluster        groups of in-process blob-servers behind one

  As real processes (stdout read for the banner against a deadline):
    Program                 the base: spawn, banner, kill, log, /proc figures
    BlobProcess             blob.py serving a store
    SosProcess              sos.py in front of groups of blob-servers
    ProcessCluster          groups of BlobProcesses behind a SosProcess
    Processes               starts them for one test, cleans up after it
"""

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
BLOB_PY = os.path.join(ROOT, "blob.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import blob  # noqa: E402
import blobstore  # noqa: E402
import replicate  # noqa: E402
import rules  # noqa: E402
import sos  # noqa: E402
from cluster import Cluster, Group  # noqa: E402


# --- HTTP and polling -------------------------------------------------------------

def request(url, method="GET", body=None, headers=None, timeout=30):
    """One request on a new connection: (status, {lower-case name: value}, body).

    Raises OSError / http.client.HTTPException if the exchange fails: a
    response cut short is not a response."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def get_json(url, method="GET", body=None, headers=None, timeout=30):
    """request() with the body decoded as JSON: (status, value or None)."""
    status, _, data = request(url, method, body, headers, timeout)
    return status, json.loads(data) if data else None


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll predicate until it is truthy and return its value; AssertionError
    after timeout (the predicate is always asked at least once)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# --- The raw HTTP client ------------------------------------------------------------

def address(url):
    """(host, port) of an http://host:port/... url."""
    parts = urlsplit(url)
    return parts.hostname, parts.port


class Reply:
    """One final response as it came off the wire.

    status, reason, version; head: the raw head bytes (status line and
    header lines, no blank line); headers: [(name, value)] in wire order;
    malformed: header lines without a colon; interim: the 1xx statuses that
    came before this one, in order; body; complete: every promised body byte
    arrived (a Content-Length, the last chunk, or the close); closed: the
    close ended the body (no framing)."""

    def __init__(self, head, interim):
        self.head = head
        self.interim = list(interim)
        line, *fields = head.decode("latin-1").split("\r\n")
        self.version, self.status, self.reason = parse_status_line(line)
        self.headers, self.malformed = [], []
        for field in fields:
            name, sep, value = field.partition(":")
            if sep:
                self.headers.append((name, value.strip(" \t")))
            else:
                self.malformed.append(field)
        self.body = b""
        self.complete = False
        self.closed = False

    def header(self, name):
        """The value of header `name`, None if absent; two of them fail."""
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, "%d %s headers: %r" % (len(values), name, values)
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<%s %d %s interim=%r complete=%s %r body=%r>" % (
            self.version, self.status, self.reason, self.interim, self.complete,
            self.headers, self.body[:200])


STATUS_LINE_RE = re.compile(r"(HTTP/1\.[01]) (\d{3})(?: (.*))?", re.DOTALL)


def parse_status_line(line):
    """(version, status, reason) of a status line; AssertionError if it is
    not one."""
    m = STATUS_LINE_RE.fullmatch(line)
    if not m:
        raise AssertionError("not an HTTP status line: %r" % line[:200])
    return m.group(1), int(m.group(2)), m.group(3) or ""


class RawConnection:
    """A client connection that sends bytes as given and reads replies off
    the wire, each against a deadline (monotonic seconds; default: now plus
    the connection's timeout).

    sock is a connected socket (a RawConnection owns it from then on);
    buffered: bytes already read from it.  Bytes past one reply stay
    buffered for the next (pipelined replies are not lost)."""

    def __init__(self, sock, timeout=10.0, buffered=b""):
        self.sock = sock
        self.timeout = timeout
        self.buf = buffered

    @classmethod
    def open(cls, where, timeout=10.0):
        """Connect to a url or a loopback port."""
        addr = ("127.0.0.1", where) if isinstance(where, int) else address(where)
        return cls(socket.create_connection(addr, timeout=timeout), timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, data):
        """Send data; False if the server had closed (it may have answered
        already: read the reply)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _fill(self, deadline):
        """Read more into buf; False at the end of the stream.  TimeoutError
        past the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def _until(self, sep, deadline):
        """The bytes up to sep (consumed, sep too), or None at the end of the
        stream first."""
        while sep not in self.buf:
            if not self._fill(deadline):
                return None
        item, self.buf = self.buf.split(sep, 1)
        return item

    def _exactly(self, n, deadline):
        """n bytes, or fewer at the end of the stream."""
        while len(self.buf) < n and self._fill(deadline):
            pass
        item, self.buf = self.buf[:n], self.buf[n:]
        return item

    def reply(self, method="GET", deadline=None):
        """Read one final response: a Reply, or None if the stream ended
        before a whole head arrived.  Interim 1xx responses are read and
        recorded in the Reply's .interim.  AssertionError if the bytes are
        not HTTP; TimeoutError past the deadline."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        interim = []
        while True:
            head = self._until(b"\r\n\r\n", deadline)
            if head is None:
                return None
            reply = Reply(head, interim)
            if reply.status >= 200:
                break
            interim.append(reply.status)
        self._read_body(reply, method, deadline)
        return reply

    def _read_body(self, reply, method, deadline):
        length = reply.header("content-length")
        coding = (reply.header("transfer-encoding") or "").lower()
        if method == "HEAD" or reply.status in (204, 304):
            reply.complete = True
        elif "chunked" in coding:
            reply.complete = self._read_chunks(reply, deadline)
        elif length is not None:
            need = int(length)
            reply.body = self._exactly(need, deadline)
            reply.complete = len(reply.body) == need
        else:
            while self._fill(deadline):
                pass
            reply.body, self.buf = self.buf, b""
            reply.complete = reply.closed = True

    def _read_chunks(self, reply, deadline):
        """Read a chunked body into reply.body; whether it ended properly."""
        body = []
        while True:
            line = self._until(b"\r\n", deadline)
            if line is None:
                break
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError:
                raise AssertionError("bad chunk size line %r" % line[:80]) from None
            if size == 0:
                while True:                           # trailers, then the blank line
                    trailer = self._until(b"\r\n", deadline)
                    if trailer is None:
                        break
                    if not trailer:
                        reply.body = b"".join(body)
                        return True
                break
            piece = self._exactly(size, deadline)
            body.append(piece)
            if len(piece) < size:
                break
            end = self._exactly(2, deadline)
            if len(end) < 2:
                break
            assert end == b"\r\n", "bad chunk end %r" % end
        reply.body = b"".join(body)
        return False


def method_of(data):
    """The method of raw request bytes."""
    return data.split(b" ", 1)[0].decode("latin-1")


def raw_exchange(where, data, timeout=10.0, method=None):
    """Send raw request bytes on a new connection (to a url or a loopback
    port) and read one reply, as one to method (default: the request's own,
    so a HEAD's reply is read without a body): a Reply, or None if the
    server closed without a whole head."""
    with RawConnection.open(where, timeout) as conn:
        conn.send(data)
        return conn.reply(method or method_of(data), time.monotonic() + timeout)


@contextlib.contextmanager
def canned_server(reply):
    """A stand-in server on a loopback port (yielded) that answers one
    connection: it reads a request head, sends the reply bytes as given and
    closes.  For checking what a check of ours makes of a reply our servers
    must never send."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def answer():
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(30)
        listener.close()


# --- ids and the store layout ------------------------------------------------------

def sha1(data):
    """The id of content: its SHA-1, in lower-case hex."""
    return hashlib.sha1(data).hexdigest()


def blob_path(store, blob_id):
    """Where a store keeps a blob: <store>/ab/cd/abcd... (rules.shard's rule).
    store is a path or a BlobStore (its .root)."""
    root = store if isinstance(store, (str, os.PathLike)) else store.root
    return os.path.join(root, *rules.shard(blob_id), blob_id)


def flip_bit(path, offset, bit=0):
    """Flip one bit of a file in place, as a failing disk would."""
    _xor(path, offset, 1 << bit)


def flip_byte(store, blob_id, offset=0):
    """Invert one byte of a stored blob."""
    _xor(blob_path(store, blob_id), offset, 0xFF)


def _xor(path, offset, mask):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))
        f.flush()
        os.fsync(f.fileno())


# --- replicate ------------------------------------------------------------------------

def summary(stdout, table="group"):
    """One of replicate's summary tables, read by the names on its header
    line: {row name: {column: count}}.  table is the header's first cell:
    "group" (examined, copied, deleted, failed, unreachable) or "moves"
    (moved_in, moved_out, bytes, failed, left); a column whose cells are not
    counts (seconds) is left out, and "-" in a name becomes "_".  {} if
    stdout has no such table."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if head[:1] != [table] or len(head) < 2 or any(c[0].isdigit() for c in head):
            continue
        columns = [c.replace("-", "_") for c in head[1:]]
        rows = {}
        for row in lines[i + 1:]:
            cells = row.split()
            if len(cells) != len(head) or not cells[1].isdigit():
                break
            rows[cells[0]] = {c: int(v) for c, v in zip(columns, cells[1:]) if v.isdigit()}
        return rows
    return {}


def summary_total(stdout, column):
    """One column of replicate's summary, summed over the groups;
    AssertionError if stdout has no summary table."""
    table = summary(stdout)
    if not table:
        raise AssertionError("no summary table in replicate's output:\n%s" % stdout)
    return sum(row[column] for row in table.values())


def run_replicate(capsys, *argv):
    """replicate.main in this process: (exit code, summary(), stdout).
    Undoes what its logging set-up does to this process's loggers (main
    expects to own the process)."""
    capsys.readouterr()
    loggers = [logging.getLogger(name) for name in ("access", "replicate")]
    saved = [(lg, lg.level, lg.propagate, lg.handlers[:]) for lg in loggers]
    try:
        rc = replicate.main(list(argv))
    finally:
        for lg, level, propagate, handlers in saved:
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers[:] = handlers
    out = capsys.readouterr().out
    return rc, summary(out), out


def replicate_process(urls_or_config, *args, timeout=120, env=None):
    """Run replicate.py as a process to its end: (exit status, stdout, stderr).
    urls_or_config: a config file's path or a list of blob-server urls."""
    where = (["--config", urls_or_config] if os.path.exists(str(urls_or_config))
             else ["-blob-server", ",".join(urls_or_config)])
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "replicate.py")] + where
                          + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout, proc.stderr


# --- servers in this process --------------------------------------------------------

class InProcessServer:
    """A server from make_server, serving in a daemon thread."""

    def __init__(self, srv):
        self.srv = srv
        self.url = "http://127.0.0.1:%d" % srv.server_port
        self.thread = threading.Thread(target=srv.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


@contextlib.contextmanager
def blob_servers(root):
    """A factory of in-process blob-servers, start(name, **BlobStore options),
    each with its store under root; returns an InProcessServer with .url and
    .store (a BlobStore).  All are stopped when the block ends."""
    started = []

    def start(name="store", **kwargs):
        store = blobstore.BlobStore(os.path.join(str(root), name), **kwargs)
        store.recover()
        srv = InProcessServer(blob.make_server(("127.0.0.1", 0), store))
        srv.store = store
        started.append(srv)
        return srv
    try:
        yield start
    finally:
        for srv in started:
            srv.stop()
            srv.store.close()


def stop_hard(srv):
    """Stop an in-process blob-server as a crash would: the listener closes
    and its open keep-alive connections are cut (InProcessServer.stop leaves
    them served, so a pooled connection would quietly keep working)."""
    srv.stop()
    with srv.srv._watch_lock:
        handlers = list(srv.srv._watched)
    for h in handlers:
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class InProcessSos:
    """An in-process sos-server (upload and download services) over the
    given Groups; .cluster is the product's cluster.Cluster behind it.
    With delete_token, the upload port also takes DELETE /fetch/<id>."""

    def __init__(self, groups, timeout=10, max_upload=1 << 30, delete_token=None,
                 chunk_size=sos.parse_size(sos.DEFAULT_CHUNK_SIZE), **options):
        self.groups = groups
        self.delete_token = delete_token
        pool = sos.Pool(connect_timeout=1, timeout=timeout)
        self.cluster = Cluster(groups, pool=pool, **options)
        up, down = sos.make_servers(self.cluster, host="127.0.0.1", upload_port=0,
                                    download_port=0, max_upload=max_upload,
                                    delete_token=delete_token, chunk_size=chunk_size)
        self.up, self.down = InProcessServer(up), InProcessServer(down)

    def upload(self, data, headers=None):
        return get_json(self.up.url + "/upload", "POST", data, headers)

    def fetch(self, blob_id, method="GET", headers=None):
        return request(self.down.url + "/fetch/" + blob_id, method, headers=headers)

    def delete(self, blob_id, headers=None):
        """DELETE /fetch/<id> on the upload port: (status, JSON reply).
        headers default to the delete token's Authorization."""
        if headers is None:
            headers = {"Authorization": "Bearer %s" % self.delete_token}
        return get_json(self.up.url + "/fetch/" + blob_id, "DELETE", None, headers)

    def stop(self):
        self.up.stop()
        self.down.stop()
        self.cluster.close()


class InProcessCluster(InProcessSos):
    """Groups of in-process blob-servers behind an in-process sos-server.

    start_blob: a blob_servers factory; layout: [(group name, size)]."""

    def __init__(self, start_blob, layout, timeout=10, **options):
        self.blobs = {}
        groups = []
        for gname, size in layout:
            members = []
            for i in range(size):
                srv = start_blob("%s-%d" % (gname, i))
                self.blobs[srv.url] = srv
                members.append(srv.url)
            groups.append(Group(gname, members))
        super().__init__(groups, timeout=timeout, **options)

    def holders(self, blob_id):
        return [url for url, srv in self.blobs.items() if srv.store.exists(blob_id)]


# --- our programs as real processes -------------------------------------------------

# The start-up line blob.py prints on stdout: "... http(s)://HOST:PORT/ ...".
BANNER = re.compile(r"https?://[\d.]+:(\d+)/")


def banner_port(line):
    """The port a blob-server's banner line announces, or None."""
    m = BANNER.search(line)
    return int(m.group(1)) if m else None


class Program:
    """One of our programs as a real process.

    stdout is read (against a deadline) for the start-up banner; stderr goes
    to log_path, or nowhere if it is None.  Extra keyword arguments go to
    Popen (extra_groups=..., say).  The /proc figures (threads, fds, level)
    are what the fault suite's invariant I6 is checked on."""

    banner_timeout = 30.0

    def __init__(self, argv, log_path=None, env=None, **popen):
        self.argv = list(argv)
        self.log_path = None if log_path is None else str(log_path)
        self.env = env
        self.popen = popen
        self.proc = None
        self.ignore_tracebacks = False

    def spawn(self):
        if self.log_path is None:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, env=self.env,
                                         cwd=ROOT, **self.popen)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                             stderr=log, env=self.env, cwd=ROOT,
                                             **self.popen)
        self.pid = self.proc.pid

    def read_line(self, timeout=None):
        """One line of stdout ('' at EOF); AssertionError after timeout."""
        timeout = timeout or self.banner_timeout
        end = time.monotonic() + timeout
        out = self.proc.stdout
        line = b""
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                self.kill()
                raise AssertionError("%s: no output within %.0fs; log:\n%s"
                                     % (self.argv, timeout, self.log()[-2000:]))
            byte = os.read(out.fileno(), 1)
            if not byte:
                break
            line += byte
        return line.decode()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL, timeout=30):
        """Send sig and wait for the exit; returns the exit status."""
        if self.running():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode if self.proc else None

    def stop(self):
        return self.kill(signal.SIGTERM)

    def log(self):
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tracebacks(self):
        return self.log().count("Traceback (most recent call last)")

    # /proc figures

    def status(self):
        """/proc/PID/status as {field: value}."""
        with open("/proc/%d/status" % self.pid) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)

    def threads(self):
        return int(self.status()["Threads"])

    def fds(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def rss(self):
        return int(self.status()["VmRSS"].split()[0]) * 1024

    def level(self):
        """(threads, fds) not explained by connections: an accepted one holds
        a thread and an fd, an outgoing keep-alive one (sos-server to
        blob-servers, kept in its pool whatever its state) an fd, a leaf
        directory in a blob-server's cache (at most blobstore.LEAF_FDS) an fd.  Invariant
        I6 is that this returns to where it was once the clients are gone."""
        sockets = set()
        leaves = 0
        for fd in os.listdir("/proc/%d/fd" % self.pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (self.pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                sockets.add(link[8:-1])
            elif re.search(r"/[^/]{2}/[^/]{2}$", link):
                leaves += 1      # a leaf directory blob.py keeps open, bounded
        listening, connected = set(), []
        for table in ("/proc/%d/net/tcp" % self.pid, "/proc/%d/net/tcp6" % self.pid):
            try:
                with open(table) as f:
                    rows = [line.split() for line in f.readlines()[1:]]
            except FileNotFoundError:
                continue
            for row in rows:
                if row[9] not in sockets:
                    continue
                port = int(row[1].rsplit(":", 1)[1], 16)
                if row[3] == "0A":
                    listening.add(port)
                else:
                    connected.append(port)
        incoming = sum(1 for port in connected if port in listening)
        return self.threads() - incoming, self.fds() - len(connected) - leaves

    def settled(self, level, timeout=15.0):
        """Wait until level() is back at (or below) the given one; returns
        the level last seen."""
        seen = []

        def back():
            seen[:] = self.level()
            return seen[0] <= level[0] and seen[1] <= level[1]
        try:
            wait_for(back, timeout, 0.05)
        except AssertionError:
            pass
        return tuple(seen)


class BlobProcess(Program):
    """blob.py serving a store, started with `-store STORE -host HOST -port
    PORT` and then args; keeps its port across restarts.  With store=None
    blob.py gets exactly args (tests of its command line).

    start() reads the banner (kept as .banner) for the port, then, if probe,
    polls /alive.  prefix goes before the interpreter (strace, netns)."""

    def __init__(self, store, *args, port=0, host="127.0.0.1", log_path=None,
                 env=None, python=PYTHON, prefix=(), probe=True, **popen):
        self.store = None if store is None else str(store)
        # One process unless a test asks for more: "down" must mean down,
        # and kill -9 (and strace, and /proc) reach one pid.
        self.args = (["--workers", "1"] if store is not None else []) + list(args)
        self.host = host
        self.port = port
        self.python = python
        self.prefix = list(prefix)
        self.probe = probe
        super().__init__([], log_path, env, **popen)
        self.start()

    def command(self):
        where = ([] if self.store is None else
                 ["-store", self.store, "-host", self.host, "-port", str(self.port)])
        return self.prefix + [self.python, BLOB_PY] + where + self.args

    def start(self):
        self.argv = self.command()
        self.spawn()
        self.banner = self.read_line()
        port = banner_port(self.banner)
        if port is None:
            self.kill()
            raise AssertionError("blob-server did not start: %r\n%s"
                                 % (self.banner, self.log()[-2000:]))
        self.port = port
        self.url = "http://%s:%d" % (self.host, self.port)
        if self.probe:
            wait_for(self.alive, 30, what="blob-server /alive")
        return self

    def restart(self):
        self.kill()
        return self.start()

    def alive(self):
        try:
            return request(self.url + "/alive", timeout=2)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def path(self, blob_id):
        return blob_path(self.store, blob_id)

    def post(self, blob_id, body, headers=None, timeout=30):
        return request(self.url + "/blob/" + blob_id, "POST", body, headers, timeout)

    def get(self, blob_id, timeout=30):
        return request(self.url + "/blob/" + blob_id, timeout=timeout)

    def ids(self):
        status, ids = get_json(self.url + "/blobs")
        assert status == 200, status
        return ids

    def tmp_files(self):
        try:
            return os.listdir(os.path.join(self.store, ".tmp"))
        except FileNotFoundError:
            return []

    def quarantined(self):
        try:
            return os.listdir(os.path.join(self.store, ".quarantine"))
        except FileNotFoundError:
            return []


class SosProcess(Program):
    """sos.py in front of groups of blob-servers: groups is [(name, [url])];
    its config, and its stderr (sos.log), go in workdir."""

    def __init__(self, groups, workdir, *args, env=None, prefix=(), host="127.0.0.1"):
        os.makedirs(workdir, exist_ok=True)
        self.config = os.path.join(workdir, "sos.conf")
        with open(self.config, "w") as f:
            for name, members in groups:
                f.write("[%s]\n" % name)
                f.writelines("- : %s\n" % m for m in members)
        self.groups = groups
        self.host = host
        super().__init__(
            list(prefix) + [PYTHON, os.path.join(ROOT, "sos.py"), "--config", self.config,
                            "--api-host", host, "--upload-port", "0", "--download-port", "0",
                            "--admin-port", "0", "--workers", "1"] + list(args),
            os.path.join(workdir, "sos.log"), env)
        self.start()

    def start(self):
        self.spawn()
        ports = {}
        while len(ports) < 3:
            line = self.read_line()
            if not line:
                raise AssertionError("sos-server did not start:\n%s" % self.log()[-2000:])
            m = re.match(r"(upload|download|admin) service\s+https?://[\d.]+:(\d+)/", line)
            if m:
                ports[m.group(1)] = int(m.group(2))
        self.ports = ports
        self.up = "http://%s:%d" % (self.host, ports["upload"])
        self.down = "http://%s:%d" % (self.host, ports["download"])
        self.admin = "http://127.0.0.1:%d" % ports["admin"]
        return self

    def upload(self, body, headers=None, timeout=60):
        """POST /upload on a new connection: (status, JSON reply)."""
        return get_json(self.up + "/upload", "POST", body, headers, timeout)

    def fetch(self, blob_id, method="GET", headers=None, timeout=60):
        return request(self.down + "/fetch/" + blob_id, method, None, headers, timeout)


class ProcessCluster:
    """Groups of blob.py processes behind a sos.py process."""

    def __init__(self, groups, sos_process):
        self.groups = groups         # {name: [BlobProcess]}
        self.sos = sos_process
        self.members = [m for ms in groups.values() for m in ms]

    def holders(self, blob_id):
        return [m for m in self.members if os.path.exists(m.path(blob_id))]

    def config(self):
        return self.sos.config


class Processes:
    """Starts our programs for one test (or module) under tmp_path, and
    cleans up after it: stop_all(), then crashed() names any that wrote a
    traceback it was not allowed."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.started = []

    def blob(self, name="store", *args, **kwargs):
        """blob.py with its store at tmp_path/name (or store=...), its stderr
        in tmp_path/name.log unless log_path says where."""
        kwargs.setdefault("log_path", str(self.tmp_path / (name + ".log")))
        srv = BlobProcess(kwargs.pop("store", None) or self.tmp_path / name, *args, **kwargs)
        self.started.append(srv)
        return srv

    def sos(self, groups, *args, name="sos", **kwargs):
        """sos.py in front of groups: [(name, [url or BlobProcess])]."""
        groups = [(g, [m.url if hasattr(m, "url") else m for m in members])
                  for g, members in groups]
        srv = SosProcess(groups, str(self.tmp_path / name), *args, **kwargs)
        self.started.append(srv)
        return srv

    def cluster(self, layout=(("g1", 2), ("g2", 2)), *sos_args):
        """Groups of blob.py processes behind a sos.py: a ProcessCluster."""
        groups = {g: [self.blob("%s-%d" % (g, i)) for i in range(n)]
                  for g, n in layout}
        return ProcessCluster(groups, self.sos(list(groups.items()), *sos_args))

    def stop_all(self):
        for p in self.started:
            p.kill()

    def crashed(self):
        """Programs whose stderr shows a traceback they were not allowed."""
        return ["%s: %d traceback(s)\n%s" % (p.log_path, p.tracebacks(), p.log()[-3000:])
                for p in self.started if not p.ignore_tracebacks and p.tracebacks()]
