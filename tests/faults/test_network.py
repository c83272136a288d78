"""Rows 12 and 13: partitions and slow links, in network namespaces.

Each test builds its own namespaces joined by veth pairs (nothing in the
host's own namespace changes).  A partition is a blackhole route for the
return path inside a blob-server's namespace: its packets to the sos-server
vanish, so connections hang until their timeouts, as across a real broken
network.  A slow link is a tbf qdisc.  Clients run inside the namespaces
(netclient.py) and report JSON.
"""

import json
import os
import subprocess

import pytest

from support import PYTHON, ROOT

from .kit import CONNECT_TIMEOUT, MIN_RATE, RATE_GRACE, require_tool, scaled, stored

NETCLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netclient.py")


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True, capture_output=True, timeout=30)


class Net:
    """Network namespaces and veth links made for one test, removed after."""

    def __init__(self):
        require_tool("ip", "iproute2")
        require_tool("tc", "iproute2")
        self.tag = "%d" % (os.getpid() % 100000)
        self.namespaces = []
        self.links = 0

    def ns(self, name):
        full = "sos%s%s" % (name, self.tag)
        ip("netns", "add", full)
        self.namespaces.append(full)
        ip("-n", full, "link", "set", "lo", "up")
        return full

    def link(self, ns1, addr1, ns2, addr2, rate=None):
        """A veth pair between two namespaces (/24s); rate shapes what ns1
        sends (tbf)."""
        self.links += 1
        a, b = "va%d.%s" % (self.links, self.tag), "vb%d.%s" % (self.links, self.tag)
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        for dev, ns, addr in ((a, ns1, addr1), (b, ns2, addr2)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        if rate:
            subprocess.run(["tc", "-n", ns1, "qdisc", "add", "dev", a, "root", "tbf", "rate", rate,
                            "burst", "32kbit", "latency", "400ms"], check=True,
                           capture_output=True)

    def cut(self, ns, peer):
        ip("-n", ns, "route", "add", "blackhole", peer + "/32")

    def heal(self, ns, peer):
        ip("-n", ns, "route", "del", "blackhole", peer + "/32")

    @staticmethod
    def exec(ns):
        return ["ip", "netns", "exec", ns]

    def run(self, ns, *argv, timeout=600):
        """Run netclient.py inside ns: its JSON answer."""
        proc = subprocess.run(self.exec(ns) + [PYTHON, NETCLIENT] + [str(a) for a in argv],
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def close(self):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def net(procs):
    n = Net()
    yield n
    procs.stop_all()
    n.close()


def test_a_partitioned_group_is_routed_around_without_hanging_and_heals(
        procs, net, figures, rng):
    S, X, Y = net.ns("S"), net.ns("X"), net.ns("Y")
    net.link(S, "10.77.1.1", X, "10.77.1.2")
    net.link(S, "10.77.2.1", Y, "10.77.2.2")
    groups = {
        "g1": [procs.blob("g1-%d" % i, host="10.77.1.2", prefix=net.exec(X), probe=False)
               for i in range(2)],
        "g2": [procs.blob("g2-%d" % i, host="10.77.2.2", prefix=net.exec(Y), probe=False)
               for i in range(2)],
    }
    sos = procs.sos(list(groups.items()), "--timeout", "3", prefix=net.exec(S))
    before = net.run(S, "uploads", sos.up, 20, rng.randrange(2 ** 32), 30)
    assert [r[0] for r in before] == [200] * 20

    net.cut(X, "10.77.1.1")          # g1 can no longer answer the sos-server
    n = scaled(300)
    during = net.run(S, "uploads", sos.up, n, rng.randrange(2 ** 32), 30)
    net.heal(X, "10.77.1.1")

    seconds = sorted(r[1] for r in during)
    p99 = seconds[max(0, int(len(seconds) * 0.99) - 1)]
    failed = [r for r in during if r[0] != 200]
    hung = [r for r in during if r[1] >= 30]
    rep = subprocess.run(net.exec(S) + [PYTHON, os.path.join(ROOT, "replicate.py"),
                                        "--config", sos.config],
                         capture_output=True, text=True, timeout=600)
    unsynced = 0
    for members in groups.values():
        ids = [set(stored(m.store)) for m in members]
        unsynced += sum(len(set().union(*ids) - s) for s in ids)
    acknowledged = [r[2] for r in before + during if r[0] == 200]
    lost = net.run(S, "check", sos.down, *acknowledged)
    figures.add(12, n, len(failed) + len(hung) + (p99 > CONNECT_TIMEOUT + 1) + unsynced,
                len(lost), rng.seed_value,
                note="%d/%d uploads during the partition ok, p99 %.2fs, max %.2fs, %d hung"
                % (n - len(failed), n, p99, seconds[-1], len(hung)))
    assert failed == [] and hung == []
    assert p99 <= CONNECT_TIMEOUT + 1.0
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert unsynced == 0 and lost == []


def test_a_slow_link_carries_an_upload_and_a_client_below_the_minimum_rate_is_cut_off(
        procs, net, figures):
    S, C = net.ns("S"), net.ns("C")
    net.link(C, "10.77.3.2", S, "10.77.3.1", rate="1mbit")
    slow_bits = 128000
    net.link(C, "10.77.4.2", S, "10.77.4.1", rate="%dbit" % slow_bits)
    blob = procs.blob("store", prefix=net.exec(S), probe=False)
    sos = procs.sos([("g1", [blob])], "--copies", "1", prefix=net.exec(S), host="0.0.0.0")
    port = sos.ports["upload"]
    size = 1 << 20
    clients = [subprocess.Popen(net.exec(C) + [PYTHON, NETCLIENT, "upload",
                                               "http://%s:%d" % (addr, port), str(size), "120"],
                                stdout=subprocess.PIPE, text=True)
               for addr in ("10.77.3.1", "10.77.4.1")]
    (fast_status, fast_s), (slow_status, slow_s) = [json.loads(c.communicate(timeout=300)[0])
                                                    for c in clients]
    # The server cuts a body off once RATE_GRACE + received / MIN_RATE has
    # passed; receiving at `rate`, that is at RATE_GRACE / (1 - rate/MIN_RATE).
    rate = slow_bits / 8
    deadline = RATE_GRACE / (1 - rate / MIN_RATE)
    cut = slow_status != 200 and slow_s <= deadline + 3
    figures.add(13, 2, (fast_status != 200) + (not cut),
                note="1 MiB over 1mbit: %s in %.1fs; over %dkbit: %s after %.1fs (deadline %.1fs)"
                % (fast_status, fast_s, slow_bits // 1000, slow_status, slow_s, deadline))
    assert fast_status == 200
    assert slow_status != 200 and slow_s <= deadline + 3, (slow_status, slow_s, deadline)
