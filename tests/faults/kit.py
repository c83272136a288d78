"""The fault suite's tools: our programs as real processes, a raw HTTP client,
process and store inspection, strace attachment, small filesystems.

Everything here drives the real blob.py, sos.py and replicate.py from the
outside, as an operator or an attacker would: through sockets, signals,
ptrace and the files on disk.  The programs are imported only for their
constants (the deadlines they promise) and pure functions (placement).
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time

# The tests' one support module (tests/ is on sys.path: pytest puts the
# folder above this package there).  What the suite takes from it is named
# here, so `from .kit import ...` keeps working.
import support
from support import (PYTHON, ROOT, BlobProcess, blob_path, flip_bit,  # noqa: F401
                     get_json, request, sha1, wait_for)

import httpd  # noqa: E402
import upstream  # noqa: E402

poll = wait_for
request_json = get_json

# One knob scales every trial count of the fast suite (CI: 1); the soak
# tests run for SOAK_MINUTES in all instead.
SCALE = float(os.environ.get("FAULT_SCALE", "1"))
SOAK_MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))

# Deadlines the servers promise, from the programs themselves so a change
# there can't make these tests wait for the wrong thing.
HEAD_TIMEOUT = httpd.HEAD_TIMEOUT
IDLE_TIMEOUT = httpd.IDLE_TIMEOUT
MIN_RATE = httpd.MIN_RATE
RATE_GRACE = httpd.RATE_GRACE
REAPER_PERIOD = httpd.REAPER_PERIOD
CONNECT_TIMEOUT = upstream.CONNECT_TIMEOUT


class StallMeter:
    """Measures how long this machine stopped running us.

    A thread sleeps 20 ms at a time and records every wake-up that came
    more than 100 ms late.  On a shared 2-core machine a bench or a build can
    freeze every process for seconds; a deadline measured across such a
    freeze is allowed that much more."""

    def __init__(self):
        self.lags = []                       # (woke at, seconds late)
        self.running = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self.running:
            before = time.monotonic()
            time.sleep(0.02)
            late = time.monotonic() - before - 0.02
            if late > 0.1:
                self.lags.append((time.monotonic(), late))

    def between(self, start, end):
        """Seconds of stall seen between two monotonic times."""
        return sum(late for at, late in self.lags if start <= at <= end + 0.5)

    def stop(self):
        self.running = False


def scaled(n, minimum=1):
    """A CI trial count times FAULT_SCALE."""
    return max(minimum, int(n * SCALE))


# --- HTTP clients --------------------------------------------------------------

def address(url):
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


class Response:
    """A response parsed from raw bytes; complete only if every promised
    body byte arrived."""

    def __init__(self, status, head, body, complete, interim=()):
        self.status, self.head, self.body = status, head, body
        self.complete = complete
        self.interim = list(interim)     # 1xx status codes seen first

    def header(self, name):
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode("latin-1")
        return None

    def __repr__(self):
        return "<Response %s complete=%s %r>" % (self.status, self.complete,
                                                  self.body[:80])


def read_response(sock, deadline, head_only=False):
    """Read one response from sock; None if the connection closed first.

    Interim 1xx responses are recorded and skipped."""
    buf = b""
    interim = []
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = _recv(sock, deadline)
            if not chunk:
                return None
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        if not m:
            raise AssertionError("not an HTTP response: %r" % head[:200])
        status = int(m.group(1))
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    resp = Response(status, head, b"", False, interim)
    length = resp.header("content-length")
    if head_only or status in (204, 304):
        resp.complete = True
        return resp
    if length is not None:
        need = int(length)
        while len(buf) < need:
            chunk = _recv(sock, deadline)
            if not chunk:
                break
            buf += chunk
        resp.body, resp.complete = buf[:need], len(buf) >= need
        return resp
    if (resp.header("transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                chunk = _recv(sock, deadline)
                if not chunk:
                    resp.body = body
                    return resp
                buf += chunk
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(buf) < size + 2:
                chunk = _recv(sock, deadline)
                if not chunk:
                    resp.body = body + buf[:size]
                    return resp
                buf += chunk
            if size == 0:
                resp.body, resp.complete = body, True
                return resp
            body += buf[:size]
            buf = buf[size + 2:]
    while True:                       # delimited by close
        chunk = _recv(sock, deadline)
        if not chunk:
            break
        buf += chunk
    resp.body, resp.complete = buf, True
    return resp


def _recv(sock, deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no response in time")
    sock.settimeout(left)
    try:
        return sock.recv(1 << 16)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def exchange(url, data, timeout=10.0, head_only=False):
    """Send raw request bytes on a new connection and read one response.

    Returns a Response, or None if the server closed without answering."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass                      # it may have answered already
        return read_response(sock, time.monotonic() + timeout, head_only)


# --- Our programs as processes ------------------------------------------------

class Program(support.Program):
    """One of our programs as a real process (support.Program: spawn, the
    banner read against a deadline, kill, the stderr log), with the /proc
    figures invariant I6 is checked on."""

    def _status(self):
        with open("/proc/%d/status" % self.pid) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)

    def threads(self):
        return int(self._status()["Threads"])

    def fds(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def rss(self):
        return int(self._status()["VmRSS"].split()[0]) * 1024

    def status(self):
        return self._status()

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
            poll(back, timeout, 0.05)
        except AssertionError:
            pass
        return tuple(seen)


class BlobServer(Program, BlobProcess):
    """blob.py serving a store (support.BlobProcess), its stderr logged to
    store.log unless log_path says where."""

    def __init__(self, store, *args, log_path=None, **kwargs):
        # One process (support.BlobProcess): the faults are aimed at (and
        # strace, /proc and kill -9 watch) the pid we started.
        super().__init__(store, *args, log_path=log_path or str(store) + ".log",
                         **kwargs)

    def post(self, blob_id, body, headers=None, timeout=30):
        return request(self.url + "/blob/" + blob_id, "POST", body, headers, timeout)

    def get(self, blob_id, timeout=30):
        return request(self.url + "/blob/" + blob_id, timeout=timeout)

    def ids(self):
        status, ids = request_json(self.url + "/blobs")
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


class SosServer(Program):
    """sos.py in front of groups of blob-servers: groups is [(name, [url])]."""

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
        return request_json(self.up + "/upload", "POST", body, headers, timeout)

    def fetch(self, blob_id, method="GET", headers=None, timeout=60):
        return request(self.down + "/fetch/" + blob_id, method, None, headers, timeout)


def replicate(urls_or_config, *args, timeout=120, env=None):
    """Run replicate.py to the end: (exit status, stdout, stderr)."""
    where = (["--config", urls_or_config] if os.path.exists(str(urls_or_config))
             else ["-blob-server", ",".join(urls_or_config)])
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "replicate.py")] + where
                          + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def copied(stdout):
    """The 'copied' column of replicate's summary table, summed."""
    total = 0
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.split()[:3] == ["group", "examined", "copied"]:
            for row in lines[i + 1:]:
                cells = row.split()
                if len(cells) == 7 and cells[2].isdigit():
                    total += int(cells[2])
    return total


# --- Store inspection ------------------------------------------------------------

def stored(store):
    """{id: path} of every blob file in a store, read from the disk."""
    out = {}
    for d1 in os.listdir(store):
        p1 = os.path.join(store, d1)
        if d1.startswith(".") or len(d1) != 2 or not os.path.isdir(p1):
            continue
        for d2 in os.listdir(p1):
            p2 = os.path.join(p1, d2)
            if not os.path.isdir(p2):
                continue
            for name in os.listdir(p2):
                if not name.endswith(".json"):
                    out[name] = os.path.join(p2, name)
    return out


# --- strace --------------------------------------------------------------------------

def require_tool(name, package):
    """The path of a tool, installing its Debian package if missing."""
    path = _which(name)
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", package],
                       capture_output=True, timeout=600)
        path = _which(name)
    if path is None:
        raise AssertionError("%s is needed and could not be installed (apt-get "
                             "install %s)" % (name, package))
    return path


def _which(name):
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") + ["/usr/sbin", "/sbin"]:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


class Tracer:
    """strace attached to every thread of a running process, injecting a
    fault: Tracer(pid, "fsync:error=EIO").  Detaches on stop()."""

    def __init__(self, pid, inject, trace=None, log_path=os.devnull):
        strace = require_tool("strace", "strace")
        argv = [strace, "-f", "-p", str(pid), "-o", log_path, "-e", "inject=" + inject]
        if trace:
            argv += ["-e", "trace=" + trace]
        self.pid = pid
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        poll(self.attached, 15, 0.005, "strace to attach to %d" % pid)

    def attached(self):
        """True once every thread of the process is being traced."""
        if self.proc.poll() is not None:
            raise AssertionError("strace exited: %s" % self.proc.stderr.read().decode())
        try:
            tids = os.listdir("/proc/%d/task" % self.pid)
            for tid in tids:
                with open("/proc/%d/task/%s/status" % (self.pid, tid)) as f:
                    if "TracerPid:\t0\n" in f.read():
                        return False
        except (FileNotFoundError, ProcessLookupError):
            return True          # the process (or a thread) is already gone
        return True

    def stop(self):
        """Detach (if the process still lives) and wait for strace to end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()


def strike(srv, syscall, k, request, bad):
    """Send request (raw bytes) to srv while strace kills it at its k-th call
    of syscall.  Returns (acknowledged, restarted).  A complete reply other
    than 200, or a server that neither answers nor dies, goes into bad."""
    tracer = Tracer(srv.pid, "%s:signal=KILL:when=%d" % (syscall, k))
    try:
        resp = exchange(srv.url, request, 30)
    except OSError:
        resp = None
    ok = resp is not None and resp.complete and resp.status == 200
    if not ok and resp is not None and resp.complete:
        bad.append("%s k=%d: answered %d" % (syscall, k, resp.status))
    died = not ok
    if died:
        try:
            srv.proc.wait(15)
        except subprocess.TimeoutExpired:
            bad.append("%s k=%d: no reply, yet the server lives" % (syscall, k))
            died = False
    tracer.stop()
    restarted = died or not srv.running()
    if restarted:
        srv.start()
    return ok, restarted


def kill_at_every_call(sweep, syscalls):
    """sweep.trial(syscall, k) for k = 1, 2, ... of each syscall, until a
    trial no longer kills (the operation makes fewer calls); returns
    {syscall: calls per operation}."""
    calls = {}
    for syscall in syscalls:
        k = 1
        while sweep.trial(syscall, k):
            k += 1
            assert k < 200, "%s: no end to the calls" % syscall
        calls[syscall] = k - 1
    return calls


# --- Small filesystems ----------------------------------------------------------------

def mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                   check=True, capture_output=True)


def mount_ext4(path, image, size_mib):
    os.makedirs(path, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True,
                   capture_output=True)
    # nodelalloc: blocks are allocated by write(), so free space is what
    # statvfs says, not what delayed allocation will hand back later.
    subprocess.run(["mount", "-o", "loop,nodelalloc", str(image), str(path)], check=True,
                   capture_output=True)


def umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
