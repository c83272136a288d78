"""The fault suite's own tools, on top of support.py (the tests' one
scaffolding module, where the programs as processes, the raw HTTP client,
sha1 and replicate's summary live; import those from there, not from here).

    SCALE, scaled, SOAK_MINUTES   how many trials, how long a soak
    HEAD_TIMEOUT ... CONNECT_TIMEOUT
                                  the deadlines the servers promise
    StallMeter                    how long this machine stopped running us
    fuzz_settings, mutated, responses, judge
                                  hostile requests and what a reply to one
                                  may not be (rows 16-18, the soak)
    upload_bytes, Uploader, check_store
                                  uploads cut by kill -9 and what a restarted
                                  blob-server must still hold (rows 4-6)
    stored                        a store's blobs, read from the disk
    require_tool, Tracer, strike, kill_at_every_call
                                  strace fault injection
    mount_tmpfs, mount_ext4, umount
                                  small filesystems

Everything here drives the real blob.py, sos.py and replicate.py from the
outside, as an operator or an attacker would: through sockets, signals,
ptrace and the files on disk.  The programs are imported only for their
constants (the deadlines they promise).
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time

from hypothesis import HealthCheck, settings, strategies as st

# tests/ is on sys.path (pytest puts the folder above this package there).
from support import RawConnection, address, raw_exchange, sha1, wait_for

import httpd  # noqa: E402  (support puts the repository root on sys.path)
import upstream  # noqa: E402

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


# --- Hostile requests (rows 16-18) ------------------------------------------------

HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [\x20-\x7e]*")
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [\x20-\x7e]*")
# 501 (a Transfer-Encoding we don't do) and 505 (not HTTP/1.x) are answers
# about the request, not failures of the server; 503 is "try later".
NOT_A_FAILURE = (501, 503, 505)




def fuzz_settings(examples):
    """CI: a fixed, reproducible set of examples (derandomize); soak and
    FAULT_SCALE>1 explore more."""
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=SCALE <= 1, suppress_health_check=list(HealthCheck),
                    print_blob=True)


VALID = [
    b"GET /alive HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /blob/%s HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1\r\n\r\n" % sha1(b"hello").encode(),
    b"HEAD /blob/%s HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"x\"\r\n\r\n" % sha1(b"hello").encode(),
    b"POST /blob/%s HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nX-Mime-Type: a/b\r\n\r\nhello"
    % sha1(b"hello").encode(),
    b"POST /blob/abc HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /blobs?prefix=a&after=a0&limit=3 HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /verify/%s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" % sha1(b"hello").encode(),
    b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nX-Name: n\r\n\r\nhello",
    b"GET /fetch/%s.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % sha1(b"hello").encode(),
    b"GET /stats HTTP/1.0\r\n\r\n",
]
NASTY = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b"\t", b"%", b"..", b"/", b"\xff",
         b"-1", b"99999999999999999999", b"chunked", b"\r\n\r\n", b"HTTP/1.1", b"\x7f"]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "flip", "repeat"]))
        piece = draw(st.one_of(st.sampled_from(NASTY), st.binary(min_size=1, max_size=8)))
        if op == "insert":
            data[at:at] = piece
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "replace":
            data[at:at + len(piece)] = piece
        elif op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "repeat":
            data[at:at] = data[max(0, at - 32):at]
    return bytes(data)


def responses(url, data, timeout=20):
    """Send data, half-close, and read every response until the server
    closes: [Reply, or None for bytes that are not one]."""
    out = []
    with RawConnection.open(url, timeout) as conn:
        try:
            conn.sock.sendall(data)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = conn.reply(deadline=deadline)
            except AssertionError:
                out.append(None)      # bytes that are not an HTTP response
                break
            if resp is None:
                break
            out.append(resp)
    return out


def judge(resps):
    """What is wrong with a server's responses: [str]."""
    bad = []
    for resp in resps:
        if resp is None:
            bad.append("garbage sent back")
            continue
        if resp.status >= 500 and resp.status not in NOT_A_FAILURE:
            bad.append("status %d" % resp.status)
        lines = resp.head.split(b"\r\n")
        if not STATUS_LINE.fullmatch(lines[0]):
            bad.append("status line %r" % lines[0])
        bad += ["header line %r" % line for line in lines[1:] if not HEADER_LINE.fullmatch(line)]
    return bad


# --- Uploads cut short (rows 4-6) -----------------------------------------------------

def upload_bytes(path, body, headers=()):
    head = "POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n" % (path, len(body))
    head += "".join("%s: %s\r\n" % h for h in headers)
    return head.encode() + b"\r\n" + body


def check_store(srv, acknowledged, attempted, verified=None):
    """Count I1/I2 violations of a (restarted) blob-server.

    acknowledged: {id: body} answered 200; attempted: {id: body} of every
    upload begun; verified: ids already fetched and found whole, which are
    not fetched again (a blob file is never rewritten in place), and to
    which the good ones are added.  Returns (violations, lost ids, messages)."""
    bad = []
    verified = set() if verified is None else verified
    listed = srv.ids()
    for blob_id in listed:
        if blob_id in verified:
            continue
        verified.add(blob_id)
        status, _, data = srv.get(blob_id)
        want = attempted.get(blob_id)
        if blob_id not in attempted:
            bad.append("%s: listed but never uploaded" % blob_id)
        elif status != 200:
            bad.append("%s: listed but %d" % (blob_id, status))
        elif data != want or (len(blob_id) == 40 and sha1(data) != blob_id):
            bad.append("%s: %d bytes served, not the %d uploaded" % (blob_id, len(data), len(want)))
        else:
            continue
        verified.discard(blob_id)
    lost = [i for i in acknowledged if i not in listed]
    bad += ["%s: acknowledged, then lost" % i for i in lost]
    if srv.tmp_files():
        bad.append("temp files after restart: %s" % srv.tmp_files())
    return len(bad), set(lost), bad


class Uploader(threading.Thread):
    """Uploads random bodies over raw sockets in random-sized pieces until
    stopped or the server dies; records what was begun and acknowledged."""

    def __init__(self, url, rng, attempted, acknowledged, lock, path="/blob/%s"):
        super().__init__(daemon=True)
        self.url, self.rng, self.path = url, rng, path
        self.attempted, self.acknowledged, self.lock = attempted, acknowledged, lock
        self.stop = threading.Event()
        self.refused = []                # statuses other than 200 (and 503 from sos)

    def run(self):
        while not self.stop.is_set():
            r = self.rng
            body = r.randbytes(r.choice((0, 1, 1000, 65536, 300000, 2 << 20)))
            blob_id = sha1(body)
            with self.lock:
                self.attempted[blob_id] = body
            data = upload_bytes(self.path.replace("%s", blob_id), body)
            try:
                with socket.create_connection(address(self.url), timeout=10) as sock:
                    pos = 0
                    while pos < len(data):
                        n = r.randrange(1, 200000)
                        sock.sendall(data[pos:pos + n])
                        pos += n
                        if r.random() < 0.3:
                            time.sleep(r.random() * 0.01)   # uneven pace, as real clients
                    resp = RawConnection(sock).reply("POST", time.monotonic() + 10)
            except OSError:
                return                   # the server died under us
            if resp is None:
                return
            if resp.complete and resp.status == 200:
                with self.lock:
                    self.acknowledged[blob_id] = body
            elif resp.complete and resp.status not in (200, 503):
                self.refused.append(resp.status)      # (a cut-off 200 is no answer)


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
        wait_for(self.attached, 15, 0.005, "strace to attach to %d" % pid)

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
        resp = raw_exchange(srv.url, request, 30)
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
