"""Delete (issue 14): the API of both servers, last-writer-wins on each
blob-server, tombstones in digests and listings, reclaim, and replicate
completing deletes without ever resurrecting an acknowledged one."""

import os
import time

import pytest

import blob
import process
import sos
from cluster import Group
from go_original import GoOriginal
from support import (InProcessServer, InProcessSos, blob_path, get_json, request,
                     run_replicate, sha1, stop_hard, wait_for)

TOKEN = "s3cret-delete-token"
AUTH = {"Authorization": "Bearer " + TOKEN}
SECOND = 10 ** 9


def deleting_sos(groups, **options):
    """An InProcessSos whose upload port takes deletes with TOKEN."""
    return InProcessSos(groups, delete_token=TOKEN, **options)


def delete_on(url, blob_id, ts=None):
    """DELETE /blob/<id> on a blob-server, at ts (ns) if given."""
    headers = {"X-Sos-Timestamp": str(ts)} if ts is not None else {}
    return get_json(url + "/blob/" + blob_id, "DELETE", headers=headers)


def post_on(url, blob_id, data, ts=None):
    headers = {"X-Sos-Timestamp": str(ts)} if ts is not None else {}
    return get_json(url + "/blob/" + blob_id, "POST", data, headers)


def files(store_root, blob_id):
    """The names in blob_id's leaf directory that belong to it."""
    leaf = os.path.dirname(blob_path(store_root, blob_id))
    if not os.path.isdir(leaf):
        return set()
    return {n for n in os.listdir(leaf) if n.split(".")[0] == blob_id}


def replicate_default(capsys, urls, *args):
    """replicate in-process: (exit code, {column: count} of the default
    group's summary, output)."""
    rc, table, out = run_replicate(capsys, "-blob-server", ",".join(urls), *args)
    return rc, table.get("default"), out


# --- blob-server --------------------------------------------------------------------

def test_delete_leaves_a_tombstone_and_removes_blob_and_sidecar(blob_server):
    srv = blob_server()
    assert get_json(srv.url + "/blob/abc", "POST", b"12345",
                    {"X-Foo": "bar", "X-Sos-Timestamp": str(SECOND)})[0] == 200
    assert files(srv.store.root, "abc") == {"abc", "abc.json"}
    status, reply = delete_on(srv.url, "abc", 5 * SECOND)
    assert (status, reply) == (200, {"id": "abc", "status": "deleted", "removed": 1,
                                     "timestamp": 5 * SECOND})
    assert files(srv.store.root, "abc") == {"abc.deleted"}
    tomb = blob_path(srv.store.root, "abc") + ".deleted"
    assert os.stat(tomb).st_mtime_ns == 5 * SECOND and os.path.getsize(tomb) == 0
    for method in ("GET", "HEAD"):
        status, headers, body = request(srv.url + "/blob/abc", method)
        assert status == 404 and headers["content-type"] == "application/json"
    assert get_json(srv.url + "/stats")[1]["blobs"] == 0
    assert get_json(srv.url + "/stats")[1]["bytes"] == 0
    assert get_json(srv.url + "/stats")[1]["tombstones"] == 1
    # Repeated, and of an id never stored: recorded, nothing removed.
    assert delete_on(srv.url, "abc", 5 * SECOND)[1]["removed"] == 0
    status, reply = delete_on(srv.url, "neverhere")
    assert status == 200 and reply["status"] == "deleted" and reply["removed"] == 0
    assert abs(reply["timestamp"] - time.time_ns()) < 60 * SECOND     # its clock
    assert list(srv.store.ids()) == []


@pytest.mark.parametrize("value", ["soon", "-1", "1.5", "", "99999999999999999999"])
def test_a_bad_timestamp_is_400(blob_server, value):
    srv = blob_server()
    for method, body in (("DELETE", None), ("POST", b"x")):
        status, reply = get_json(srv.url + "/blob/abc", method, body,
                                 {"X-Sos-Timestamp": value})
        assert status == 400 and "X-Sos-Timestamp" in reply["error"]
    assert files(srv.store.root, "abc") == set()


def test_last_writer_wins_on_a_blob_server(blob_server):
    srv = blob_server()
    data = b"last writer wins"
    blob_id = sha1(data)
    assert post_on(srv.url, blob_id, data, 100)[1]["status"] == "OK"
    # An older delete is superseded by the newer blob.
    assert delete_on(srv.url, blob_id, 50)[1] == {
        "id": blob_id, "status": "superseded", "removed": 0, "timestamp": 100}
    status, headers, _ = request(srv.url + "/blob/" + blob_id)
    assert status == 200 and headers["x-sos-timestamp"] == "100"
    # A newer delete wins; an upload older than it is acknowledged, changes nothing.
    assert delete_on(srv.url, blob_id, 200)[1]["removed"] == 1
    assert post_on(srv.url, blob_id, data, 150) == (200, {
        "id": blob_id, "size": len(data), "status": "superseded"})
    assert post_on(srv.url, blob_id, data, 200)[1]["status"] == "superseded"   # tie
    assert request(srv.url + "/blob/" + blob_id)[0] == 404
    # A newer upload brings it back, and the tombstone goes.
    assert post_on(srv.url, blob_id, data, 300)[1]["status"] == "OK"
    status, headers, body = request(srv.url + "/blob/" + blob_id)
    assert (status, body, headers["x-sos-timestamp"]) == (200, data, "300")
    assert files(srv.store.root, blob_id) == {blob_id}
    # A delete as new as the blob wins the tie.
    assert delete_on(srv.url, blob_id, 300)[1]["removed"] == 1
    assert request(srv.url + "/blob/" + blob_id)[0] == 404


@pytest.mark.parametrize("blob_id", [sha1(b"same bytes"), "plainid"])
def test_an_upload_of_an_existing_id_keeps_the_newer_time(blob_server, blob_id):
    srv = blob_server()
    assert post_on(srv.url, blob_id, b"same bytes", 100)[0] == 200
    assert post_on(srv.url, blob_id, b"same bytes", 300)[0] == 200
    assert post_on(srv.url, blob_id, b"same bytes", 200)[0] == 200
    status, headers, body = request(srv.url + "/blob/" + blob_id)
    assert (status, body, headers["x-sos-timestamp"]) == (200, b"same bytes", "300")
    assert delete_on(srv.url, blob_id, 250)[1]["status"] == "superseded"


def test_a_crash_between_tombstone_and_unlink_leaves_the_delete_winning(blob_server):
    srv = blob_server()
    now = time.time_ns()
    assert post_on(srv.url, "torn", b"bytes", now - SECOND)[0] == 200
    path = blob_path(srv.store.root, "torn")
    with open(path + ".deleted", "wb"):
        pass
    os.utime(path + ".deleted", ns=(now, now))      # as a crash mid-delete leaves it
    assert request(srv.url + "/blob/torn")[0] == 404
    assert list(srv.store.entries(tombstones=True)) == [("torn", now, "tombstone")]
    assert get_json(srv.url + "/stats")[1]["blobs"] == 0
    assert srv.store.reclaim(3600) == 0                # settles it, keeps the tombstone
    assert files(srv.store.root, "torn") == {"torn.deleted"}


def test_tombstones_count_in_digests_and_state_listings(blob_server):
    a, b, c = blob_server("a"), blob_server("b"), blob_server("c")
    for srv in (a, b):
        assert post_on(srv.url, "abc", b"x", 10)[0] == 200
        assert post_on(srv.url, "abd", b"y", 10)[0] == 200
    digests = lambda srv: get_json(srv.url + "/digests")[1]
    assert digests(a) == digests(b)
    assert delete_on(b.url, "abc", 20)[0] == 200
    assert delete_on(c.url, "abc", 20)[0] == 200
    assert post_on(c.url, "abd", b"y", 10)[0] == 200
    assert digests(a) != digests(b) == digests(c)        # blob vs tombstone
    assert digests(b)["ab"].startswith("2-")             # ids and tombstones
    assert get_json(b.url + "/blobs")[1] == ["abd"]      # unchanged by default
    assert get_json(b.url + "/blobs?state=1")[1] == [["abc", 20, "tombstone"],
                                                     ["abd", 10, "blob"]]
    assert get_json(b.url + "/blobs?state=1&limit=1")[1] == [["abc", 20, "tombstone"]]
    assert get_json(b.url + "/blobs?state=1&after=abc&prefix=ab")[1] == \
        [["abd", 10, "blob"]]
    stats = get_json(b.url + "/stats")[1]
    assert (stats["blobs"], stats["bytes"], stats["tombstones"]) == (1, 1, 1)
    status, text = request(b.url + "/metrics")[::2]
    assert status == 200 and b"\nsos_blob_tombstones 1\n" in text


def test_reclaim_removes_only_old_tombstones(blob_server):
    srv = blob_server()
    now = time.time_ns()
    assert delete_on(srv.url, "old", now - 100 * SECOND)[0] == 200
    assert delete_on(srv.url, "new", now)[0] == 200
    assert srv.store.reclaim(50) == 1
    assert files(srv.store.root, "old") == set()
    assert files(srv.store.root, "new") == {"new.deleted"}
    assert srv.store.reclaim(50) == 0


@pytest.mark.parametrize("text, seconds", [("7d", 7 * 86400), ("12h", 43200),
                                           ("30m", 1800), ("90s", 90), ("3600", 3600),
                                           ("0.5", 0.5)])
def test_reclaim_age_takes_units(text, seconds):
    assert process.parse_age(text) == seconds


def test_reclaim_age_refuses_nonsense():
    for text in ("", "7w", "d", "-1s"):
        with pytest.raises(ValueError):
            blob.parse_age(text)


def test_a_short_reclaim_age_sweeps_tombstones_in_a_real_server(blob_process):
    proc = blob_process("store", "--reclaim-age", "1s")
    assert post_on(proc.url, "gone", b"bytes")[0] == 200
    assert delete_on(proc.url, "gone")[1]["removed"] == 1
    assert get_json(proc.url + "/stats")[1]["tombstones"] == 1
    wait_for(lambda: get_json(proc.url + "/stats")[1]["tombstones"] == 0,
             timeout=15, interval=0.1, what="the tombstone to be reclaimed")
    assert files(proc.store, "gone") == set()
    assert request(proc.url + "/blob/gone")[0] == 404


# --- sos-server ---------------------------------------------------------------------

def test_deletes_are_off_without_a_delete_token(make_cluster):
    c = make_cluster()
    assert c.upload(b"kept")[0] == 200
    status, reply = get_json(c.up.url + "/fetch/" + sha1(b"kept"), "DELETE",
                             headers=AUTH)
    assert status == 403 and "--delete-token FILE" in reply["error"]
    assert c.fetch(sha1(b"kept"))[0] == 200


def test_delete_needs_the_delete_token_not_the_upload_token(blob_server):
    srv = blob_server()
    groups = [Group("g", [srv.url])]
    front = deleting_sos(groups)
    try:
        front.up.srv.token = "upload-token"
        status, reply = get_json(front.up.url + "/upload", "POST", b"x",
                                 {"Authorization": "Bearer upload-token"})
        assert status == 200
        blob_id = reply["id"]
        status, headers, body = request(front.up.url + "/fetch/" + blob_id, "DELETE")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert b'"error"' in body
        for wrong in ("Bearer upload-token", "Bearer " + TOKEN + "x", TOKEN):
            status, reply = front.delete(blob_id, {"Authorization": wrong})
            assert status == 403 and "error" in reply
        assert front.fetch(blob_id)[0] == 200
        assert front.delete(blob_id) == (200, {"id": blob_id, "status": "deleted",
                                               "removed": 1})
        assert front.delete("Not-An-Id")[0] == 400
    finally:
        front.stop()


def test_the_download_port_refuses_delete_with_405(make_cluster):
    c = make_cluster()
    c.up.srv.delete_token = TOKEN
    status, headers, body = request(c.down.url + "/fetch/" + sha1(b"x"), "DELETE",
                                    headers=AUTH)
    assert status == 405 and headers["allow"] == "GET, HEAD" and b'"error"' in body


def test_delete_removes_every_copy_in_every_group(make_cluster):
    c = make_cluster([("g1", 2), ("g2", 2)])
    c.up.srv.delete_token = TOKEN
    data = os.urandom(5000)
    status, reply = c.upload(data, {"X-Mime-Type": "image/png"})
    assert status == 200 and reply["copies"] == 2
    blob_id = reply["id"]
    # A copy in the other group too (diverted by a failover, say).
    other = next(url for url in c.blobs if url not in c.holders(blob_id))
    c.blobs[other].store.put(blob_id, [data])
    assert len(c.holders(blob_id)) == 3
    status, reply = get_json(c.up.url + "/fetch/" + blob_id, "DELETE", headers=AUTH)
    assert (status, reply) == (200, {"id": blob_id, "status": "deleted", "removed": 3})
    assert c.holders(blob_id) == []
    for srv in c.blobs.values():
        assert files(srv.store.root, blob_id) == {blob_id + ".deleted"}
        stats = get_json(srv.url + "/stats")[1]
        assert (stats["blobs"], stats["bytes"], stats["tombstones"]) == (0, 0, 1)
    for method in ("GET", "HEAD"):
        assert c.fetch(blob_id, method)[0] == 404
    # Idempotent; and the same bytes uploaded again are stored and served again.
    assert get_json(c.up.url + "/fetch/" + blob_id, "DELETE", headers=AUTH) == \
        (200, {"id": blob_id, "status": "deleted", "removed": 0})
    assert c.upload(data)[1]["copies"] == 2
    status, headers, body = c.fetch(blob_id)
    assert (status, body) == (200, data)
    assert "x-sos-timestamp" not in headers


def test_read_after_delete_through_two_sos_servers(blob_server):
    groups = [Group("g%d" % g, [blob_server("g%d-%d" % (g, i)).url
                                    for i in range(2)]) for g in range(2)]
    one, two = deleting_sos(groups), deleting_sos(groups)
    try:
        ids = [one.upload(b"object %d" % i)[1]["id"] for i in range(10)]
        for blob_id in ids:
            assert two.fetch(blob_id)[0] == 200
        for blob_id in ids[:5]:
            assert one.delete(blob_id)[0] == 200
        for front in (one, two):
            assert [front.fetch(i)[0] for i in ids] == [404] * 5 + [200] * 5
            assert [front.fetch(i, "HEAD")[0] for i in ids] == [404] * 5 + [200] * 5
        assert two.upload(b"object 0")[0] == 200
        assert one.fetch(ids[0])[0] == 200
    finally:
        one.stop()
        two.stop()


def test_a_member_down_makes_a_delete_pending_and_none_up_is_503(blob_server):
    a, b = blob_server("a"), blob_server("b")
    front = deleting_sos([Group("g", [a.url, b.url])])
    try:
        blob_id = front.upload(b"pending")[1]["id"]
        stop_hard(b)
        assert front.delete(blob_id) == (202, {"id": blob_id, "status": "pending",
                                               "pending": [b.url]})
        assert not a.store.exists(blob_id)
        stop_hard(a)
        status, reply = front.delete(blob_id)
        assert status == 503 and "error" in reply
        counters = front.cluster.counters
        assert (counters["deletes"], counters["deletes_pending"]) == (0, 1)
    finally:
        front.stop()


def test_the_go_originals_blob_server_has_not_recorded_a_delete(blob_server):
    ours, go = blob_server("ours"), GoOriginal()
    front = deleting_sos([Group("mixed", [ours.url, go.url])])
    try:
        blob_id = front.upload(b"mixed")[1]["id"]
        assert front.delete(blob_id) == (202, {"id": blob_id, "status": "pending",
                                               "pending": [go.url]})
        assert not ours.store.exists(blob_id) and blob_id in go.blobs
    finally:
        front.stop()
        go.stop()


def test_metrics_count_deletes_and_the_status_page_shows_tombstones(blob_server):
    srv = blob_server()
    front = deleting_sos([Group("g", [srv.url])])
    admin = sos.make_admin_server(front.cluster, ("127.0.0.1", 0),
                                  front.up.srv.metrics)
    admin = InProcessServer(admin)
    try:
        assert front.delete(front.upload(b"counted")[1]["id"])[0] == 200
        front.cluster.check_all()
        text = request(admin.url + "/metrics")[2].decode()
        assert 'sos_upstream_events_total{event="deletes"} 1' in text
        assert 'sos_member_tombstones{group="g",member="%s"} 1' % srv.url in text
        page = request(admin.url + "/status")[2].decode()
        assert "<th>tombstones</th>" in page and "<td>1</td>" in page
    finally:
        admin.stop()
        front.stop()


# --- replicate ----------------------------------------------------------------------

def test_replicate_completes_a_delete_a_member_missed(blob_process, capsys):
    a, b = blob_process("a"), blob_process("b")
    front = deleting_sos([Group("g", [a.url, b.url])])
    try:
        ids = [front.upload(b"acked %d" % i)[1]["id"] for i in range(5)]
        b.kill()
        acked = [i for i in ids[:3] if front.delete(i)[0] == 202]
        assert acked == ids[:3]
        b.start()                          # back, with the stale copies
        assert all(files(b.store, i) == {i} for i in acked)
        rc, summary, out = replicate_default(capsys, [a.url, b.url])
        assert rc == 0 and summary["deleted"] == 3
        assert summary["copied"] == 0
        resurrected = [i for i in acked if front.fetch(i)[0] != 404
                       or request(b.url + "/blob/" + i)[0] != 404]
        print("acked deletes resurrected: %d" % len(resurrected))
        assert resurrected == []
        assert [front.fetch(i)[0] for i in ids[3:]] == [200, 200]
        # In sync: the next run finds nothing to do.
        rc, summary, out = replicate_default(capsys, [a.url, b.url])
        assert rc == 0 and summary["examined"] == 0
    finally:
        front.stop()


def test_a_reupload_while_a_member_was_away_survives_replicate(blob_process, capsys):
    a, b = blob_process("a"), blob_process("b")
    front = deleting_sos([Group("g", [a.url, b.url])])
    try:
        data = b"deleted, then uploaded again"
        blob_id = front.upload(data)[1]["id"]
        assert front.delete(blob_id)[0] == 200
        b.kill()
        status, reply = front.upload(data)
        assert status == 200 and reply["copies"] == 1
        b.start()                          # still holds the (older) tombstone
        assert files(b.store, blob_id) == {blob_id + ".deleted"}
        rc, summary, out = replicate_default(capsys, [a.url, b.url])
        assert rc == 0 and summary["copied"] == 1
        assert summary["deleted"] == 0
        lost = [url for url in (a.url, b.url)
                if request(url + "/blob/" + blob_id)[::2] != (200, data)]
        print("acked uploads lost: %d" % len(lost))
        assert lost == [] and files(b.store, blob_id) == {blob_id}
        assert front.fetch(blob_id)[0] == 200
    finally:
        front.stop()


def test_replicate_propagates_tombstones_and_never_copies_onto_a_newer_one(
        blob_server, capsys):
    a, b, c = blob_server("a"), blob_server("b"), blob_server("c")
    assert post_on(a.url, "stale", b"old bytes", 100)[0] == 200     # older blob
    assert delete_on(b.url, "stale", 200)[0] == 200                 # newer delete
    assert post_on(a.url, "fresh", b"new bytes", 300)[0] == 200     # newer blob
    assert delete_on(c.url, "fresh", 250)[0] == 200                 # older delete
    rc, summary, out = replicate_default(capsys, [a.url, b.url, c.url], "--dry-run")
    assert rc == 0
    assert "would delete stale on %s" % a.url in out
    assert "would delete stale on %s" % c.url in out
    assert "would copy fresh %s -> %s" % (a.url, b.url) in out
    assert "would copy fresh %s -> %s" % (a.url, c.url) in out
    assert a.store.exists("stale") and not c.store.exists("fresh")  # dry run
    rc, summary, out = replicate_default(capsys, [a.url, b.url, c.url])
    assert rc == 0 and summary["deleted"] == 2 and summary["copied"] == 2
    for srv in (a, b, c):
        assert list(srv.store.entries(tombstones=True)) == [
            ("fresh", 300, "blob"), ("stale", 200, "tombstone")]
    assert len({str(get_json(s.url + "/digests")[1]) for s in (a, b, c)}) == 1


def test_replicate_treats_the_go_originals_listing_as_blobs(blob_server, capsys):
    ours, go = blob_server("ours"), GoOriginal()
    try:
        assert post_on(go.url, "fromgo", b"go bytes")[0] == 200
        assert delete_on(ours.url, "gone", 100)[0] == 200
        assert post_on(go.url, "gone", b"stale on go")[0] == 200
        rc, summary, out = replicate_default(capsys, [ours.url, go.url])
        # The original can't take the delete (failed, exit 1): README says
        # not to mix it with deletes.  Its blob is never copied over ours.
        assert rc == 1 and summary["failed"] == 1
        assert ours.store.exists("fromgo") and not ours.store.exists("gone")
    finally:
        go.stop()
