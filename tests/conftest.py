"""Fixtures: real blob-servers and sos-servers on ephemeral loopback ports.

In-process servers (make_server on port 0, serving in a daemon thread) for
speed; real processes (`python3 blob.py ...`) where a test must kill, stop
or chroot one.  No fixed ports, no sleeps: readiness is polled against a
deadline.  The classes behind them are in support.py; tests import from
there, never from here.
"""

import pytest

from support import BlobProcess, InProcessCluster, blob_servers


@pytest.fixture
def blob_server(tmp_path):
    """Factory: start an in-process blob-server; returns its InProcessServer
    with .url and .store (a BlobStore)."""
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


@pytest.fixture
def make_cluster(blob_server):
    """Factory: make_cluster([("g1", 2), ("g2", 2)], copies=2, ...): an
    InProcessCluster, stopped after the test."""
    made = []

    def make(layout=(("g1", 2), ("g2", 2)), **options):
        c = InProcessCluster(blob_server, layout, **options)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()
