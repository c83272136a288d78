#!/usr/bin/env python3
"""bench: SOS side by side with nginx on this machine; appends to BENCHMARKS.md.

`make bench` (bench/run.sh) runs the eight workloads of issue 6 in one go and
appends a dated table to BENCHMARKS.md: the median of several runs for our
servers and for the yardstick, their ratio (same bench run, runs interleaved
so drift hits both alike), the target, the peak RSS (VmHWM) of every process
involved, and the exact commands.  Nothing here asserts a speed: a missed
target is a row that says "no".

Everything runs for real and on loopback only: blob.py and sos.py as
processes on ports they pick (port 0, read from their banners), stores in a
temporary directory on the real disk, nginx from a config written next to
them (2 workers, access_log off, sendfile, tcp_nodelay, WebDAV PUT), load from
wrk (bench/upload.lua makes unique upload bodies) and curl.  Every process
started here is stopped on the way out, whatever happens.

The million-blob store of rows 7 and 8 is written straight to disk by
bench/mkstore.py and kept in BENCH_CACHE, with a hard-linked second member
for row 8, so a rerun starts in seconds.

Knobs (environment):
    BENCH_RUNS=3          runs per measurement (the median is reported)
    BENCH_DURATION=10     seconds per wrk run
    BENCH_BLOBS=1000000   blobs in the store of rows 7 and 8
    BENCH_CACHE=/var/tmp/sos-bench-cache   generated files and stores
    BENCH_ROWS=1,2,...    run only these rows (for working on one)
    BENCH_OUT=BENCHMARKS.md
    BENCH_BLOB_ARGS=...   extra flags for every blob.py (default "--workers 2")
    BENCH_SOS_ARGS=...    extra flags for every sos.py (default "--workers 2")
    BENCH_PROFILE=1       after measuring rows 1, 3, 4, 5 and 8, one more run
                          under py-spy; collapsed stacks in BENCH_CACHE/profiles
                          (blob-servers then run as nobody without chroot,
                          which py-spy can't see into)
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
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import mkstore  # noqa: E402

PYTHON = os.environ.get("PYTHON") or sys.executable
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
BLOBS = int(os.environ.get("BENCH_BLOBS", "1000000"))
CACHE = os.environ.get("BENCH_CACHE", "/var/tmp/sos-bench-cache")
ROWS = [int(r) for r in os.environ.get("BENCH_ROWS", "1,2,3,4,5,6,7,8").split(",")]
OUT = os.environ.get("BENCH_OUT", os.path.join(REPO, "BENCHMARKS.md"))
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
# One worker process per core, as the README advises (nginx runs 2 too).
BLOB_ARGS = shlex.split(os.environ.get("BENCH_BLOB_ARGS", "--workers 2"))
SOS_ARGS = shlex.split(os.environ.get("BENCH_SOS_ARGS", "--workers 2"))

WRK_THREADS, WRK_CONNECTIONS = 2, 64
FILES = {"4k": 4096, "100m": 100 << 20, "1g": 1 << 30}
MB = 1e6                          # MB/s as dd and curl print it
READY_TIMEOUT = 60.0

INTRO = """\
# Benchmarks

`make bench` (bench/run.sh) appends one dated section per run, newest last.
Everything runs on this 2-core machine over loopback: our servers as real
processes (`python3 blob.py`, `python3 sos.py`) with stores on the real disk,
and nginx (2 workers, `access_log off`, `sendfile on`, `tcp_nodelay on`,
WebDAV PUT) serving and accepting the same files in the same run, as the
yardstick of what this machine can do over HTTP.  Figures are medians of the
runs listed in brackets; runs of ours and of the yardstick alternate.
ratio = ours / yardstick.  Peak RSS is VmHWM from /proc/PID/status, read just
before each server is stopped, and polled while a client runs.  Targets
are those of issue 6.  Other work may share the machine while the bench runs:
the load average at the start is in each section's header.
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


def cpu_seconds(pid):
    """(user, system) CPU seconds pid has used, all its threads."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


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
        """[(name, peak RSS KiB)] of this process and its children (nginx's workers)."""
        out = [(self.name, peak_rss_kib(self.pid))]
        for i, child in enumerate(children(self.pid)):
            out.append(("%s worker %d" % (self.name, i + 1), peak_rss_kib(child)))
        return out

    def errors(self):
        """Lines of the log that report an error (our servers and nginx's log)."""
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return [l for l in text.splitlines()
                if re.search(r"Traceback| ERROR |\[(error|crit|alert|emerg)\]", l)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Result:
    def __init__(self, argv, out, err, seconds, maxrss, status):
        self.argv, self.out, self.err = argv, out, err
        self.seconds, self.maxrss, self.status = seconds, maxrss, status

    def check(self):
        if self.status != 0:
            raise RuntimeError("%s failed (%s):\n%s%s" % (
                shlex.join(self.argv), self.status, self.out[-2000:], self.err[-2000:]))
        return self


def run(argv, timeout=600, env=None):
    """Run a client to its end: a Result with its peak RSS.

    The peak is VmHWM polled from /proc while it runs: the kernel's ru_maxrss
    would also count the bench's own memory, which the child shares between
    fork and exec."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env)
        done = threading.Event()
        peak = [None]
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
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            done.set()
            watcher.join()
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Result(argv, out.read().decode("utf-8", "replace"),
                      err.read().decode("utf-8", "replace"), seconds,
                      peak[0], proc.returncode)


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
        self.ng = None
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

    def blob_server(self, name, store=None):
        """Start `python3 blob.py` on port 0; returns (service, url)."""
        store = store or os.path.join(self.tmp, name)
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
            + BLOB_ARGS,
            r"listening on (https?://\S+?:\d+)/")
        svc.url = url
        return svc

    def sos_server(self, name, members=None, config=None, copies=2):
        """Start `python3 sos.py` on port 0 for blob-servers `members` (one
        group) or a --config file; sets .up and .down base URLs."""
        argv = [PYTHON, "sos.py", "--api-host", "127.0.0.1", "--upload-port", "0",
                "--download-port", "0", "--admin-port", "0", "--copies", str(copies)]
        argv += ["--config", config] if config else ["--blob-server", ",".join(members)]
        argv += SOS_ARGS
        svc, [(up,), (down,)] = self.start(name, argv, r"upload service\s+(\S+)/upload",
                                           r"download service\s+(\S+)/fetch")
        svc.up, svc.down = up, down
        return svc

    def nginx(self):
        """Start nginx (once per bench) on the files of self.files."""
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
            f.write(NGINX_CONF.format(d=d, www=www, port=port, user=user))
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

    def wrk(self, url, script_args=None, row=None):
        """One wrk run: (requests/s, Result); errors go to the row's notes."""
        argv = ["wrk", "-t%d" % WRK_THREADS, "-c%d" % WRK_CONNECTIONS,
                "-d%ds" % DURATION, "--timeout", "10s"]
        if script_args:
            argv += ["-s", os.path.join(HERE, "upload.lua"), url, "--"] + script_args
        else:
            argv += [url]
        res = run(argv, timeout=DURATION + 60).check()
        rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", res.out).group(1))
        res.requests = int(re.search(r"([0-9]+) requests in", res.out).group(1))
        bad = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", res.out)
        sock = re.search(r"Socket errors: (.*)", res.out)
        if row is not None and (bad or sock):
            row.setdefault("wrk_errors", []).append(
                "%s: %s%s" % (url, "%s non-2xx; " % bad.group(1) if bad else "",
                              sock.group(1) if sock else ""))
        return rps, res

    def curl(self, url, upload=None, out="/dev/null"):
        """GET (or POST a file, streamed) with curl: (MB/s, seconds, Result)."""
        argv = ["curl", "-sS", "--max-time", "600", "-o", out, "-w",
                "%{http_code} %{size_download} %{size_upload} %{time_total}"]
        if upload:
            argv += ["-X", "POST", "-T", upload]
        argv.append(url)
        res = run(argv, timeout=660).check()
        code, down, up, seconds = res.out.split()
        if code not in ("200", "201", "204"):
            raise RuntimeError("%s: HTTP %s" % (shlex.join(argv), code))
        size = float(up if upload else down)
        return size / float(seconds) / MB, float(seconds), res

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
                ["py-spy", "record", "--pid", str(svc.pid), "--format", "raw",
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

    def record(self, num, workload, ours, unit, base=None, base_name="nginx",
               target=None, ratio=None, met=None, services=(), clients=(),
               commands=(), notes=(), row=None):
        row = row if row is not None else {}
        rss = []
        for svc in services:
            rss += ["%s %s" % (n, mib(k)) for n, k in svc.rss()]
        clients = [c for c in clients if c is not None]
        if clients:
            name = os.path.basename(clients[0].argv[0])
            rss.append("%s %s" % (name if name != os.path.basename(PYTHON)
                                  else os.path.basename(clients[0].argv[1]),
                                  mib(max((c.maxrss for c in clients
                                           if c.maxrss is not None), default=None))))
        if ratio is None and base:
            ratio = median(ours) / median(base)
        errors = []
        for svc in services:
            errors += ["%s: %s" % (svc.name, l[:200]) for l in svc.errors()[:3]]
        row.update(num=num, workload=workload,
                   ours=figure(ours, unit) if isinstance(ours, list) else ours,
                   base="%s %s" % (base_name, figure(base, unit)) if base else "—",
                   ratio="%.2f" % ratio if ratio is not None else "—",
                   target=target or "—",
                   met="—" if met is None else ("yes" if met else "**no**"),
                   rss=", ".join(rss), commands=list(commands),
                   notes=list(notes) + row.get("wrk_errors", []) + errors)
        self.rows.append(row)
        print("row %d: %s | ours %s | base %s | ratio %s | %s" % (
            num, workload, row["ours"], row["base"], row["ratio"], row["met"]),
            flush=True)
        return row

    # --- The eight workloads ------------------------------------------------------

    def row1(self):
        """blob-server GET 4 KiB vs nginx."""
        row = {}
        b = self.blob_server("blob-server")
        self.put_blob(b.url, "4k")
        ours_url = "%s/blob/%s" % (b.url, self.ids["4k"])
        ng_url = self.ng.url + "/4k"
        res = self.alternate({"nginx": lambda: self.wrk(ng_url, row=row),
                              "ours": lambda: self.wrk(ours_url, row=row)})
        self.profile("row1", [b], lambda: self.wrk(ours_url))
        ratio = median(r for r, _ in res["ours"]) / median(r for r, _ in res["nginx"])
        self.nginx_get_4k = [r for r, _ in res["nginx"]]
        self.record(1, "blob-server GET 4 KiB, wrk -t2 -c64 -d%ds" % DURATION,
                    [r for r, _ in res["ours"]], "req/s", self.nginx_get_4k,
                    target="≥ 0.15", met=ratio >= 0.15, services=[b, self.ng],
                    clients=[c for _, c in res["ours"] + res["nginx"]],
                    commands=[b.command, shlex.join(res["ours"][0][1].argv),
                              shlex.join(res["nginx"][0][1].argv)], row=row)
        self.stop(b)

    def row2(self):
        """blob-server GET 100 MiB vs nginx, MB/s."""
        b = self.blob_server("blob-server")
        self.put_blob(b.url, "100m")
        ours_url = "%s/blob/%s" % (b.url, self.ids["100m"])
        ng_url = self.ng.url + "/100m"
        self.curl(ours_url)            # both from the page cache from here on
        self.curl(ng_url)
        res = self.alternate({"nginx": lambda: self.curl(ng_url),
                              "ours": lambda: self.curl(ours_url)}, max(RUNS, 5))
        ours = [r[0] for r in res["ours"]]
        base = [r[0] for r in res["nginx"]]
        ratio = median(ours) / median(base)
        self.record(2, "blob-server GET 100 MiB (curl, page cache warm)", ours, "MB/s",
                    base, target="≥ 0.90", met=ratio >= 0.9, services=[b, self.ng],
                    clients=[r[2] for r in res["ours"] + res["nginx"]],
                    commands=[b.command, shlex.join(res["ours"][0][2].argv),
                              shlex.join(res["nginx"][0][2].argv)])
        self.stop(b)

    def group_of_two(self, prefix="blob"):
        b1 = self.blob_server(prefix + "1")
        b2 = self.blob_server(prefix + "2")
        s = self.sos_server("sos-server", [b1.url, b2.url], copies=2)
        return b1, b2, s

    def row3(self):
        """sos-server upload 4 KiB, unique, durable, 2 copies vs nginx PUT."""
        row = {}
        b1, b2, s = self.group_of_two()
        nonce = iter(range(1, 1000))
        stamp = "%x" % int(time.time())
        put = lambda: self.wrk(self.ng.url + "/put/", [
            "PUT", "4096", "%s.%d" % (stamp, next(nonce)), "suffix"], row=row)
        upload = lambda: self.wrk(s.up + "/upload", [
            "POST", "4096", "%s.%d" % (stamp, next(nonce))], row=row)
        res = self.alternate({"nginx": put, "ours": upload})
        self.profile("row3", [s, b1, b2], upload)
        acked = sum(c.requests for _, c in res["ours"])
        held = [json.loads(request(b.url + "/stats")[1])["blobs"] for b in (b1, b2)]
        ours = [r for r, _ in res["ours"]]
        base = [r for r, _ in res["nginx"]]
        ratio = median(ours) / median(base)
        notes = ["after the measured runs%s the blob-servers hold %d and %d blobs; "
                 "wrk counted %d answered uploads in the measured runs"
                 % (" and the profiled run" if PROFILE else "", held[0], held[1], acked)]
        self.record(3, "sos-server upload 4 KiB, unique bodies, durable, 2 copies "
                    "(wrk -t2 -c64 -d%ds, bench/upload.lua) vs nginx WebDAV PUT of "
                    "new 4 KiB files" % DURATION, ours, "req/s", base, "nginx PUT",
                    target="≥ 0.08", met=ratio >= 0.08, services=[s, b1, b2, self.ng],
                    clients=[c for _, c in res["ours"] + res["nginx"]],
                    commands=[b1.command, b2.command, s.command,
                              shlex.join(res["ours"][0][1].argv),
                              shlex.join(res["nginx"][0][1].argv)],
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

    def row4(self):
        """sos-server fetch 4 KiB vs nginx GET."""
        row = {}
        b1, b2, s = self.group_of_two()
        self.upload(s.up, "4k")
        ours_url = "%s/fetch/%s" % (s.down, self.ids["4k"])
        ng_url = self.ng.url + "/4k"
        res = self.alternate({"nginx": lambda: self.wrk(ng_url, row=row),
                              "ours": lambda: self.wrk(ours_url, row=row)})
        self.profile("row4", [s, b1, b2], lambda: self.wrk(ours_url))
        ours = [r for r, _ in res["ours"]]
        base = [r for r, _ in res["nginx"]]
        ratio = median(ours) / median(base)
        self.record(4, "sos-server fetch 4 KiB (group of 2), wrk -t2 -c64 -d%ds"
                    % DURATION, ours, "req/s", base, target="≥ 0.06",
                    met=ratio >= 0.06, services=[s, b1, b2, self.ng],
                    clients=[c for _, c in res["ours"] + res["nginx"]],
                    commands=[b1.command, b2.command, s.command,
                              shlex.join(res["ours"][0][1].argv),
                              shlex.join(res["nginx"][0][1].argv)], row=row)
        self.stop(s, b1, b2)

    def dd(self):
        path = os.path.join(self.tmp, "dd.out")
        res = run(["dd", "if=/dev/zero", "of=" + path, "bs=1M", "count=1024",
                   "conv=fdatasync"], env=dict(os.environ, LC_ALL="C")).check()
        os.unlink(path)
        seconds = float(re.search(r"copied, ([0-9.e+-]+) s", res.err).group(1))
        return (1 << 30) / seconds / MB, res

    def row5(self):
        """sos-server upload and fetch of 1 GiB; RSS of every process."""
        b1, b2, s = self.group_of_two()
        up = lambda: self.curl(s.up + "/upload", upload=self.files["1g"],
                               out=os.path.join(self.tmp, "upload.json"))
        res = self.alternate({"dd": self.dd, "ours": up})
        self.profile("row5-upload", [s, b1, b2], up)
        with open(os.path.join(self.tmp, "upload.json")) as f:
            answer = json.load(f)
        ok = answer.get("id") == self.ids["1g"] and answer.get("copies") == 2
        ours_url = "%s/fetch/%s" % (s.down, self.ids["1g"])
        ng_url = self.ng.url + "/1g"
        self.curl(ng_url)
        fetch = self.alternate({"nginx": lambda: self.curl(ng_url),
                                "ours": lambda: self.curl(ours_url)})
        self.profile("row5-fetch", [s, b1, b2], lambda: self.curl(ours_url))
        rss = [k or 0 for svc in (s, b1, b2) for _, k in svc.rss()]
        small = all(0 < k < 64 * 1024 for k in rss)
        up_mbs = [r[0] for r in res["ours"]]
        dd_mbs = [r[0] for r in res["dd"]]
        up_ratio = median(up_mbs) / median(dd_mbs)
        self.record(5, "sos-server upload of 1 GiB (curl -T, 2 copies, durable) vs "
                    "`dd conv=fdatasync` of 1 GiB", up_mbs, "MB/s", dd_mbs, "dd",
                    target="≥ 0.35; every process < 64 MiB",
                    met=up_ratio >= 0.35 and small and ok, services=[s, b1, b2],
                    clients=[r[2] for r in res["ours"]],
                    commands=[b1.command, b2.command, s.command,
                              shlex.join(res["ours"][0][2].argv),
                              shlex.join(res["dd"][0][1].argv)],
                    notes=["peak RSS of sos-server and both blob-servers: at most "
                           "%s MiB (< 64 MiB: %s)" % (mib(max(rss)), "yes" if small
                                                       else "**no**"),
                           "" if ok else "upload answered %s" % answer])
        f_ours = [r[0] for r in fetch["ours"]]
        f_base = [r[0] for r in fetch["nginx"]]
        f_ratio = median(f_ours) / median(f_base)
        self.record(5, "sos-server fetch of 1 GiB (curl, hashed while streaming)",
                    f_ours, "MB/s", f_base, target="≥ 0.60; every process < 64 MiB",
                    met=f_ratio >= 0.6 and small, services=[s, b1, b2, self.ng],
                    clients=[r[2] for r in fetch["ours"] + fetch["nginx"]],
                    commands=[shlex.join(fetch["ours"][0][2].argv),
                              shlex.join(fetch["nginx"][0][2].argv)])
        self.stop(s, b1, b2)

    def row6(self):
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
        res = self.alternate({"1 group": lambda: self.wrk(url1, row=row),
                              "8 groups": lambda: self.wrk(url8, row=row)})
        ours = [r for r, _ in res["8 groups"]]
        base = [r for r, _ in res["1 group"]]
        ratio = median(ours) / median(base)
        self.record(6, "sos-server fetch 4 KiB, 8 groups of 1 vs 1 group of 1 (the "
                    "same blob-server holds the blob), wrk -t2 -c64 -d%ds" % DURATION,
                    ours, "req/s", base, "1 group", target="≥ 0.90",
                    met=ratio >= 0.9, services=[s8, s1] + holder,
                    clients=[c for _, c in res["8 groups"] + res["1 group"]],
                    commands=["%s   # and 7 more, blob-g0..blob-g7" % blobs[0].command,
                              "cat %s   # [g0] -: URL ... [g7] -: URL" % conf,
                              s8.command, s1.command,
                              shlex.join(res["8 groups"][0][1].argv),
                              shlex.join(res["1 group"][0][1].argv)],
                    notes=["the blob was stored once per sos-server by POST /upload; "
                           "it lives on %s" % holder[0].name], row=row)
        self.stop(s8, s1, *blobs)

    def row7(self):
        """GET /blobs on a blob-server holding BLOBS blobs."""
        path, made = self.store()
        b = self.blob_server("blob-%d" % BLOBS, path)
        start = time.monotonic()
        status, _ = request(b.url + "/digests", timeout=600)
        digests_s = time.monotonic() - start
        listing = os.path.join(self.tmp, "blobs.json")
        res = [self.curl(b.url + "/blobs", out=listing) for _ in range(RUNS)]
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
        self.record(7, "GET /blobs on a blob-server with %s blobs (curl, whole "
                    "listing)" % "{:,}".format(BLOBS), [r[1] for r in res], "s",
                    target="streams; RSS < 64 MiB; seconds reported",
                    met=ok and rss is not None and rss < 64 * 1024, services=[b],
                    clients=[r[2] for r in res],
                    commands=[b.command, shlex.join(res[0][2].argv)], notes=notes)
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

    def row8(self):
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
        self.profile("row8", [a, b], lambda: self.replicate(a, b))
        insync_s = [r.seconds for r in insync]
        self.record(8, "replicate, group of 2 in sync, %s blobs each"
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
        for _ in range(RUNS):
            self.stop(b)
            os.unlink(path_b + ".ok")
            for i in rng.sample(range(BLOBS), missing):
                blob_id = mkstore.blob_id(i)
                d1, d2 = mkstore.BlobStore.shard(blob_id)
                os.unlink(os.path.join(path_b, d1, d2, blob_id))
            b = self.blob_server("member-b", path_b)
            res = self.replicate(a, b)
            runs.append(res)
            if res.copied != missing or res.failed:
                break
            open(path_b + ".ok", "w").close()
        exact = all(r.copied == missing and not r.failed for r in runs)
        self.record(8, "replicate, same group with 1%% (%s) of member-b's blobs "
                    "deleted and member-b restarted" % "{:,}".format(missing),
                    [r.seconds for r in runs], "s", target="seconds reported; "
                    "copies exactly the missing", met=exact, services=[a, b],
                    clients=runs, commands=[shlex.join(runs[0].argv)],
                    notes=["copied per run: %s (of %d deleted); failed: %s"
                           % ([r.copied for r in runs], missing,
                              [r.failed for r in runs])])
        self.stop(a, b)

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
    def knobs():
        out = ""
        if ROWS != list(range(1, 9)):
            out += " BENCH_ROWS=%s" % ",".join(map(str, ROWS))
        for name, args in (("BENCH_BLOB_ARGS", BLOB_ARGS), ("BENCH_SOS_ARGS", SOS_ARGS)):
            if args:
                out += " %s=%s" % (name, shlex.quote(shlex.join(args)))
        return out

    def markdown(self, started, seconds):
        out = ["", "## %s" % started.strftime("%Y-%m-%d %H:%M UTC"), "",
               self.header(), "",
               "`make bench` (BENCH_RUNS=%d BENCH_DURATION=%d BENCH_BLOBS=%d%s), "
               "%.0f s in all." % (RUNS, DURATION, BLOBS, self.knobs(), seconds),
               "", "| # | workload | ours | yardstick | ratio | target | met | "
               "peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            out.append("| %(num)d | %(workload)s | %(ours)s | %(base)s | %(ratio)s | "
                       "%(target)s | %(met)s | %(rss)s |" % r)
        out += ["", "Commands (ports and temporary paths as in this run; nginx.conf "
                "below):", ""]
        for r in self.rows:
            for c in r["commands"]:
                out.append("- %d: `%s`" % (r["num"], c.replace("`", "'")))
        notes = [(r["num"], n) for r in self.rows for n in r["notes"] if n]
        if notes or self.notes:
            out += ["", "Notes:", ""]
            out += ["- %d: %s" % (num, n) for num, n in notes]
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
        print("bench: preparing files%s in %s" % (
            " and the %d-blob stores" % BLOBS if {7, 8} & set(ROWS) else "", CACHE),
            flush=True)
        self.make_files()
        if {7, 8} & set(ROWS):
            for suffix in ("", "-b") if 8 in ROWS else ("",):
                _, made = self.store(suffix)
                if made:
                    self.notes.append("made " + made)
        self.nginx()
        for num in ROWS:
            print("bench: row %d (%.0f s so far)" % (num, time.monotonic() - t0),
                  flush=True)
            getattr(self, "row%d" % num)()
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
worker_processes 2;
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
    }}
}}
"""


def main():
    # SIGTERM (and a second Ctrl-C) must still stop every server we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench()
    try:
        bench.main()
    finally:
        bench.close()


if __name__ == "__main__":
    main()
