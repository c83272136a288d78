"""Fixtures: real blob-servers and sos-servers on ephemeral loopback ports.

In-process servers (make_server on port 0, serve_forever in a daemon thread)
for speed; real processes (`python3 blob.py ...`) where a test must kill,
stop or chroot one.  No fixed ports, no sleeps: readiness is polled against
a deadline.
"""

import pytest

# support.py (the tests' one support module) puts the repository root on
# sys.path first.  The names it lends here stay importable from conftest.
from support import (ROOT, BlobProcess, Front, InProcess, blob_servers,  # noqa: F401
                     get_json, request, wait_for)

import blob  # noqa: E402  (after support: it needs ROOT on sys.path)
from cluster import Group  # noqa: E402


@pytest.fixture
def blob_server(tmp_path):
    """Factory: start an in-process blob-server; returns its InProcess with
    .url and .store (a BlobStore)."""
    with blob_servers(tmp_path) as start:
        yield start


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


class Cluster(Front):
    """Groups of in-process blob-servers behind an in-process sos-server."""

    def __init__(self, blob_server, layout, timeout=10, **options):
        self.blobs = {}
        groups = []
        for gname, size in layout:
            members = []
            for i in range(size):
                srv = blob_server("%s-%d" % (gname, i))
                self.blobs[srv.url] = srv
                members.append(srv.url)
            groups.append(Group(gname, members))
        super().__init__(groups, timeout=timeout, **options)

    def holders(self, blob_id):
        return [url for url, srv in self.blobs.items() if srv.store.exists(blob_id)]


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
