"""The cluster changes shape: replicate --rebalance moves blobs and
tombstones into their placement group, a weight-0 group drains, a move
removes only the version it copied, and the tombstone rules that moves rely
on (no write from the future, no reclaim bounce, no older copy served after
a delete)."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import cluster
import sos
from cluster import Group, placement
from support import (InProcessServer, InProcessSos, get_json, request, run_replicate, sha1,
                     summary)

NS = 10 ** 9


def rebalance(capsys, *argv):
    """replicate.main in-process: (exit code, {group: moves row}, output)."""
    rc, _, out = run_replicate(capsys, *argv)
    return rc, summary(out, "moves"), out


def config(tmp_path, groups):
    """A configuration file naming groups (Group objects); its path."""
    path = tmp_path / "sos.conf"
    path.write_text("".join("[%s]\nweight = %g\n%s" % (g.name, g.weight, "".join(
        "-: %s\n" % m for m in g.members)) for g in groups))
    return str(path)


def post(url, blob_id, data, ts=None):
    headers = {"X-Sos-Timestamp": str(ts)} if ts is not None else {}
    return get_json("%s/blob/%s" % (url, blob_id), "POST", data, headers)


def delete(url, blob_id, ts=None, query=""):
    headers = {"X-Sos-Timestamp": str(ts)} if ts is not None else {}
    return get_json("%s/blob/%s%s" % (url, blob_id, query), "DELETE", None, headers)


def states(srv):
    """{id: (timestamp, kind)} of a blob-server's store."""
    return {i: (ts, kind) for i, ts, kind in srv.store.entries(tombstones=True)}


@pytest.fixture
def shape(blob_server, tmp_path):
    """Factory: groups of in-process blob-servers: shape({"g1": 2, ...})."""
    def make(layout, weights=None):
        groups = []
        for name, size in layout.items():
            members = [blob_server("%s-%d" % (name, i)) for i in range(size)]
            g = Group(name, [m.url for m in members], (weights or {}).get(name, 1.0))
            g.servers = members
            groups.append(g)
        return groups
    return make


def where(groups, blob_id):
    """The names of the groups with a member holding blob_id's blob or tombstone."""
    return {g.name for g in groups for s in g.servers if blob_id in states(s)}


def test_adding_groups_moves_every_misplaced_blob_and_tombstone(shape, tmp_path, capsys):
    g1, g2, g3 = groups = shape({"g1": 2, "g2": 2, "g3": 2})
    blobs, deleted = {}, set()
    for n in range(60):
        data = b"blob %d" % n
        blob_id = sha1(data)
        for s in g1.servers:
            assert post(s.url, blob_id, data, 1000 * NS + n)[0] == 200
        blobs[blob_id] = data
    for blob_id in list(blobs)[:10]:          # deleted before the groups came
        for s in g1.servers:
            assert delete(s.url, blob_id)[0] == 200
        deleted.add(blob_id)
    misplaced = [i for i in blobs if placement(i, groups)[0] is not g1]
    assert 20 < len(misplaced) < 60

    rc, moves, out = rebalance(capsys, "--config", config(tmp_path, groups), "--rebalance")
    assert rc == 0, out
    assert moves["g1"]["moved_out"] == len(misplaced)
    assert moves["g2"]["moved_in"] + moves["g3"]["moved_in"] == len(misplaced)
    assert moves["g1"]["left"] == 0 and moves["g1"]["failed"] == 0
    for blob_id in blobs:
        home = placement(blob_id, groups)[0]
        assert where(groups, blob_id) == {home.name}, blob_id
        for s in home.servers:                 # both copies, timestamps kept
            ts, kind = states(s)[blob_id]
            assert kind == ("tombstone" if blob_id in deleted else "blob")
            if blob_id not in deleted:
                assert ts == 1000 * NS + list(blobs).index(blob_id)
    front = InProcessSos(groups)
    try:
        for blob_id, data in blobs.items():
            status, _, body = front.fetch(blob_id)
            assert (status, body) == ((404, body) if blob_id in deleted else (200, data))
    finally:
        front.stop()
    rc, moves, _ = rebalance(capsys, "--config", config(tmp_path, groups), "--rebalance")
    assert rc == 0 and sum(m["moved_out"] for m in moves.values()) == 0


def test_dry_run_says_what_it_would_move_and_moves_nothing(shape, tmp_path, capsys):
    g1, g2 = groups = shape({"g1": 1, "g2": 1})
    ids = []
    for n in range(20):
        blob_id = sha1(b"%d" % n)
        assert post(g1.servers[0].url, blob_id, b"%d" % n)[0] == 200
        ids.append(blob_id)
    before = states(g1.servers[0])
    rc, moves, out = rebalance(capsys, "--config", config(tmp_path, groups), "--rebalance",
                         "--dry-run")
    would = [i for i in ids if placement(i, groups)[0] is g2]
    assert rc == 0 and sorted(out.count("would move %s" % i) for i in would) == [1] * len(would)
    assert states(g1.servers[0]) == before and states(g2.servers[0]) == {}


def test_a_draining_group_takes_no_uploads_and_empties(shape, tmp_path, capsys):
    old, new = groups = shape({"old": 2, "new": 2}, weights={"old": 0})
    for n in range(30):
        data = b"old %d" % n
        for s in old.servers:
            assert post(s.url, sha1(data), data)[0] == 200
    front = InProcessSos(groups)
    try:
        fresh = [front.upload(b"new %d" % n)[1]["id"] for n in range(20)]
        assert all(where(groups, i) == {"new"} for i in fresh)
        # Before the move, fetch finds the old blobs (asking "old" last).
        status, _, body = front.fetch(sha1(b"old 7"))
        assert (status, body) == (200, b"old 7")
    finally:
        front.stop()
    rc, moves, out = rebalance(capsys, "--config", config(tmp_path, groups), "--rebalance")
    assert rc == 0, out
    assert moves["old"]["moved_out"] == 30 and "group old is draining: EMPTY" in out
    assert all(states(s) == {} for s in old.servers)
    assert all(where(groups, sha1(b"old %d" % n)) == {"new"} for n in range(30))


def test_a_move_waits_for_every_member_of_its_placement_group(shape, tmp_path, capsys):
    """A placement group member down: nothing leaves the old group; once
    it is back, the next run finishes the move."""
    g1, g2 = groups = shape({"g1": 1, "g2": 2})
    data = {}
    for n in range(200):
        d = b"%d" % n
        if placement(sha1(d), groups)[0] is g2 and len(data) < 10:
            data[sha1(d)] = d
            assert post(g1.servers[0].url, sha1(d), d)[0] == 200
    down = g2.servers[1]
    down.stop()
    rc, moves, out = rebalance(capsys, "--config", config(tmp_path, groups), "--rebalance",
                         "--copies", "2")
    assert rc == 1
    assert moves["g1"]["moved_out"] == 0 and moves["g1"]["failed"] == 10
    assert set(states(g1.servers[0])) == set(data)
    # With --copies 1 the reachable member is enough: the one that is
    # down gets its copies from the group's own sync once back.
    rc, moves, out = rebalance(capsys, "--config", config(tmp_path, groups), "--rebalance",
                         "--copies", "1")
    assert moves["g1"]["moved_out"] == 10 and states(g1.servers[0]) == {}
    assert set(states(g2.servers[0])) == set(data)


def test_a_move_removes_only_the_version_it_copied(blob_server):
    srv = blob_server("m")
    blob_id = sha1(b"x")
    assert post(srv.url, blob_id, b"x", 1000 * NS)[0] == 200
    # A newer upload landed after the copy: kept.
    assert post(srv.url, blob_id, b"x", 2000 * NS)[0] == 200
    assert delete(srv.url, blob_id, query="?moved=%d" % (1000 * NS))[1] == {
        "id": blob_id, "status": "kept", "timestamp": 2000 * NS}
    assert states(srv)[blob_id] == (2000 * NS, "blob")
    assert delete(srv.url, blob_id, query="?moved=%d" % (2000 * NS))[1]["status"] == "removed"
    assert states(srv) == {}                  # and no tombstone left behind
    # A delete newer than the copied blob: kept too.
    assert post(srv.url, blob_id, b"x", 3000 * NS)[0] == 200
    assert delete(srv.url, blob_id, 4000 * NS)[0] == 200
    assert delete(srv.url, blob_id, query="?moved=%d" % (3000 * NS))[1]["status"] == "kept"
    assert states(srv)[blob_id] == (4000 * NS, "tombstone")
    assert delete(srv.url, blob_id, query="?moved=%d" % (4000 * NS))[1]["status"] == "removed"
    assert delete(srv.url, "nothinghere", query="?moved=1")[1]["status"] == "kept"
    status, body = delete(srv.url, blob_id, query="?moved=soon")
    assert status == 400 and "moved=" in body["error"]


def test_a_write_from_the_future_is_refused(blob_server):
    srv = blob_server("m")
    blob_id = sha1(b"y")
    ahead = time.time_ns() + 3600 * NS
    status, body = post(srv.url, blob_id, b"y", ahead)
    assert status == 400 and "ahead of this server's clock" in body["error"]
    status, body = delete(srv.url, blob_id, ahead)
    assert status == 400 and "ahead of this server's clock" in body["error"]
    assert states(srv) == {}
    assert post(srv.url, blob_id, b"y", time.time_ns() + 60 * NS)[0] == 200


def test_a_reclaimed_tombstone_does_not_come_back(blob_server, tmp_path, capsys):
    """Member a reclaimed its tombstone, member b not yet: replicate sends
    it to a, which records none (it is older than a's reclaim age), and
    removes an older blob all the same."""
    a = blob_server("a", reclaim_age=3600)
    b = blob_server("b")
    blob_id = sha1(b"z")
    old = time.time_ns() - 7200 * NS
    assert delete(b.url, blob_id, old)[0] == 200
    rc, _, out = rebalance(capsys, "-blob-server", "%s,%s" % (a.url, b.url))
    assert rc == 0, out
    assert states(a) == {} and states(b)[blob_id] == (old, "tombstone")
    assert post(a.url, blob_id, b"z", old - NS)[0] == 200
    assert delete(a.url, blob_id, old)[1]["status"] == "expired"
    assert states(a) == {}


def test_fetch_serves_no_copy_older_than_a_delete_it_saw(shape):
    """The placement group says deleted (X-Sos-Deleted); another group
    still holds the older blob (a member that was away during the move):
    404, not the old bytes.  A newer copy elsewhere is served."""
    groups = shape({"g1": 1, "g2": 1})
    blob_id = next(i for i in (sha1(b"%d" % n) for n in range(100))
                   if placement(i, groups)[0] is groups[0])
    data = next(b"%d" % n for n in range(100) if sha1(b"%d" % n) == blob_id)
    home, other = groups[0].servers[0], groups[1].servers[0]
    assert delete(home.url, blob_id, 2000 * NS)[0] == 200
    status, headers, _ = request("%s/blob/%s" % (home.url, blob_id))
    assert status == 404 and headers["x-sos-deleted"] == str(2000 * NS)
    assert post(other.url, blob_id, data, 1000 * NS)[0] == 200
    front = InProcessSos(groups)
    try:
        assert front.fetch(blob_id)[0] == 404
        assert post(other.url, blob_id, data, 3000 * NS)[0] == 200
        assert front.fetch(blob_id)[:3:2] == (200, data)
    finally:
        front.stop()


def test_weight_zero_is_draining_and_some_group_must_take_blobs(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[a]\nweight = 0\n-: http://h:1\n[b]\n-: http://h:2\n")
    groups = cluster.load_groups(config=str(path))
    assert [g.weight for g in groups] == [0, 1]
    assert all(placement("%d" % n, groups)[0].name == "b" for n in range(100))
    path.write_text("[a]\nweight = 0\n-: http://h:1\n")
    with pytest.raises(cluster.ConfigError, match="weight 0"):
        cluster.load_groups(config=str(path))
    path.write_text("[a]\nweight = -1\n-: http://h:1\n")
    with pytest.raises(cluster.ConfigError, match="0 or more"):
        cluster.load_groups(config=str(path))


def test_metrics_file_is_prometheus_text_and_keeps_the_last_success(shape, tmp_path,
                                                                     capsys):
    g1, g2 = groups = shape({"g1": 2, "g2": 1})
    for n in range(10):
        for s in g1.servers:
            assert post(s.url, sha1(b"%d" % n), b"%d" % n)[0] == 200
    path = tmp_path / "replicate.prom"
    conf = config(tmp_path, groups)

    def read():
        return {(s.name, s.labels["group"]): s.value for f in
                text_string_to_metric_families(path.read_text()) for s in f.samples}
    start = time.time()
    rc, moves, _ = rebalance(capsys, "--config", conf, "--rebalance", "--copies", "1",
                       "--metrics-file", str(path))
    first = read()
    assert rc == 0 and first[("sos_replicate_moved", "g1")] == moves["g1"]["moved_out"] > 0
    assert first[("sos_replicate_examined", "g1")] >= 0
    assert first[("sos_replicate_failed", "g2")] == 0
    success = first[("sos_replicate_last_success_timestamp_seconds", "g2")]
    assert start <= success <= time.time()
    g2.servers[0].stop()
    rc, _, _ = rebalance(capsys, "--config", conf, "--metrics-file", str(path))
    second = read()
    assert rc == 1 and second[("sos_replicate_unreachable", "g2")] == 1
    assert second[("sos_replicate_last_success_timestamp_seconds", "g2")] == pytest.approx(
        success, abs=0.001)
    assert second[("sos_replicate_last_success_timestamp_seconds", "g1")] > success
    assert not list(tmp_path.glob("*.tmp"))


def test_status_page_shows_each_groups_share_and_the_draining_one(shape):
    old, new = groups = shape({"old": 1, "new": 1}, weights={"old": 0})
    for n in range(3):                       # old: 3 blobs of 10 bytes
        assert post(old.servers[0].url, sha1(b"%010d" % n), b"%010d" % n)[0] == 200
    front = InProcessSos(groups)
    admin = InProcessServer(sos.make_admin_server(front.cluster, ("127.0.0.1", 0)))
    try:
        assert front.upload(b"x" * 30)[0] == 200          # new: 1 blob of 30 bytes
        status, _, page = request(admin.url + "/status")
        page = page.decode()
        assert status == 200
        row = page.split('data-group="old"')[1].split("</tr>")[0]
        assert 'data-draining="yes"' in row and "DRAINING" in row
        assert "<td>0</td><td>0.0%</td><td>75.0%</td><td>50.0%</td>" in row
        row = page.split('data-group="new"')[1].split("</tr>")[0]
        assert 'data-draining="no"' in row
        assert "<td>1</td><td>100.0%</td><td>25.0%</td><td>50.0%</td>" in row
    finally:
        admin.stop()
        front.stop()
