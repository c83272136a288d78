"""The tests' one support module: HTTP calls, polling, the store layout, and
our servers in process or as real processes.

Used by conftest.py (the fixtures), helpers.py (kept as an alias), the test
files (`from support import ...`) and the fault suite's kit.py, which adds
raw sockets, strace and /proc figures on top of the launcher here.

    request, get_json       one HTTP exchange on a new connection
    wait_for                poll a predicate against a deadline
    sha1, blob_path         content ids and where a store keeps a blob
    flip_bit, flip_byte     damage a stored file as a failing disk would
    InProcess, Front        make_server in a thread; a sos-server over groups
    stop_hard               stop an in-process blob-server as a crash would
    Program, BlobProcess    our programs as real processes; blob.py's banner
                            is parsed in one place (BANNER)
"""

import contextlib
import hashlib
import http.client
import json
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
import sos  # noqa: E402
from cluster import Cluster  # noqa: E402
import rules  # noqa: E402


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


# --- ids and the store layout ------------------------------------------------------

def sha1(data):
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


# --- servers in this process --------------------------------------------------------

class InProcess:
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
    each with its store under root; returns an InProcess with .url and .store
    (a BlobStore).  All are stopped when the block ends."""
    started = []

    def start(name="store", **kwargs):
        store = blobstore.BlobStore(os.path.join(str(root), name), **kwargs)
        store.recover()
        srv = InProcess(blob.make_server(("127.0.0.1", 0), store))
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
    and its open keep-alive connections are cut (InProcess.stop leaves them
    served, so a pooled connection would quietly keep working)."""
    srv.stop()
    with srv.srv._watch_lock:
        handlers = list(srv.srv._watched)
    for h in handlers:
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Front:
    """An in-process sos-server (upload and download services) over the
    given sos.Groups."""

    def __init__(self, groups, timeout=10, max_upload=1 << 30, **options):
        self.groups = groups
        pool = sos.Pool(connect_timeout=1, timeout=timeout)
        self.cluster = Cluster(groups, pool=pool, **options)
        up, down = sos.make_servers(self.cluster, host="127.0.0.1", upload_port=0, download_port=0,
                                    max_upload=max_upload)
        self.up, self.down = InProcess(up), InProcess(down)

    def upload(self, data, headers=None):
        return get_json(self.up.url + "/upload", "POST", data, headers)

    def fetch(self, blob_id, method="GET", headers=None):
        return request(self.down.url + "/fetch/" + blob_id, method, headers=headers)

    def stop(self):
        self.up.stop()
        self.down.stop()
        self.cluster.close()


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
    Popen (extra_groups=..., say)."""

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
        # and kill -9 reaches one pid.
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
