#!/usr/bin/env python3
"""bench: what a user of SOS gets, beside nginx on the same files; appends to BENCHMARKS.md.

Knobs (environment; `make bench` passes them through):

    BENCH_ROWS=a,b,...    rows to run, by name, in this order (default: all):
        blob_get_4k       blob-server GET 4 KiB, BENCH_IDS random ids, vs nginx
        blob_get_4k_w1    the same with --workers 1: the per-core figure
        blob_get_100m     blob-server GET 100 MiB (curl) vs nginx
        sos_fetch_4k      sos-server fetch 4 KiB, random ids, group of 2, vs nginx
        sos_upload_4k     sos-server upload 4 KiB, 2 durable copies, vs nginx PUT
        sos_upload_1g     sos-server upload 1 GiB vs dd conv=fdatasync
        sos_fetch_1g      sos-server fetch 1 GiB, verified, vs nginx
        sos_groups        sos-server fetch 4 KiB, 8 groups vs 1 group
        blob_list         GET /blobs on a blob-server of BENCH_BLOBS blobs
        replicate         replicate, group of 2 in sync, then 1% missing
        rebalance         replicate --rebalance after adding a group of 2 to a
                          group of 2 holding BENCH_REBALANCE_BLOBS blobs of 4 KiB:
                          moves/s, replicate's peak RSS, and sos-server fetch
                          p99 while it moves vs while it is stopped (SIGSTOP)
        rebalance_fetch   after that rebalance, sos-server fetch 4 KiB of the
                          moved ids vs a cluster never resized (same blobs)
        chunk_1g          1 GiB upload and verified fetch, chunked (the default
                          --chunk-size, and each of BENCH_CHUNK_SIZES) vs
                          --chunk-size 0; a 4 KiB range in the middle vs a
                          4 KiB object (issue 21)
        chunk_10g         BENCH_BIG_GIB GiB upload and fetch through a
                          --spool-dir of 1 GiB (a tmpfs; needs root)
    BENCH_DURATION=10     seconds per wrk run
    BENCH_RUNS=3          runs per measurement, ours and the yardstick in turn;
                          medians reported
    BENCH_IDS=2048        distinct 4 KiB blobs the random GETs choose from
    BENCH_SEED=13         seed of bench/get.lua's choice (ours and nginx alike)
    BENCH_CONNECTIONS=64  wrk -c     BENCH_THREADS=2   wrk -t
    BENCH_BLOBS=1000000   blobs in the store of blob_list and replicate
    BENCH_MISSING_RUNS=1  runs of replicate with 1% missing (each 30-80 s here)
    BENCH_REBALANCE_BLOBS=100000  blobs of 4 KiB in the group the rebalance
                          rows grow (the new group wins about half)
    BENCH_CACHE=/var/tmp/sos-bench-cache   generated files and stores, kept
    BENCH_OUT=BENCHMARKS.md   where the table is appended (a trial run that
                          should leave the repo alone: BENCH_OUT=/tmp/bench.md)
    BENCH_BLOB_ARGS=...   extra flags for every blob.py    (default: none, the
    BENCH_SOS_ARGS=...    extra flags for every sos.py      servers' defaults)
    BENCH_CHUNK_SIZES=    chunk sizes chunk_1g also measures, beside the
                          default (e.g. 4M,16M,32M); each its own pair of
                          blob-servers, all runs alternating
    BENCH_BIG_GIB=10      size of chunk_10g's upload (scaled down, and said
                          so, if the disk can't hold 2 copies)
    BENCH_PROFILE=1       after measuring blob_get_4k, sos_upload_4k,
                          sos_fetch_4k, the 1 GiB rows and replicate, one more
                          run under py-spy; collapsed stacks in
                          BENCH_CACHE/profiles (blob-servers then run as nobody
                          without chroot, which py-spy can't see into)

    make bench                                            # everything, < 15 min
    BENCH_ROWS=blob_get_4k BENCH_DURATION=5 make bench    # one row, quickly
    BENCH_ROWS=blob_get_4k,sos_fetch_4k BENCH_RUNS=1 BENCH_DURATION=3 \\
        BENCH_OUT=/tmp/bench.md make bench                # a trial

What is measured (issue 13: what a user gets):

- Our servers run at their default flags (no --workers), as a user starts
  them; blob_get_4k_w1 adds --workers 1 to show one core's worth.
- The 4 KiB GET rows ask for BENCH_IDS distinct blobs (content ids, written by
  bench/mkstore.py into a cached store) chosen at random by bench/get.lua;
  nginx serves the very same files (hard links of the same inodes) from the
  same tree, <id[0:2]>/<id[2:4]>/<id>, with the same seed, so the same ids in
  the same order.
- Server CPU per request: utime+stime (+ cutime+cstime, which holds reaped
  children) from /proc/PID/stat of every process of each server's tree (the
  server, its forked workers, theirs), summed before and after each client
  run; the differences of a row's runs added up and divided by the requests
  wrk completed in those runs.  For sos-server
  rows "ours" is sos-server and its blob-servers together; the split is in
  the notes.  nginx's is its master and workers.
- p50/p99 latency from `wrk --latency`, ours and nginx's.
- ratio = ours / yardstick, both measured in this run, runs alternating so
  drift hits both alike.  Nothing here asserts a speed: a missed target is
  a row that says "no".

Everything runs for real and on loopback only: blob.py and sos.py as
processes on ports they pick (port 0, read from their banners), stores in a
temporary directory on the real disk, nginx from a config written next to
them (worker_processes auto, access_log off, sendfile, tcp_nodelay, WebDAV
PUT), load from wrk (bench/get.lua, bench/upload.lua) and curl.  Every
process started here is stopped on the way out, whatever happens.  The
million-blob store of blob_list and replicate is written by bench/mkstore.py
and kept in BENCH_CACHE, with a hard-linked second member for replicate, so
a rerun starts in seconds (the first run spends a few minutes making it).
"""

import datetime
import grp
import hashlib
import http.client
import json
import os
import platform
import pwd
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import mkstore  # noqa: E402
sys.path.insert(0, REPO)
from cluster import load_groups, placement  # noqa: E402
from sos import DEFAULT_CHUNK_SIZE, parse_size  # noqa: E402

ALL_ROWS = ["blob_get_4k", "blob_get_4k_w1", "blob_get_100m", "sos_fetch_4k",
            "sos_upload_4k", "sos_upload_1g", "sos_fetch_1g", "sos_groups",
            "blob_list", "replicate", "rebalance", "rebalance_fetch", "chunk_1g",
            "chunk_10g"]

PYTHON = os.environ.get("PYTHON") or sys.executable
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
IDS = int(os.environ.get("BENCH_IDS", "2048"))
SEED = int(os.environ.get("BENCH_SEED", "13"))
WRK_THREADS = int(os.environ.get("BENCH_THREADS", "2"))
WRK_CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
BLOBS = int(os.environ.get("BENCH_BLOBS", "1000000"))
REBALANCE_BLOBS = int(os.environ.get("BENCH_REBALANCE_BLOBS", "100000"))
MISSING_RUNS = int(os.environ.get("BENCH_MISSING_RUNS", "1"))
CACHE = os.environ.get("BENCH_CACHE", "/var/tmp/sos-bench-cache")
ROWS = [r.strip() for r in os.environ.get("BENCH_ROWS", ",".join(ALL_ROWS)).split(",")
        if r.strip()]
OUT = os.environ.get("BENCH_OUT", os.path.join(REPO, "BENCHMARKS.md"))
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
# Servers as a user starts them: no flags of ours beyond ports and stores.
BLOB_ARGS = shlex.split(os.environ.get("BENCH_BLOB_ARGS", ""))
SOS_ARGS = shlex.split(os.environ.get("BENCH_SOS_ARGS", ""))
CHUNK_SIZES = [c.strip() for c in os.environ.get("BENCH_CHUNK_SIZES", "").split(",")
               if c.strip()]
BIG_GIB = int(os.environ.get("BENCH_BIG_GIB", "10"))
RANGE_DURATION = 5                # seconds of each one-connection range run

FILES = {"4k": 4096, "100m": 100 << 20, "1g": 1 << 30}
SMALL = 4096                      # bytes of each of the IDS random-GET blobs
MB = 1e6                          # MB/s as dd and curl print it
READY_TIMEOUT = 60.0
# The rebalance row's fetch windows: while one runs with replicate stopped, a
# blob-server waits on its half-sent request, and drops it after 10 s.
REBALANCE_WINDOW = 6
TICK = os.sysconf("SC_CLK_TCK")

INTRO = """\
# Benchmarks

`make bench` (bench/run.sh) appends one dated section per run, newest last;
bench/bench.py's docstring says what each row measures and how.  Everything
runs on this 2-core machine over loopback: our servers as real processes
(`python3 blob.py`, `python3 sos.py`) with stores on the real disk, and nginx
serving and accepting the same files in the same run, as the yardstick of
what this machine can do over HTTP.  Figures are medians of the runs listed
in brackets; runs of ours and of the yardstick alternate.  ratio = ours /
yardstick.  Other work may share the machine while the bench runs: the load
average at the start is in each section's header.
"""


# --- Processes ----------------------------------------------------------------

def peak_rss_kib(pid):
    """VmHWM of a live process in KiB, or None if it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid):
    """Child pids of pid, forked from any of its threads."""
    out = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return sorted(out)


def tree(pid):
    """pid and all its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children(p)
    return out


def cpu_ticks(pid):
    """Clock ticks of CPU pid has used, all its threads, plus those of its
    children that it has reaped (utime, stime, cutime, cstime: fields 14-17
    of /proc/PID/stat); 0 if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])


def tree_ticks(pid):
    """CPU ticks of a whole process tree.  Summed before and after a run, the
    difference is the tree's CPU over the run: a child that exits in between
    moves its ticks into its parent's cutime/cstime, a new one adds its own."""
    return sum(cpu_ticks(p) for p in tree(pid))


def cpu_seconds(pid):
    """(user, system) CPU seconds pid has used, all its threads."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def mib(kib):
    return "%.0f" % (kib / 1024) if kib is not None else "?"


class Service:
    """A server process started by the bench: its command, log and banner."""

    def __init__(self, name, argv, logdir, env=None):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, name + ".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=env)
        self.pid = self.proc.pid

    @property
    def command(self):
        return shlex.join(self.argv)

    def banner(self, *patterns, timeout=READY_TIMEOUT):
        """Wait until the log holds a match for every pattern; their groups."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            found = [re.search(p, text) for p in patterns]
            if all(found):
                return [m.groups() for m in found]
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s) before it was ready:\n%s"
                                   % (self.name, self.proc.returncode, text[-2000:]))
            if time.monotonic() > deadline:
                raise RuntimeError("%s not ready after %ds:\n%s"
                                   % (self.name, timeout, text[-2000:]))
            time.sleep(0.05)

    def rss(self):
        """[(name, peak RSS KiB)] of this process and its descendants (forked
        workers, nginx's workers)."""
        out = [(self.name, peak_rss_kib(self.pid))]
        for i, child in enumerate(tree(self.pid)[1:]):
            out.append(("%s worker %d" % (self.name, i + 1), peak_rss_kib(child)))
        return out

    def ticks(self):
        return tree_ticks(self.pid)

    def errors(self):
        """Lines of the log that report an error (our servers and nginx's log)."""
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return [l for l in text.splitlines()
                if re.search(r"Traceback| ERROR | WARNING |\[(error|crit|alert|emerg)\]",
                             l)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def settle(svcs, timeout=60.0):
    """Wait until svcs are idle (their trees use < 10% of a core over 0.3 s):
    start-up work, such as a blob-server's warm-up, is not billed to the
    first measured run."""
    deadline = time.monotonic() + timeout
    last = sum(s.ticks() for s in svcs)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = sum(s.ticks() for s in svcs)
        if now - last <= 0.03 * TICK:
            return
        last = now


class Result:
    def __init__(self, argv, out, err, seconds, maxrss, status, cpu):
        self.argv, self.out, self.err = argv, out, err
        self.seconds, self.maxrss, self.status = seconds, maxrss, status
        self.cpu = cpu                  # the client's own user+system seconds

    def check(self):
        if self.status != 0:
            raise RuntimeError("%s failed (%s):\n%s%s" % (
                shlex.join(self.argv), self.status, self.out[-2000:], self.err[-2000:]))
        return self


def run(argv, timeout=600, env=None, during=None):
    """Run a client to its end: a Result with its peak RSS and CPU time.

    The peak is VmHWM polled from /proc while it runs: the kernel's ru_maxrss
    would also count the bench's own memory, which the child shares between
    fork and exec.  The CPU time is that of our reaped children over the run:
    the client alone, as clients run one at a time and servers are reaped
    only when stopped.  during(proc), if given, is called once the client
    has started (to measure something while it runs); as other clients may
    then run and be reaped, the Result's .ticks (its own CPU clock ticks,
    polled from /proc like the peak) is the figure to use then."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env)
        done = threading.Event()
        peak = [None]
        ticks = [0]
        want = "\0".join(argv).encode() + b"\0"

        def watch():
            while not done.wait(0.02):
                try:
                    with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                        if f.read() != want:
                            continue        # not exec'd yet
                except OSError:
                    return
                kib = peak_rss_kib(proc.pid)
                if kib is not None:
                    peak[0] = max(peak[0] or 0, kib)
                ticks[0] = max(ticks[0], cpu_ticks(proc.pid))
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            if during:
                during(proc)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            done.set()
            watcher.join()
        seconds = time.monotonic() - start
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.seek(0)
        err.seek(0)
        res = Result(argv, out.read().decode("utf-8", "replace"),
                     err.read().decode("utf-8", "replace"), seconds,
                     peak[0], proc.returncode,
                     ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime)
        res.ticks = ticks[0]
        return res


def free_port():
    """A port free right now, for nginx (which can't report a port 0 bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, method="GET", body=None, headers=None, timeout=120):
    """One HTTP request: (status, body bytes).  body may be an open file."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout,
                                      blocksize=1 << 20)
    try:
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""),
                     body, headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def median(xs):
    return statistics.median(xs)


def fmt(x, unit):
    if unit == "req/s":
        return "{:,.0f}".format(x)
    if unit == "s":
        return "%.2f" % x
    return "{:,.0f}".format(x) if x >= 100 else "%.1f" % x


def figure(xs, unit):
    """'1,234 req/s [1,200 1,234 1,300]'"""
    runs = " ".join(fmt(x, unit) for x in xs)
    return "%s %s%s" % (fmt(median(xs), unit), unit,
                        " [%s]" % runs if len(xs) > 1 else "")


def fmt_cpu(us):
    """CPU per request: '85 µs', '4.2 ms', '3.10 s'."""
    if us is None:
        return "—"
    if us < 10:
        return "%.1f µs" % us
    if us < 10000:
        return "{:,.0f} µs".format(us)
    if us < 1e5:
        return "%.1f ms" % (us / 1e3)
    if us < 1e6:
        return "%.0f ms" % (us / 1e3)
    return "%.2f s" % (us / 1e6)


def fmt_ms(ms):
    return "%.2f" % ms if ms < 10 else "%.1f" % ms if ms < 100 else "{:,.0f}".format(ms)


def fmt_latency(lats):
    """Median p50 / p99 over runs, in ms."""
    if not lats:
        return "—"
    return "%s / %s ms" % (fmt_ms(median(l[0] for l in lats)),
                           fmt_ms(median(l[1] for l in lats)))


def to_ms(value, unit):
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


class Load:
    """One measured client run: its rate and what it cost the servers."""

    def __init__(self, res, value, requests, servers, ticks):
        self.res = res
        self.value = value                  # req/s or MB/s
        self.requests = requests
        self.latency = None                 # (p50 ms, p99 ms) from wrk --latency
        self.errors = None                  # wrk's non-2xx and socket errors
        # Server CPU seconds over the run: the trees of `servers`, each apart.
        self.cpu_by = {s.name: t / TICK for s, t in zip(servers, ticks)}
        self.cpu = sum(self.cpu_by.values()) if servers else None


def cpu_per_request(loads, name=None):
    """Server CPU µs per request over several runs: their CPU seconds summed,
    over their requests summed (a clock tick is 10 ms: pooling the runs keeps
    that coarseness out of short runs); None without figures."""
    loads = [x for x in loads if isinstance(x, Load) and x.cpu is not None
             and (name is None or name in x.cpu_by)]
    if not loads:
        return None
    cpu = sum(x.cpu if name is None else x.cpu_by[name] for x in loads)
    return cpu / max(sum(x.requests for x in loads), 1) * 1e6


# --- The bench --------------------------------------------------------------------

class Bench:
    def __init__(self):
        os.makedirs(CACHE, exist_ok=True)
        os.chmod(CACHE, 0o755)
        # On the real disk (not a tmpfs /tmp), beside the cache so that
        # hard links into it work; readable by nginx's and our workers.
        self.tmp = tempfile.mkdtemp(prefix="sos-bench.", dir=os.path.dirname(CACHE))
        os.chmod(self.tmp, 0o755)
        self.services = []
        self.rows = []
        self.nobody = pwd.getpwnam("nobody")
        self.files = {}
        self.ids = {}
        self.small_store = self.small_ids = None
        self.ng = None
        self.nginx_get_small = None
        self.profiles = []
        self.notes = []

    # Lifecycle.

    def close(self):
        for svc in reversed(self.services):
            try:
                svc.stop()
            except Exception as e:      # keep stopping the others
                print("bench: stopping %s: %s" % (svc.name, e), file=sys.stderr)
        self.services = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop(self, *svcs):
        for svc in svcs:
            svc.stop()
            self.services.remove(svc)

    def start(self, name, argv, *patterns):
        svc = Service(name, argv, self.tmp)
        self.services.append(svc)
        return svc, svc.banner(*patterns)

    def blob_server(self, name, store=None, small=False, args=(), copy_of=None):
        """Start `python3 blob.py` on port 0; returns its service (.url set).
        Its store starts as a hard-linked copy of copy_of, or with small of
        the random-GET store."""
        if store is None:               # a fresh store for every start
            store = os.path.join(self.tmp, name)
            n = 1
            while os.path.exists(store):
                n += 1
                store = os.path.join(self.tmp, "%s.%d" % (name, n))
        copy_of = self.small_store if small else copy_of
        if copy_of:
            subprocess.run(["cp", "-al", copy_of, store], check=True)
        prefix = []
        if PROFILE and os.getuid() == 0:
            # py-spy can't read a chrooted process: for a profiling run the
            # blob-server starts as nobody (so it doesn't chroot), allowed to
            # reach the interpreter even under /root.
            os.makedirs(store, exist_ok=True)
            os.chown(store, self.nobody.pw_uid, self.nobody.pw_gid)
            prefix = ["setpriv", "--reuid=%d" % self.nobody.pw_uid,
                      "--regid=%d" % self.nobody.pw_gid, "--clear-groups",
                      "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        svc, [(url,)] = self.start(
            name, prefix + [PYTHON, "blob.py", "--port", "0", "--store", store]
            + BLOB_ARGS + list(args),
            r"listening on (https?://\S+?:\d+)/")
        svc.url = url
        return svc

    def sos_server(self, name, members=None, config=None, copies=2, args=()):
        """Start `python3 sos.py` on port 0 for blob-servers `members` (one
        group) or a --config file; sets .up and .down base URLs."""
        argv = [PYTHON, "sos.py", "--api-host", "127.0.0.1", "--upload-port", "0",
                "--download-port", "0", "--admin-port", "0", "--copies", str(copies)]
        argv += ["--config", config] if config else ["--blob-server", ",".join(members)]
        argv += SOS_ARGS + list(args)
        svc, [(up,), (down,)] = self.start(name, argv, r"upload service\s+(\S+)/upload",
                                           r"download service\s+(\S+)/fetch")
        svc.up, svc.down = up, down
        return svc

    def nginx(self):
        """Start nginx (once per bench) on the files of self.files and, under
        /store/, the random-GET store itself."""
        d = os.path.join(self.tmp, "nginx")
        www = os.path.join(d, "www")
        os.makedirs(os.path.join(www, "put"))
        for name, path in self.files.items():
            os.link(path, os.path.join(www, name))
        user = ""
        if os.getuid() == 0:
            user = "user %s %s;" % (self.nobody.pw_name, grp.getgrgid(self.nobody.pw_gid).gr_name)
            os.chown(os.path.join(www, "put"), self.nobody.pw_uid, self.nobody.pw_gid)
        port = free_port()
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(d=d, www=www, port=port, user=user,
                                      store=self.small_store))
        svc = Service("nginx", ["nginx", "-e", os.path.join(d, "error.log"), "-p", d,
                                "-c", conf], self.tmp)
        self.services.append(svc)
        svc.log_path = os.path.join(d, "error.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if svc.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start; see %s" % svc.log_path)
                time.sleep(0.05)
        svc.url = "http://127.0.0.1:%d" % port
        svc.conf = conf
        self.ng = svc
        return svc

    # Inputs, cached.

    def make_files(self):
        """Random files of 4 KiB, 100 MiB and 1 GiB, and their SHA-1 ids."""
        d = os.path.join(CACHE, "files")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        for name, size in FILES.items():
            path = os.path.join(d, name)
            if not os.path.exists(path) or os.path.getsize(path) != size:
                with open(path + ".part", "wb") as f:
                    for _ in range(0, size, 1 << 20):
                        f.write(os.urandom(min(size, 1 << 20)))
                os.rename(path + ".part", path)
            os.chmod(path, 0o644)
            self.files[name] = path
            with open(path, "rb") as f:
                self.ids[name] = hashlib.file_digest(f, "sha1").hexdigest()

    def make_small_store(self):
        """The store of the random GETs: IDS blobs of 4 KiB; cached."""
        self.small_store, self.small_ids, made = self.store_4k(IDS)
        return made

    def store_4k(self, count):
        """A store of count blobs of 4 KiB (bench/mkstore.py --size 4096) and
        the file of their ids, blob i's on line i: (path, ids file, how it
        was made or None if cached)."""
        path = os.path.join(CACHE, "store-4k-%d" % count)
        if os.path.exists(path + ".ok"):
            return path, path + ".ids", None
        if os.path.exists(path):
            subprocess.run(["rm", "-rf", path], check=True)
        seconds = mkstore.make_store(path, count, self.nobody.pw_name, size=SMALL)
        with open(path + ".ids", "w") as f:
            f.writelines(mkstore.blob_id(i, SMALL) + "\n" for i in range(count))
        open(path + ".ok", "w").close()
        return path, path + ".ids", (
            "`python3 bench/mkstore.py --blobs %d --size %d --ids %s.ids %s`: %.1f s"
            % (count, SMALL, path, path, seconds))

    def store(self, suffix=""):
        """The BLOBS-blob store (suffix "-b": a hard-linked copy); cached,
        and valid only once its marker file says it is complete."""
        path = os.path.join(CACHE, "store-%d%s" % (BLOBS, suffix))
        marker = path + ".ok"
        if os.path.exists(marker):
            return path, None
        if os.path.exists(path):
            subprocess.run(["rm", "-rf", path], check=True)
        start = time.monotonic()
        if suffix:
            base, _ = self.store()
            subprocess.run(["cp", "-al", base, path], check=True)
            how = "`cp -al %s %s`" % (base, path)
        else:
            mkstore.make_store(path, BLOBS, self.nobody.pw_name)
            how = "`python3 bench/mkstore.py --blobs %d %s`" % (BLOBS, path)
        open(marker, "w").close()
        return path, "%s: %.0f s" % (how, time.monotonic() - start)

    # Clients.

    def wrk(self, url, servers, script=None, script_args=(), row=None,
            connections=WRK_CONNECTIONS, threads=WRK_THREADS, duration=DURATION,
            headers=()):
        """One wrk run against url; servers: the services whose CPU it costs.
        Returns a Load; wrk's errors go to the row's notes."""
        argv = ["wrk", "-t%d" % threads, "-c%d" % connections,
                "-d%ds" % duration, "--latency", "--timeout", "10s"]
        for h in headers:
            argv += ["-H", h]
        if script:
            argv += ["-s", os.path.join(HERE, script), url, "--"] + list(script_args)
        else:
            argv += [url]
        before = [s.ticks() for s in servers]
        res = run(argv, timeout=duration + 60)
        ticks = [s.ticks() - b for s, b in zip(servers, before)]
        res.check()
        rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", res.out).group(1))
        requests = int(re.search(r"([0-9]+) requests in", res.out).group(1))
        load = Load(res, rps, requests, servers, ticks)
        lat = {p: re.search(r"^\s+%s%%\s+([0-9.]+)(us|ms|s|m)\s*$" % p, res.out, re.M)
               for p in ("50", "99")}
        if all(lat.values()):
            load.latency = tuple(to_ms(*lat[p].groups()) for p in ("50", "99"))
        bad = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", res.out)
        sock = re.search(r"Socket errors: (.*)", res.out)
        if bad or sock:
            load.errors = "%s%s" % ("%s non-2xx of %d; " % (bad.group(1), requests)
                                    if bad else "", sock.group(1) if sock else "")
            if row is not None:
                row.setdefault("wrk_errors", []).append(
                    "wrk against %s: %s" % (url, load.errors))
        return load

    def get_small(self, base, prefix, layout, servers, row):
        """wrk GETs of the random-GET store's ids (bench/get.lua)."""
        return self.wrk(base, servers, "get.lua",
                        [self.small_ids, prefix, layout, str(SEED)], row=row)

    def nginx_small(self, row):
        return self.get_small(self.ng.url, "/store/", "sharded", [self.ng], row)

    def check_small(self, *urls):
        """A few of the random-GET ids, fetched from each base URL (a prefix to
        which the id or its sharded path is appended), hold their bytes."""
        with open(self.small_ids) as f:
            ids = f.read().split()
        for i in random.Random(SEED).sample(range(len(ids)), 3):
            want = mkstore.blob_body(i, SMALL)
            for url, sharded in urls:
                path = ids[i]
                if sharded:
                    path = "%s/%s/%s" % (ids[i][:2], ids[i][2:4], ids[i])
                status, body = request(url + path)
                if status != 200 or body != want:
                    raise RuntimeError("GET %s%s: %s, %d bytes (want %d)"
                                       % (url, path, status, len(body), len(want)))

    def curl(self, url, servers=(), upload=None, out="/dev/null"):
        """GET (or POST a file, streamed) with curl: a Load in MB/s, with the
        servers' CPU for the request."""
        argv = ["curl", "-sS", "--max-time", "600", "-o", out, "-w",
                "%{http_code} %{size_download} %{size_upload} %{time_total}"]
        if upload:
            argv += ["-X", "POST", "-T", upload]
        argv.append(url)
        before = [s.ticks() for s in servers]
        res = run(argv, timeout=660)
        ticks = [s.ticks() - b for s, b in zip(servers, before)]
        res.check()
        code, down, up, seconds = res.out.split()
        if code not in ("200", "201", "204"):
            raise RuntimeError("%s: HTTP %s" % (shlex.join(argv), code))
        size = float(up if upload else down)
        load = Load(res, size / float(seconds) / MB, 1, servers, ticks)
        load.seconds = float(seconds)
        return load

    def alternate(self, named, runs=RUNS):
        """Run each measurement `runs` times, alternating: {name: [values]}."""
        out = {name: [] for name in named}
        for _ in range(runs):
            for name, fn in named.items():
                out[name].append(fn())
        return out

    def profile(self, tag, svcs, load):
        """One more run of `load` while py-spy samples each of svcs, only the
        thread holding the GIL (--gil): where their Python CPU time goes.
        Their user and system CPU seconds over the run go to the notes."""
        if not PROFILE:
            return
        d = os.path.join(CACHE, "profiles")
        os.makedirs(d, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        spies = []
        for svc in svcs:
            path = os.path.join(d, "%s-%s-%s.txt" % (stamp, tag, svc.name))
            spies.append((path, subprocess.Popen(
                ["py-spy", "record", "--pid", str(svc.pid), "--subprocesses",
                 "--format", "raw",
                 "--duration", str(DURATION), "--rate", "200", "--nonblocking",
                 "--gil", "--output", path], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)))
        time.sleep(0.5)             # py-spy attaches
        before = [cpu_seconds(svc.pid) for svc in svcs]
        start = time.monotonic()
        load()
        wall = time.monotonic() - start
        for svc, (u0, s0) in zip(svcs, before):
            u1, s1 = cpu_seconds(svc.pid)
            self.notes.append("profile %s: %s used %.1f s user + %.1f s system CPU "
                              "in %.1f s" % (tag, svc.name, u1 - u0, s1 - s0, wall))
        for path, spy in spies:
            try:
                spy.wait(DURATION + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            self.profiles.append(path)

    # Recording.

    def record(self, name, workload, ours, unit, base=None, base_name="nginx",
               target=None, met=None, services=(), base_services=(), clients=(),
               commands=(), notes=(), row=None):
        """One row of the table.  ours and base: lists of Loads (or of plain
        figures, for rows without a yardstick or server CPU)."""
        row = row if row is not None else {}

        def values(xs):
            return [x.value if isinstance(x, Load) else x for x in xs or []]

        def cpu(xs):
            return cpu_per_request(xs or [])

        def latency(xs):
            return [x.latency for x in xs or [] if isinstance(x, Load) and x.latency]

        def peak(svcs):
            ks = [k for s in svcs for _, k in s.rss() if k is not None]
            return mib(max(ks)) if ks else "?"

        ours_list = ours if isinstance(ours, list) else []
        clients = list(clients) + [x.res for x in ours_list + list(base or [])
                                   if isinstance(x, Load)]
        clients = [c for c in clients if c is not None]
        rss = []
        if services:
            rss.append("ours %s" % peak(services))
        if base_services:
            rss.append("%s %s" % (base_services[0].name, peak(base_services)))
        if clients:
            tool = os.path.basename(clients[0].argv[0])
            if tool == os.path.basename(PYTHON):
                tool = os.path.basename(clients[0].argv[1])
            rss.append("%s %s" % (tool, mib(max((c.maxrss for c in clients
                                                 if c.maxrss is not None),
                                                default=None))))
        ours_v, base_v = values(ours_list), values(base)
        ratio = median(ours_v) / median(base_v) if base_v else None
        if callable(met):
            met = met(ratio, cpu(ours_list))
        if met and any(isinstance(x, Load) and x.errors for x in ours_list):
            met = False                 # wrk saw errors: see the notes
        errors = []
        for svc in list(services) + list(base_services):
            errors += ["%s logged: %s" % (svc.name, l[:300]) for l in svc.errors()[:3]]
        split = []
        for xs in (ours_list, base):
            loads = [x for x in xs or [] if isinstance(x, Load) and len(x.cpu_by) > 1]
            if loads:
                split.append("server CPU per request by process tree: " + ", ".join(
                    "%s %s" % (n, fmt_cpu(cpu_per_request(loads, n)))
                    for n in loads[0].cpu_by))
        row.update(name=name, workload=workload,
                   ours=figure(ours_v, unit) if isinstance(ours, list) else ours,
                   base="%s %s" % (base_name, figure(base_v, unit)) if base_v else "—",
                   ratio="%.2f" % ratio if ratio is not None else "—",
                   target=target or "—",
                   met="—" if met is None else ("yes" if met else "**no**"),
                   cpu=fmt_cpu(cpu(ours_list)), base_cpu=fmt_cpu(cpu(base)),
                   lat=fmt_latency(latency(ours_list)), base_lat=fmt_latency(latency(base)),
                   rss=", ".join(rss), commands=list(commands),
                   notes=list(notes) + split + row.get("wrk_errors", []) + errors)
        self.rows.append(row)
        print("%s: %s | ours %s | %s | ratio %s | met %s | CPU/req %s vs %s | "
              "p50/p99 %s vs %s" % (name, workload, row["ours"], row["base"],
                                    row["ratio"], row["met"], row["cpu"],
                                    row["base_cpu"], row["lat"], row["base_lat"]),
              flush=True)
        return row

    @staticmethod
    def wrk_desc():
        return "wrk -t%d -c%d -d%ds" % (WRK_THREADS, WRK_CONNECTIONS, DURATION)

    # --- The rows -----------------------------------------------------------------

    def row_blob_get_4k(self, workers=None):
        """blob-server GET 4 KiB over IDS random ids vs nginx on the same files."""
        name = "blob_get_4k" if workers is None else "blob_get_4k_w%d" % workers
        row = {}
        b = self.blob_server("blob-server", small=True,
                             args=["--workers", str(workers)] if workers else [])
        self.check_small((b.url + "/blob/", False), (self.ng.url + "/store/", True))
        settle([b, self.ng])
        ours = lambda: self.get_small(b.url, "/blob/", "flat", [b], row)
        if workers is not None and self.nginx_get_small:
            # nginx's runs of blob_get_4k, earlier in this bench: same files,
            # same wrk command.
            res = {"ours": [ours() for _ in range(RUNS)], "nginx": self.nginx_get_small}
            reused = ["nginx's figures are those of blob_get_4k in this bench (the "
                      "same wrk command on the same files)"]
        else:
            res = self.alternate({"nginx": lambda: self.nginx_small(row), "ours": ours})
            reused = []
            if workers is None:
                self.nginx_get_small = res["nginx"]
                self.profile("blob_get_4k", [b], ours)
        if workers is None:
            target = "≥ 0.40; ≤ 120 µs CPU/req"
            met = lambda ratio, cpu: ratio >= 0.40 and cpu is not None and cpu <= 120
            flags = "default flags"
        else:
            target, met = "— (per core)", None
            flags = "--workers %d" % workers
        self.record(name, "blob-server GET 4 KiB (%s), %s random ids, %s, "
                    "bench/get.lua" % (flags, "{:,}".format(IDS), self.wrk_desc()),
                    res["ours"], "req/s", res["nginx"], target=target, met=met,
                    services=[b], base_services=[self.ng],
                    commands=[b.command, shlex.join(res["ours"][0].res.argv),
                              shlex.join(res["nginx"][0].res.argv)],
                    notes=reused, row=row)
        self.stop(b)

    def row_blob_get_4k_w1(self):
        self.row_blob_get_4k(workers=1)

    def row_blob_get_100m(self):
        """blob-server GET 100 MiB vs nginx, MB/s."""
        b = self.blob_server("blob-server")
        self.put_blob(b.url, "100m")
        ours_url = "%s/blob/%s" % (b.url, self.ids["100m"])
        ng_url = self.ng.url + "/100m"
        self.curl(ours_url)            # both from the page cache from here on
        self.curl(ng_url)
        settle([b, self.ng])
        res = self.alternate({"nginx": lambda: self.curl(ng_url, [self.ng]),
                              "ours": lambda: self.curl(ours_url, [b])}, max(RUNS, 5))
        self.record("blob_get_100m", "blob-server GET 100 MiB (curl, page cache warm)",
                    res["ours"], "MB/s", res["nginx"], target="≥ 0.90",
                    met=lambda ratio, cpu: ratio >= 0.9, services=[b],
                    base_services=[self.ng],
                    commands=[b.command, shlex.join(res["ours"][0].res.argv),
                              shlex.join(res["nginx"][0].res.argv)])
        self.stop(b)

    def group_of_two(self, prefix="blob", small=False):
        b1 = self.blob_server(prefix + "1", small=small)
        b2 = self.blob_server(prefix + "2", small=small)
        s = self.sos_server("sos-server", [b1.url, b2.url], copies=2)
        return b1, b2, s

    def row_sos_fetch_4k(self):
        """sos-server fetch 4 KiB over IDS random ids vs nginx on the same files."""
        row = {}
        b1, b2, s = self.group_of_two(small=True)
        self.check_small((s.down + "/fetch/", False))
        settle([s, b1, b2, self.ng])
        ours = lambda: self.get_small(s.down, "/fetch/", "flat", [s, b1, b2], row)
        res = self.alternate({"nginx": lambda: self.nginx_small(row), "ours": ours})
        self.profile("sos_fetch_4k", [s, b1, b2], ours)
        self.record("sos_fetch_4k", "sos-server fetch 4 KiB (group of 2, both hold "
                    "every blob), %s random ids, %s, bench/get.lua"
                    % ("{:,}".format(IDS), self.wrk_desc()),
                    res["ours"], "req/s", res["nginx"], target="≥ 0.15",
                    met=lambda ratio, cpu: ratio >= 0.15, services=[s, b1, b2],
                    base_services=[self.ng],
                    commands=[b1.command, b2.command, s.command,
                              shlex.join(res["ours"][0].res.argv),
                              shlex.join(res["nginx"][0].res.argv)],
                    notes=["both blob-servers' stores are hard-linked copies of %s, "
                           "which nginx serves as /store/" % self.small_store], row=row)
        self.stop(s, b1, b2)

    def row_sos_upload_4k(self):
        """sos-server upload 4 KiB, unique, durable, 2 copies vs nginx PUT."""
        row = {}
        b1, b2, s = self.group_of_two()
        settle([s, b1, b2, self.ng])
        nonce = iter(range(1, 1000))
        stamp = "%x" % int(time.time())
        put = lambda: self.wrk(self.ng.url + "/put/", [self.ng], "upload.lua", [
            "PUT", "4096", "%s.%d" % (stamp, next(nonce)), "suffix"], row=row)
        upload = lambda: self.wrk(s.up + "/upload", [s, b1, b2], "upload.lua", [
            "POST", "4096", "%s.%d" % (stamp, next(nonce))], row=row)
        res = self.alternate({"nginx": put, "ours": upload})
        self.profile("sos_upload_4k", [s, b1, b2], upload)
        acked = sum(x.requests for x in res["ours"])
        held = [json.loads(request(b.url + "/stats")[1])["blobs"] for b in (b1, b2)]
        notes = ["after the measured runs%s the blob-servers hold %d and %d blobs; "
                 "wrk counted %d answered uploads in the measured runs"
                 % (" and the profiled run" if PROFILE else "", held[0], held[1], acked)]
        self.record("sos_upload_4k", "sos-server upload 4 KiB, unique bodies, durable, "
                    "2 copies (%s, bench/upload.lua) vs nginx WebDAV PUT of new 4 KiB "
                    "files" % self.wrk_desc(), res["ours"], "req/s", res["nginx"],
                    "nginx PUT", target="≥ 0.15", met=lambda ratio, cpu: ratio >= 0.15,
                    services=[s, b1, b2], base_services=[self.ng],
                    commands=[b1.command, b2.command, s.command,
                              shlex.join(res["ours"][0].res.argv),
                              shlex.join(res["nginx"][0].res.argv)],
                    notes=notes, row=row)
        self.stop(s, b1, b2)

    def upload(self, url, name):
        """Upload a cached file through sos-server; returns its JSON answer."""
        with open(self.files[name], "rb") as f:
            status, body = request(url + "/upload", "POST", f,
                                   {"Content-Length": str(FILES[name])})
        answer = json.loads(body)
        if status != 200 or answer.get("id") != self.ids[name]:
            raise RuntimeError("upload of %s: %s %s" % (name, status, body[:200]))
        return answer

    def dd(self):
        path = os.path.join(self.tmp, "dd.out")
        res = run(["dd", "if=/dev/zero", "of=" + path, "bs=1M", "count=1024",
                   "conv=fdatasync"], env=dict(os.environ, LC_ALL="C")).check()
        os.unlink(path)
        seconds = float(re.search(r"copied, ([0-9.e+-]+) s", res.err).group(1))
        load = Load(res, (1 << 30) / seconds / MB, 1, [], [])
        load.cpu = res.cpu                  # dd is the "server" here
        return load

    def row_sos_upload_1g(self):
        self.sos_1g(upload=True, fetch="sos_fetch_1g" in ROWS)

    def row_sos_fetch_1g(self):
        if "sos_upload_1g" not in ROWS:
            self.sos_1g(upload=False, fetch=True)

    def sos_1g(self, upload, fetch):
        """sos-server upload and/or fetch of 1 GiB; RSS of every process."""
        b1, b2, s = self.group_of_two()
        settle([s, b1, b2])
        rss_notes = []

        def small():
            rss = [k or 0 for svc in (s, b1, b2) for _, k in svc.rss()]
            ok = all(0 < k < 64 * 1024 for k in rss)
            rss_notes[:] = ["peak RSS of sos-server and both blob-servers, every "
                            "process: at most %s MiB (< 64 MiB: %s)"
                            % (mib(max(rss)), "yes" if ok else "**no**")]
            return ok

        answer_path = os.path.join(self.tmp, "upload.json")
        up = lambda: self.curl(s.up + "/upload", [s, b1, b2], upload=self.files["1g"],
                               out=answer_path)
        if upload:
            res = self.alternate({"dd": self.dd, "ours": up})
            self.profile("sos_upload_1g", [s, b1, b2], up)
            with open(answer_path) as f:
                answer = json.load(f)
            ok = answer.get("id") == self.ids["1g"] and answer.get("copies") == 2
            small_ok = small()
            self.record("sos_upload_1g", "sos-server upload of 1 GiB (curl -T, 2 "
                        "copies, durable) vs `dd conv=fdatasync` of 1 GiB",
                        res["ours"], "MB/s", res["dd"], "dd",
                        target="≥ 0.50; every process < 64 MiB",
                        met=lambda ratio, cpu: ratio >= 0.5 and small_ok and ok,
                        services=[s, b1, b2],
                        commands=[b1.command, b2.command, s.command,
                                  shlex.join(res["ours"][0].res.argv),
                                  shlex.join(res["dd"][0].res.argv)],
                        notes=list(rss_notes) + ["CPU per request of dd: dd's own user + "
                                           "system time", "" if ok else
                                           "upload answered %s" % answer])
        else:
            self.upload(s.up, "1g")
        if fetch:
            ours_url = "%s/fetch/%s" % (s.down, self.ids["1g"])
            ng_url = self.ng.url + "/1g"
            self.curl(ng_url)
            res = self.alternate({"nginx": lambda: self.curl(ng_url, [self.ng]),
                                  "ours": lambda: self.curl(ours_url, [s, b1, b2])})
            self.profile("sos_fetch_1g", [s, b1, b2], lambda: self.curl(ours_url))
            small_ok = small()
            self.record("sos_fetch_1g", "sos-server fetch of 1 GiB (curl; verified: "
                        "hashed while streaming)", res["ours"], "MB/s", res["nginx"],
                        target="≥ 0.50; every process < 64 MiB",
                        met=lambda ratio, cpu: ratio >= 0.5 and small_ok,
                        services=[s, b1, b2], base_services=[self.ng],
                        commands=[shlex.join(res["ours"][0].res.argv),
                                  shlex.join(res["nginx"][0].res.argv)],
                        notes=list(rss_notes))
        self.stop(s, b1, b2)

    def row_sos_groups(self):
        """sos-server fetch 4 KiB with 8 groups vs 1 group."""
        row = {}
        blobs = [self.blob_server("blob-g%d" % i) for i in range(8)]
        conf = os.path.join(self.tmp, "sos-8-groups.conf")
        with open(conf, "w") as f:
            for i, b in enumerate(blobs):
                f.write("[g%d]\n-: %s\n" % (i, b.url))
        s8 = self.sos_server("sos-8-groups", config=conf)
        self.upload(s8.up, "4k")
        holder = [b for b in blobs if request("%s/blob/%s" % (b.url, self.ids["4k"]),
                                              "HEAD")[0] == 200]
        s1 = self.sos_server("sos-1-group", [holder[0].url])
        url8 = "%s/fetch/%s" % (s8.down, self.ids["4k"])
        url1 = "%s/fetch/%s" % (s1.down, self.ids["4k"])
        settle(blobs + [s8, s1])
        res = self.alternate({"1 group": lambda: self.wrk(url1, [s1, holder[0]], row=row),
                              "8 groups": lambda: self.wrk(url8, [s8, holder[0]],
                                                           row=row)})
        self.record("sos_groups", "sos-server fetch 4 KiB, 8 groups of 1 vs 1 group of "
                    "1 (the same blob-server holds the blob; one id: this row is about "
                    "routing), %s" % self.wrk_desc(),
                    res["8 groups"], "req/s", res["1 group"], "1 group",
                    target="≥ 0.90", met=lambda ratio, cpu: ratio >= 0.9,
                    services=[s8] + holder, base_services=[s1] + holder,
                    commands=["%s   # and 7 more, blob-g0..blob-g7" % blobs[0].command,
                              "cat %s   # [g0] -: URL ... [g7] -: URL" % conf,
                              s8.command, s1.command,
                              shlex.join(res["8 groups"][0].res.argv),
                              shlex.join(res["1 group"][0].res.argv)],
                    notes=["the blob was stored once per sos-server by POST /upload; "
                           "it lives on %s; server CPU: the sos-server and %s"
                           % (holder[0].name, holder[0].name)], row=row)
        self.stop(s8, s1, *blobs)

    def row_blob_list(self):
        """GET /blobs on a blob-server holding BLOBS blobs."""
        path, made = self.store()
        b = self.blob_server("blob-%d" % BLOBS, path)
        start = time.monotonic()
        status, _ = request(b.url + "/digests", timeout=600)
        digests_s = time.monotonic() - start
        settle([b])
        listing = os.path.join(self.tmp, "blobs.json")
        res = [self.curl(b.url + "/blobs", [b], out=listing) for _ in range(RUNS)]
        with open(listing, "rb") as f:
            ids = json.load(f)
        ok = len(ids) == BLOBS and ids == sorted(ids)
        rss = b.rss()[0][1]
        notes = ["the listing held %d ids, sorted: %s" % (len(ids), ok),
                 "first GET /digests after start-up (every leaf summarised): %.1f s"
                 % digests_s,
                 "store: %d blobs of ~22 bytes in %s/<id[0:2]>/<id[2:4]>/<id>, written "
                 "by bench/mkstore.py (os.open/os.write per blob, no fsync, one "
                 "sync at the end; ids are SHA-1 of the bytes); %s"
                 % (BLOBS, path, made or "cached from an earlier run")]
        del ids
        for r in res:
            r.value = r.seconds
        self.record("blob_list", "GET /blobs on a blob-server with %s blobs (curl, "
                    "whole listing)" % "{:,}".format(BLOBS), res, "s",
                    target="streams; RSS < 64 MiB; seconds reported",
                    met=ok and rss is not None and rss < 64 * 1024, services=[b],
                    commands=[b.command, shlex.join(res[0].res.argv)], notes=notes)
        self.stop(b)

    def replicate(self, a, b):
        res = run([PYTHON, "replicate.py", "--blob-server", "%s,%s" % (a.url, b.url)],
                  timeout=1800)
        m = re.search(r"^default\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)$",
                      res.out, re.M)
        if not m:
            raise RuntimeError("replicate said:\n%s%s" % (res.out, res.err))
        res.examined, res.copied, res.deleted, res.failed, res.unreachable = \
            map(int, m.groups()[:5])
        return res

    def row_replicate(self):
        """replicate on an in-sync group of BLOBS per member; then 1% missing."""
        path_a, made_a = self.store()
        path_b, made_b = self.store("-b")
        a = self.blob_server("member-a", path_a)
        b = self.blob_server("member-b", path_b)
        # The first run meets members that have just started and are still
        # summarising their leaves (a blob-server does that once, on start);
        # it is reported apart from the runs against warm members.
        cold = self.replicate(a, b)
        insync = [self.replicate(a, b) for _ in range(RUNS)]
        if any(r.copied or r.failed or r.unreachable for r in [cold] + insync):
            raise RuntimeError("members not in sync:\n" + cold.out + insync[0].out)
        self.profile("replicate", [a, b], lambda: self.replicate(a, b))
        insync_s = [r.seconds for r in insync]
        self.record("replicate", "replicate, group of 2 in sync, %s blobs each"
                    % "{:,}".format(BLOBS), figure(insync_s, "s")
                    + "; cold: %.2f s" % cold.seconds, "s",
                    target="< 10 s", met=median(insync_s) < 10, services=[a, b],
                    clients=[cold] + insync,
                    commands=[a.command, b.command, shlex.join(insync[0].argv)],
                    notes=["cold = the first run, started as soon as both members "
                           "answered, while each still summarises its 65,536 leaves "
                           "(digests); the bracketed runs follow it",
                           "member-b's store is `cp -al` of member-a's"]
                    + [m for m in (made_a, made_b) if m])
        # 1% missing: delete from member-b's store while it is stopped (its
        # digests are recomputed on start), then let replicate restore them.
        missing = BLOBS // 100
        runs = []
        rng = random.Random()
        for _ in range(MISSING_RUNS):
            self.stop(b)
            os.unlink(path_b + ".ok")
            for i in rng.sample(range(BLOBS), missing):
                blob_id = mkstore.blob_id(i)
                d1, d2 = mkstore.shard(blob_id)
                os.unlink(os.path.join(path_b, d1, d2, blob_id))
            b = self.blob_server("member-b", path_b)
            res = self.replicate(a, b)
            runs.append(res)
            if res.copied != missing or res.failed:
                break
            open(path_b + ".ok", "w").close()
        exact = all(r.copied == missing and not r.failed for r in runs)
        self.record("replicate", "replicate, same group with 1%% (%s) of member-b's "
                    "blobs deleted and member-b restarted" % "{:,}".format(missing),
                    [r.seconds for r in runs], "s", target="seconds reported; "
                    "copies exactly the missing", met=exact, services=[a, b],
                    clients=runs, commands=[shlex.join(runs[0].argv)],
                    notes=["copied per run: %s (of %d deleted); failed: %s"
                           % ([r.copied for r in runs], missing,
                              [r.failed for r in runs])])
        self.stop(a, b)

    # Rebalance (issue 20): a group of 2 is added to one group of 2 holding
    # REBALANCE_BLOBS blobs of 4 KiB, and `replicate --rebalance` moves the
    # ids the new group wins.  Both rows use the same servers when both run.

    def row_rebalance(self):
        self.rebalance(move=True, fetch="rebalance_fetch" in ROWS)

    def row_rebalance_fetch(self):
        if "rebalance" not in ROWS:
            self.rebalance(move=False, fetch=True)

    def rebalance(self, move, fetch):
        """Start the resized cluster (and, for fetch, one never resized, on
        the same blobs), rebalance it, check that every blob is where it
        belongs, and record what was asked."""
        path, ids_path, made = self.store_4k(REBALANCE_BLOBS)
        with open(ids_path) as f:
            ids = f.read().split()
        old = [self.blob_server("old%d" % i, copy_of=path) for i in (1, 2)]
        new = [self.blob_server("new%d" % i) for i in (1, 2)]
        conf = os.path.join(self.tmp, "resized.conf")
        with open(conf, "w") as f:
            f.write("[old]\n-: %s\n-: %s\n[new]\n-: %s\n-: %s\n"
                    % tuple(b.url for b in old + new))
        groups = load_groups(config=conf)
        moved = [i for i, blob_id in enumerate(ids)
                 if placement(blob_id, groups)[0].name == "new"]
        moved_ids = os.path.join(self.tmp, "moved.ids")
        with open(moved_ids, "w") as f:
            f.writelines(ids[i] + "\n" for i in moved)
        s = self.sos_server("sos-resized", config=conf)
        resized = [s] + old + new
        rb = types.SimpleNamespace(path=path, ids_path=ids_path, ids=ids, old=old,
                                   new=new, conf=conf, moved=moved,
                                   moved_ids=moved_ids, s=s, resized=resized)
        rb.notes = ["store: %s blobs of 4 KiB in %s (bench/mkstore.py --size %d; "
                    "%s); old1 and old2 start as `cp -al` of it, new1 and new2 "
                    "empty; the new group wins %s of them"
                    % ("{:,}".format(len(ids)), path, SMALL,
                       made or "cached from an earlier run", "{:,}".format(len(moved)))]
        if fetch:
            rb.never = [self.blob_server("never%d" % i, copy_of=path) for i in (1, 2)]
            rb.sn = self.sos_server("sos-never-resized", [b.url for b in rb.never])
        # Every blob-server first summarises the leaves it was started on.
        settle(resized + (rb.never + [rb.sn] if fetch else []), timeout=600)
        self.check_4k(ids, moved[:3], s.down + "/fetch/")
        fetch_moved = lambda svc, servers: self.wrk(
            svc.down, servers, "get.lua", [moved_ids, "/fetch/", "flat", str(SEED)],
            row=rb.fetch_row)
        rb.fetch_row = {}
        if fetch:
            rb.before = self.alternate({
                "never": lambda: fetch_moved(rb.sn, [rb.sn] + rb.never),
                "resized": lambda: fetch_moved(s, resized)})
        argv = [PYTHON, "replicate.py", "--config", conf, "--rebalance"]
        if move:
            self.rebalance_move(rb, argv)
        else:
            rb.res = run(argv, timeout=3600)
            self.rebalance_check(rb)
        if fetch:
            self.check_4k(ids, moved[:3], s.down + "/fetch/")
            after = self.alternate({
                "never": lambda: fetch_moved(rb.sn, [rb.sn] + rb.never),
                "resized": lambda: fetch_moved(s, resized)})
            before = median(x.value for x in rb.before["resized"]) / median(
                x.value for x in rb.before["never"])
            self.record("rebalance_fetch", "sos-server fetch 4 KiB of the %s moved "
                        "ids after the rebalance vs a cluster never resized (one group "
                        "of 2, same blobs), %s, bench/get.lua"
                        % ("{:,}".format(len(moved)), self.wrk_desc()),
                        after["resized"], "req/s", after["never"], "never resized",
                        target="≥ 0.90 (within noise)",
                        met=lambda ratio, cpu: ratio >= 0.9 and rb.ok,
                        services=resized, base_services=[rb.sn] + rb.never,
                        commands=[rb.sn.command,
                                  shlex.join(after["resized"][0].res.argv),
                                  shlex.join(after["never"][0].res.argv)],
                        notes=["before the rebalance (the moved ids outside their "
                               "placement group), the same fetch: %s vs never resized "
                               "%s, ratio %.2f, p50 / p99 %s vs %s" % (
                                   figure([x.value for x in rb.before["resized"]],
                                          "req/s"),
                                   figure([x.value for x in rb.before["never"]],
                                          "req/s"), before,
                                   fmt_latency([x.latency for x in rb.before["resized"]
                                                if x.latency]),
                                   fmt_latency([x.latency for x in rb.before["never"]
                                                if x.latency]))] + rb.check_notes,
                        row=rb.fetch_row)
            self.stop(rb.sn, *rb.never)
        self.stop(s, *old, *new)

    def rebalance_move(self, rb, argv):
        """Run the rebalance and, meanwhile, RUNS pairs of wrk fetches of all
        the ids: one with replicate stopped (SIGSTOP: the same cluster, the
        same moment, nothing moving), one with it moving."""
        row = {}
        window = min(DURATION, REBALANCE_WINDOW)
        fetch_all = lambda: self.wrk(rb.s.down, rb.resized, "get.lua", [
            rb.ids_path, "/fetch/", "flat", str(SEED)], row=row, duration=window)
        loads = {"paused": [], "moving": []}
        mark = {}

        def during(proc):
            time.sleep(1.0)                 # past the start of its listing
            paused = 0.0
            for _ in range(RUNS):
                t = time.monotonic()
                proc.send_signal(signal.SIGSTOP)
                loads["paused"].append(fetch_all())
                proc.send_signal(signal.SIGCONT)
                paused += time.monotonic() - t
                loads["moving"].append(fetch_all())
                if proc.poll() is not None:
                    break
            mark.update(t=time.monotonic(), paused=paused, held=self.held(rb.new[0]),
                        ticks=sum(b.ticks() for b in rb.old + rb.new))

        res = run(argv, timeout=3600, during=during)
        end = time.monotonic()
        ticks = sum(b.ticks() for b in rb.old + rb.new) - mark["ticks"]
        rb.res = res
        self.rebalance_check(rb)
        summary = self.rebalance_summary(res)
        sync_s = sum(g["seconds"] for g in summary["sync"].values())
        moved_out = summary["moves"]["old"]["moved_out"]
        # Moves per second with nothing else running: from the end of the
        # fetch windows to the end of the moves (replicate's closing sync
        # of each group, whose seconds it reports, left out).
        alone_n = moved_out - mark["held"]
        alone_s = end - mark["t"] - sync_s
        alone = alone_n / alone_s if alone_s > 0 and alone_n > 0 else 0.0
        overall = moved_out / (res.seconds - mark["paused"])
        still = mark["held"] < len(rb.moved)
        rss = res.maxrss
        p99 = {k: median(x.latency[1] for x in v if x.latency) for k, v in loads.items()}
        p99_ratio = p99["moving"] / p99["paused"]
        cmd = [s.command for s in rb.old + rb.new[:1]] + \
            ["cat %s   # [old] -: old1 URL, -: old2 URL; [new] -: new1, -: new2"
             % rb.conf, rb.s.command, shlex.join(argv)]
        common = ["replicate: exit status %d, %.1f s in all, of which %.1f s stopped "
                  "(SIGSTOP) for the paused fetch windows and %.1f s the closing sync "
                  "of both groups; %s blobs moved out of old, %d failed, %d left; "
                  "replicate's own CPU: %s per move" % (
                      res.status, res.seconds, mark["paused"], sync_s,
                      "{:,}".format(moved_out), summary["moves"]["old"]["failed"],
                      summary["moves"]["old"]["left"],
                      fmt_cpu(res.ticks / TICK / max(moved_out, 1) * 1e6))]
        # One "request" per move; its server CPU is the four blob-servers'.
        load = Load(res, alone, max(alone_n, 1), [], [])
        load.cpu = ticks / TICK
        self.record("rebalance", "replicate --rebalance (default flags) after adding "
                    "a group of 2 to a group of 2 holding %s blobs of 4 KiB: moves/s "
                    "with nothing else running (from the end of the fetch windows "
                    "below to the end of the moves)" % "{:,}".format(len(rb.ids)),
                    [load], "moves/s", target="≥ 500 moves/s; replicate ≤ 64 MiB",
                    met=alone >= 500 and rss is not None and rss < 64 * 1024 and rb.ok,
                    services=rb.old + rb.new, clients=[res], commands=cmd,
                    notes=common + [
                        "over the whole run (fetch windows included, stopped time "
                        "not): %s moves/s" % fmt(overall, "req/s"),
                        "alone: %s moves in %.1f s; server CPU/req = the four "
                        "blob-servers' CPU over that time (closing sync included) per "
                        "move" % ("{:,}".format(alone_n), alone_s),
                        "peak RSS of replicate: %s MiB" % mib(rss)] + rb.notes
                    + rb.check_notes)
        self.record("rebalance", "sos-server fetch 4 KiB of all %s ids (bench/get.lua, "
                    "wrk -t%d -c%d -d%ds) while the rebalance moves vs while its "
                    "replicate is stopped (SIGSTOP), runs alternating; target on p99"
                    % ("{:,}".format(len(rb.ids)), WRK_THREADS, WRK_CONNECTIONS,
                       window), loads["moving"], "req/s", loads["paused"],
                    "stopped", target="p99 ≤ 3x stopped's",
                    met=p99_ratio <= 3 and still, services=rb.resized,
                    commands=[shlex.join(loads["moving"][0].res.argv)],
                    notes=["p99 moving / stopped: %.2f; the new group held %s of the "
                           "%s moved blobs after the last window (moves still under "
                           "way: %s)" % (p99_ratio, "{:,}".format(mark["held"]),
                                         "{:,}".format(len(rb.moved)),
                                         "yes" if still else "**no**"),
                           "windows of %d s (not BENCH_DURATION): a blob-server drops "
                           "a request it has waited 10 s on" % window], row=row)

    @staticmethod
    def held(b):
        """Blobs a blob-server holds (its /stats)."""
        status, body = request(b.url + "/stats")
        if status != 200:
            raise RuntimeError("%s/stats: %s" % (b.url, status))
        return json.loads(body)["blobs"]

    @staticmethod
    def rebalance_summary(res):
        """replicate's two tables: {"sync": {group: {...}}, "moves": {...}}."""
        out = {"sync": {}, "moves": {}}
        for m in re.finditer(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)"
                             r"(?:\s+(\d+\.\d+))?$", res.out, re.M):
            if m.group(7) is not None:
                out["sync"][m.group(1)] = {"seconds": float(m.group(7))}
            else:
                out["moves"][m.group(1)] = dict(zip(
                    ("moved_in", "moved_out", "bytes", "failed", "left"),
                    map(int, m.groups()[1:6])))
        if "old" not in out["moves"]:
            raise RuntimeError("replicate said:\n%s%s" % (res.out, res.err))
        return out

    def rebalance_check(self, rb):
        """Every blob where it belongs, on both members, and nowhere else."""
        held = {b.name: self.held(b) for b in rb.old + rb.new}
        want = {"old1": len(rb.ids) - len(rb.moved), "old2": len(rb.ids) - len(rb.moved),
                "new1": len(rb.moved), "new2": len(rb.moved)}
        rb.ok = held == want and rb.res.status == 0
        rb.check_notes = ["after the rebalance the members hold %s (placement says "
                          "%s); replicate exited %d" % (held, want, rb.res.status)]

    def check_4k(self, ids, which, base):
        """The blobs ids[i] for i in which are served whole by base + id."""
        for i in which:
            status, body = request(base + ids[i])
            if status != 200 or body != mkstore.blob_body(i, SMALL):
                raise RuntimeError("GET %s%s: %s, %d bytes" % (base, ids[i], status,
                                                               len(body)))
    # --- Chunked objects (issue 21) -------------------------------------------

    def bigbody(self, args, servers, timeout=3600):
        """bench/bigbody.py as the client: a Load (MB/s) with its JSON line
        as .answer and the servers' CPU over the run."""
        before = [s.ticks() for s in servers]
        res = run([PYTHON, os.path.join(HERE, "bigbody.py")] + args, timeout=timeout)
        ticks = [s.ticks() - b for s, b in zip(servers, before)]
        res.check()
        answer = json.loads(res.out.strip().splitlines()[-1])
        if answer["status"] != 200:
            raise RuntimeError("bigbody %s: %s" % (shlex.join(args), answer))
        load = Load(res, answer["size"] / answer["seconds"] / MB, 1, servers, ticks)
        load.answer = answer
        return load

    def chunk_setup(self, label, args):
        """A sos-server with args and a pair of blob-servers of its own (an
        object's id is a manifest on one and a whole blob on another)."""
        b1 = self.blob_server("blob-%s-1" % label)
        b2 = self.blob_server("blob-%s-2" % label)
        s = self.sos_server("sos-%s" % label, [b1.url, b2.url], args=args)
        return {"label": label, "svcs": [s, b1, b2], "s": s, "args": args}

    @staticmethod
    def chunk_bytes(size):
        return parse_size(size or DEFAULT_CHUNK_SIZE)

    def row_chunk_1g(self):
        """1 GiB upload and verified fetch, chunked vs --chunk-size 0, and a
        4 KiB range in the middle of it vs a 4 KiB object, for the default
        chunk size and each of CHUNK_SIZES; every run alternating."""
        plain = self.chunk_setup("unchunked", ["--chunk-size", "0"])
        chunked = [self.chunk_setup("chunked-default", [])]
        chunked += [self.chunk_setup("chunked-" + c, ["--chunk-size", c])
                    for c in CHUNK_SIZES if c != DEFAULT_CHUNK_SIZE]
        setups = [plain] + chunked
        every = [svc for x in setups for svc in x["svcs"]]
        settle(every)
        path = self.files["1g"]

        def up(x):
            return lambda: self.bigbody(["upload", x["s"].up + "/upload", path],
                                        x["svcs"])
        res = self.alternate({x["label"]: up(x) for x in setups})
        for x in setups:
            a = res[x["label"]][-1].answer["answer"]
            if a.get("id") != self.ids["1g"] or a.get("copies") != 2:
                raise RuntimeError("%s: upload answered %s" % (x["label"], a))
        self.profile("chunk_upload_1g", chunked[0]["svcs"], up(chunked[0]))
        for x in chunked:
            loads = res[x["label"]]
            size = self.chunk_bytes(x["args"][1] if x["args"] else None)
            mbs = median(l.value for l in loads)
            tail = median(l.answer["tail"] for l in loads)
            worth = 2 * size / (mbs * MB)
            chunks = loads[-1].answer["answer"].get("chunks")
            self.record(
                "chunk_upload_1g" + ("" if not x["args"] else " " + x["args"][1]),
                "1 GiB upload (bench/bigbody.py: sendfile, Content-Length) through "
                "sos-server %s (%s chunks) vs --chunk-size 0 (spooled whole), "
                "group of 2, 2 copies" % (shlex.join(x["args"]) or "default flags"
                                          + " (--chunk-size %s)" % DEFAULT_CHUNK_SIZE,
                                          chunks),
                loads, "MB/s", res["unchunked"], "--chunk-size 0",
                target="≥ 1.3; last byte → reply ≤ 2 chunks' transfer",
                met=lambda ratio, cpu: ratio >= 1.3 and tail <= worth,
                services=x["svcs"], base_services=plain["svcs"],
                commands=[x["s"].command, shlex.join(loads[0].res.argv)],
                notes=["client's last byte → reply: %.2f s [%s] (2 chunks' worth at "
                       "this rate: %.2f s); --chunk-size 0: %.2f s [%s]" % (
                           tail, " ".join("%.2f" % l.answer["tail"] for l in loads),
                           worth, median(l.answer["tail"] for l in res["unchunked"]),
                           " ".join("%.2f" % l.answer["tail"]
                                    for l in res["unchunked"]))])

        # Verified fetch: whole and right once each (hashed by the client),
        # then timed with curl, alternating.
        urls = {x["label"]: "%s/fetch/%s" % (x["s"].down, self.ids["1g"]) for x in setups}
        for x in setups:
            got = self.bigbody(["fetch", urls[x["label"]]], x["svcs"]).answer
            if got["sha1"] != self.ids["1g"] or got["size"] != FILES["1g"]:
                raise RuntimeError("%s: fetch gave %s" % (x["label"], got))
        res = self.alternate({x["label"]: (lambda x: lambda: self.curl(
            urls[x["label"]], x["svcs"]))(x) for x in setups})
        self.profile("chunk_fetch_1g", chunked[0]["svcs"],
                     lambda: self.curl(urls[chunked[0]["label"]]))
        for x in chunked:
            self.record(
                "chunk_fetch_1g" + ("" if not x["args"] else " " + x["args"][1]),
                "1 GiB fetch (curl; verified: every chunk whole, the whole against "
                "the id) from sos-server %s vs --chunk-size 0 (hashed while "
                "streaming)" % (shlex.join(x["args"]) or "default flags"),
                res[x["label"]], "MB/s", res["unchunked"], "--chunk-size 0",
                target="≥ 1.0", met=lambda ratio, cpu: ratio >= 1.0,
                services=x["svcs"], base_services=plain["svcs"],
                commands=[shlex.join(res[x["label"]][0].res.argv)],
                notes=["checked once before the timed runs: bench/bigbody.py fetch "
                       "hashed all %d bytes to the id" % FILES["1g"]])

        # A 4 KiB range in the middle, one connection (latency, not load),
        # against a whole 4 KiB object's fetch from the same sos-server.
        mid = FILES["1g"] // 2
        rng = "Range: bytes=%d-%d" % (mid, mid + 4095)
        self.upload(chunked[0]["s"].up, "4k")
        small_url = "%s/fetch/%s" % (chunked[0]["s"].down, self.ids["4k"])
        for x in setups:
            status, body = request(urls[x["label"]], headers={rng.split(": ")[0]:
                                                              rng.split(": ")[1]})
            with open(path, "rb") as f:
                want = os.pread(f.fileno(), 4096, mid)
            if status != 206 or body != want:
                raise RuntimeError("%s: range gave %s, %d bytes" % (
                    x["label"], status, len(body)))
        one = dict(connections=1, threads=1, duration=RANGE_DURATION)

        def lat(url, svcs, headers=()):
            def go():
                load = self.wrk(url, svcs, headers=headers, **one)
                load.value = load.latency[0]
                return load
            return go
        named = {"4k": lat(small_url, chunked[0]["svcs"])}
        named.update({x["label"]: lat(urls[x["label"]], x["svcs"], [rng])
                      for x in setups})
        res = self.alternate(named)
        for x in setups:
            loads = res[x["label"]]
            self.record(
                "chunk_range_4k" + ("" if not x["args"] else " " + x["args"][1]),
                "4 KiB range (bytes=%d-%d) of the 1 GiB object from sos-server %s "
                "vs a whole 4 KiB object's fetch; wrk -t1 -c1 -d%ds: p50 ms"
                % (mid, mid + 4095, shlex.join(x["args"]) or "default flags",
                   RANGE_DURATION), loads, "ms", res["4k"], "4 KiB object",
                target="— (report)", services=x["svcs"],
                commands=[shlex.join(loads[0].res.argv)],
                notes=["--chunk-size 0: the range is asked of one member and passed "
                       "through unverified" if x is plain else
                       "the range's chunk is read whole and verified before its "
                       "bytes go out"] + ["requests in the runs: %s (range) vs %s "
                                          "(4 KiB object)" % (
                                              [l.requests for l in loads],
                                              [l.requests for l in res["4k"]])])
        self.stop(*every)

    def row_chunk_10g(self):
        """BIG_GIB GiB upload through a --spool-dir of 1 GiB (a tmpfs), at
        the default --chunk-size, and its fetch hashed whole; peak RSS of
        every process."""
        if os.getuid() != 0:
            self.notes.append("chunk_10g: skipped (mounting the 1 GiB spool "
                              "tmpfs needs root)")
            return
        gib = BIG_GIB
        st = os.statvfs(self.tmp)
        free = st.f_bavail * st.f_frsize >> 30
        if free < 2 * gib + 4:
            gib = max(1, (free - 4) // 2)
        spool = os.path.join(self.tmp, "spool")
        os.makedirs(spool)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", spool],
                       check=True)
        try:
            x = self.chunk_setup("big", ["--spool-dir", spool, "--max-upload",
                                         "%dG" % (gib + 1)])
            settle(x["svcs"])
            spool_free = shutil.disk_usage(spool).free
            up = self.bigbody(["upload", x["s"].up + "/upload", self.files["1g"],
                               "--times", str(gib)], x["svcs"])
            a = up.answer
            fetch = self.bigbody(["fetch", "%s/fetch/%s" % (x["s"].down,
                                                            a["answer"].get("id"))],
                                 x["svcs"])
            f = fetch.answer
            whole = a["answer"].get("id") == a["sha1"] == f["sha1"] and \
                f["size"] == a["size"] == gib << 30
            rss = [(n, k or 0) for svc in x["svcs"] for n, k in svc.rss()]
            top = max(k for _, k in rss)
            clients = max(up.res.maxrss or 0, fetch.res.maxrss or 0)
            ok = whole and top <= 128 * 1024
            scaled = "" if gib == BIG_GIB else (
                " (scaled down from %d GiB: %d GiB free for 2 copies)" % (BIG_GIB, free))
            self.record(
                "chunk_10g", "%d GiB upload%s (bench/bigbody.py --times %d: the 1 GiB "
                "file %d times, every 1 MiB block numbered) through sos-server "
                "--spool-dir on a 1 GiB tmpfs, default --chunk-size, 2 copies; then "
                "its fetch, hashed whole; yardstick: the fetch"
                % (gib, scaled, gib, gib), [up], "MB/s", [fetch], "fetch",
                target="200; fetch whole; every process ≤ 128 MiB",
                met=lambda ratio, cpu: ok, services=x["svcs"],
                commands=[x["s"].command, shlex.join(up.res.argv),
                          shlex.join(fetch.res.argv)],
                notes=["upload: %d, %.0f s, answer %s; last byte → reply %.2f s" % (
                           a["status"], a["seconds"], json.dumps(a["answer"]), a["tail"]),
                       "fetch: %d, %.0f s, %d bytes, SHA-1 %s the id (%s)" % (
                           f["status"], f["seconds"], f["size"],
                           "=" if whole else "**≠**", f["sha1"]),
                       "spool free before: %.0f MiB; after: %.0f MiB" % (
                           spool_free / 2**20, shutil.disk_usage(spool).free / 2**20),
                       "peak RSS by process (MiB): " + ", ".join(
                           "%s %s" % (n, mib(k)) for n, k in rss)
                       + "; the client %s" % mib(clients)])
            self.stop(*x["svcs"])
        finally:
            subprocess.run(["umount", spool])

    def put_blob(self, url, name):
        with open(self.files[name], "rb") as f:
            status, body = request("%s/blob/%s" % (url, self.ids[name]), "POST", f,
                                   {"Content-Length": str(FILES[name])})
        if status != 200:
            raise RuntimeError("POST %s to %s: %s %s" % (name, url, status, body[:200]))

    # Report.

    def header(self):
        def version(argv, pattern):
            try:
                out = subprocess.run(argv, capture_output=True, text=True).stderr
                out += subprocess.run(argv, capture_output=True, text=True).stdout
                m = re.search(pattern, out)
                return m.group(1) if m else "?"
            except OSError:
                return "?"
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1).strip() if m else cpu
        return ("commit %s%s · %d cores (%s) · Linux %s · Python %s · nginx %s · "
                "wrk %s · curl %s · load average at start %.2f"
                % (commit, " (with uncommitted changes)" if dirty else "",
                   os.cpu_count(), cpu, platform.release(), platform.python_version(),
                   version(["nginx", "-v"], r"nginx/(\S+)"),
                   version(["wrk", "-v"], r"wrk (\S+)"),
                   version(["curl", "--version"], r"curl (\S+)"), self.load))

    @staticmethod
    def command():
        """The command that repeats this run: every knob that shapes it."""
        knobs = [("BENCH_RUNS", RUNS), ("BENCH_DURATION", DURATION)]
        if set(ROWS) & {"blob_list", "replicate"}:
            knobs.append(("BENCH_BLOBS", BLOBS))
        if "replicate" in ROWS and MISSING_RUNS != 1:
            knobs.append(("BENCH_MISSING_RUNS", MISSING_RUNS))
        if set(ROWS) & {"rebalance", "rebalance_fetch"} and REBALANCE_BLOBS != 100000:
            knobs.append(("BENCH_REBALANCE_BLOBS", REBALANCE_BLOBS))
        for name, value, default in (("BENCH_IDS", IDS, 2048), ("BENCH_SEED", SEED, 13),
                                     ("BENCH_THREADS", WRK_THREADS, 2),
                                     ("BENCH_CONNECTIONS", WRK_CONNECTIONS, 64)):
            if value != default:
                knobs.append((name, value))
        if ROWS != ALL_ROWS:
            knobs.append(("BENCH_ROWS", ",".join(ROWS)))
        if "chunk_1g" in ROWS and CHUNK_SIZES:
            knobs.append(("BENCH_CHUNK_SIZES", ",".join(CHUNK_SIZES)))
        if "chunk_10g" in ROWS and BIG_GIB != 10:
            knobs.append(("BENCH_BIG_GIB", BIG_GIB))
        for name, args in (("BENCH_BLOB_ARGS", BLOB_ARGS), ("BENCH_SOS_ARGS", SOS_ARGS)):
            if args:
                knobs.append((name, shlex.join(args)))
        return " ".join("%s=%s" % (k, shlex.quote(str(v))) for k, v in knobs) \
            + " make bench"

    def markdown(self, started, seconds):
        out = ["", "## %s" % started.strftime("%Y-%m-%d %H:%M UTC"), "",
               self.header(), "",
               "`%s`, %.0f s in all." % (self.command(), seconds), "",
               "Servers at their default flags%s; 4 KiB GETs over %s distinct ids "
               "chosen at random (bench/get.lua, seed %d), nginx on the same files; "
               "server CPU/req = utime+stime of every process of the servers' trees "
               "over the client run / requests completed (for sos-server rows: "
               "sos-server and its blob-servers); p50 / p99 from `wrk --latency`; "
               "targets of issue 13 (blob_get_100m, sos_groups, blob_list, replicate: "
               "issue 6)." % (
                   " plus %s" % shlex.join(BLOB_ARGS + SOS_ARGS)
                   if BLOB_ARGS or SOS_ARGS else "", "{:,}".format(IDS), SEED),
               "", "| row | workload | ours | yardstick | ratio | target | met | "
               "server CPU/req, ours | server CPU/req, yardstick | p50 / p99, ours | "
               "p50 / p99, yardstick | peak RSS (MiB) |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            out.append("| %(name)s | %(workload)s | %(ours)s | %(base)s | %(ratio)s | "
                       "%(target)s | %(met)s | %(cpu)s | %(base_cpu)s | %(lat)s | "
                       "%(base_lat)s | %(rss)s |" % r)
        out += ["", "Commands (ports and temporary paths as in this run; nginx.conf "
                "below):", ""]
        for r in self.rows:
            for c in r["commands"]:
                out.append("- %s: `%s`" % (r["name"], c.replace("`", "'")))
        notes = [(r["name"], n) for r in self.rows for n in r["notes"] if n]
        if notes or self.notes:
            out += ["", "Notes:", ""]
            out += ["- %s: %s" % (name, n) for name, n in notes]
            out += ["- %s" % n for n in self.notes]
        if self.ng:
            with open(self.ng.conf) as f:
                conf = f.read()
            out += ["", "<details><summary>nginx.conf</summary>", "", "```nginx",
                    conf.rstrip(), "```", "", "</details>"]
        return "\n".join(out) + "\n"

    def main(self):
        started = datetime.datetime.now(datetime.timezone.utc)
        t0 = time.monotonic()
        self.load = os.getloadavg()[0]
        big = {"blob_list", "replicate"} & set(ROWS)
        print("bench: preparing files%s in %s" % (
            " and the %d-blob stores" % BLOBS if big else "", CACHE), flush=True)
        self.make_files()
        made = self.make_small_store()
        if made:
            self.notes.append("made " + made)
        if big:
            for suffix in ("", "-b") if "replicate" in ROWS else ("",):
                _, made = self.store(suffix)
                if made:
                    self.notes.append("made " + made)
        if {"rebalance", "rebalance_fetch"} & set(ROWS):
            _, _, made = self.store_4k(REBALANCE_BLOBS)
            if made:
                self.notes.append("made " + made)
        self.nginx()
        for name in ALL_ROWS:
            if name == "sos_fetch_1g" and "sos_upload_1g" in ROWS:
                continue                # measured with sos_upload_1g's servers
            if name in ROWS:
                print("bench: %s (%.0f s so far)" % (name, time.monotonic() - t0),
                      flush=True)
                getattr(self, "row_" + name)()
        if self.profiles:
            self.notes.append("py-spy profiles (collapsed stacks): "
                              + ", ".join(self.profiles))
        text = self.markdown(started, time.monotonic() - t0)
        fresh = not os.path.exists(OUT)
        with open(OUT, "a") as f:
            if fresh:
                f.write(INTRO)
            f.write(text)
        print(text)
        print("bench: appended to %s in %.0f s" % (OUT, time.monotonic() - t0))


NGINX_CONF = """\
# Written by bench/bench.py for one bench run.
daemon off;
master_process on;
worker_processes auto;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location /put/ {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
        }}
        # The random-GET store, the tree our blob-servers' stores are
        # hard-linked copies of: /store/<id[0:2]>/<id[2:4]>/<id>.
        location /store/ {{
            alias {store}/;
        }}
    }}
}}
"""


def main():
    # SIGTERM (and a second Ctrl-C) must still stop every server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    unknown = [r for r in ROWS if r not in ALL_ROWS]
    if unknown:
        sys.exit("bench: unknown row(s) %s; rows: %s"
                 % (", ".join(unknown), ", ".join(ALL_ROWS)))
    bench = Bench()
    try:
        bench.main()
    finally:
        bench.close()


if __name__ == "__main__":
    main()
