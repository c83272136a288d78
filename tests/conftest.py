"""Fixtures: real blob-servers and sos-servers on ephemeral loopback ports.

In-process servers (make_server on port 0, serve_forever in a daemon thread)
for speed; real processes (`python3 blob.py ...`) where a test must kill,
stop or chroot one.  No fixed ports, no sleeps: readiness is polled against
a deadline.
"""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import blob  # noqa: E402
import sos  # noqa: E402


def request(url, method="GET", body=None, headers=None, timeout=30):
    """One HTTP request on a new connection: returns (status, headers, body).

    headers come back as a dict with lower-case names."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path + ("?" + parts.query if parts.query else "")
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def get_json(url, method="GET", body=None, headers=None):
    status, _, data = request(url, method, body, headers)
    return status, json.loads(data) if data else None


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll predicate until it is truthy; fail the test after timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))


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


class BlobProcess:
    """blob.py as a real process; its port is read from the banner."""

    def __init__(self, store, *args, port=0, env=None):
        self.store = str(store)
        self.args = list(args)
        self.port = port
        self.env = env
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "blob.py"), "-store", self.store,
             "-port", str(self.port)] + self.args,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env,
            text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"http://[\d.]+:(\d+)/", line)
        if not m:
            self.proc.kill()
            raise AssertionError("blob-server did not start: %r" % line)
        self.port = int(m.group(1))      # keep the port across restarts
        self.url = "http://127.0.0.1:%d" % self.port
        wait_for(self.alive, what="blob-server /alive")

    def alive(self):
        try:
            return request(self.url + "/alive", timeout=1)[0] == 200
        except OSError:
            return False

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def restart(self):
        self.kill()
        self.start()


@pytest.fixture
def blob_server(tmp_path):
    """Factory: start an in-process blob-server; returns its InProcess with
    .url and .store (a BlobStore)."""
    started = []

    def start(name="store", **kwargs):
        store = blob.BlobStore(str(tmp_path / name), **kwargs)
        store.recover()
        srv = InProcess(blob.make_server(("127.0.0.1", 0), store))
        srv.store = store
        started.append(srv)
        return srv
    yield start
    for srv in started:
        srv.stop()
        srv.store.close()


@pytest.fixture
def blob_process(tmp_path):
    """Factory: start blob.py as a process (store under tmp_path)."""
    started = []

    def start(name="store", *args, **kwargs):
        proc = BlobProcess(tmp_path / name, *args, **kwargs)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.kill()


class Cluster:
    """Groups of in-process blob-servers behind an in-process sos-server."""

    def __init__(self, blob_server, layout, **options):
        self.blobs = {}
        groups = []
        for gname, size in layout:
            members = []
            for i in range(size):
                srv = blob_server("%s-%d" % (gname, i))
                self.blobs[srv.url] = srv
                members.append(srv.url)
            groups.append(sos.Group(gname, members))
        self.groups = groups
        pool = sos.Pool(connect_timeout=1, timeout=options.pop("timeout", 10))
        self.cluster = sos.Cluster(groups, pool=pool, **options)
        up, down = sos.make_servers(self.cluster, "127.0.0.1", 0, 0)
        self.up, self.down = InProcess(up), InProcess(down)

    def upload(self, data, headers=None):
        return get_json(self.up.url + "/upload", "POST", data, headers)

    def fetch(self, blob_id, method="GET", headers=None):
        return request(self.down.url + "/fetch/" + blob_id, method, headers=headers)

    def holders(self, blob_id):
        return [url for url, srv in self.blobs.items() if srv.store.exists(blob_id)]

    def stop(self):
        self.up.stop()
        self.down.stop()


@pytest.fixture
def make_cluster(blob_server):
    """Factory: make_cluster([("g1", 2), ("g2", 2)], copies=2, ...)."""
    made = []

    def make(layout=(("g1", 2), ("g2", 2)), **options):
        c = Cluster(blob_server, layout, **options)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()
