"""The fetch boundary: Cluster.fetch hands sos-server a Blob (size, ETag,
metadata, read(offset, count)), and sos-server alone turns it into a reply;
and the HTTP server's error mapping, which every program shares."""

import logging
import os

import pytest

import httpd
import rules
import sos
from cluster import Group
from support import (InProcessServer, InProcessSos, blob_path, canned_server, get_json,
                     request, sha1)


def first_asked(c, blob_id):
    """The member a fetch of blob_id asks first (all are healthy)."""
    group, members = c.cluster.order(blob_id)[0]
    return c.blobs[members[0]]


def test_a_range_of_a_small_blob_is_cut_from_verified_bytes(make_cluster):
    c = make_cluster([("g1", 2)])
    data = os.urandom(1000)
    blob_id = c.upload(data)[1]["id"]
    bad = first_asked(c, blob_id)
    path = blob_path(bad.store.root, blob_id)
    with open(path, "r+b") as f:          # rot the bytes the range covers
        f.seek(15)
        f.write(bytes(b ^ 0xFF for b in data[15:16]))
    status, headers, body = c.fetch(blob_id, headers={"Range": "bytes=10-19"})
    assert status == 206
    assert body == data[10:20]
    assert headers["content-range"] == "bytes 10-19/1000"
    assert c.cluster.counters["corrupt"] == 1


def test_ranges_of_a_large_blob_are_asked_of_the_member(make_cluster):
    c = make_cluster([("g1", 2)], verify_limit=4096)
    data = os.urandom(100_000)
    blob_id = c.upload(data)[1]["id"]
    for rng, want, content_range in (
            ("bytes=50000-50099", data[50000:50100], "bytes 50000-50099/100000"),
            ("bytes=-7", data[-7:], "bytes 99993-99999/100000"),
            ("bytes=99999-", data[-1:], "bytes 99999-99999/100000")):
        status, headers, body = c.fetch(blob_id, headers={"Range": rng})
        assert (status, body, headers["content-range"]) == (206, want, content_range)
    status, headers, body = c.fetch(blob_id, headers={"Range": "bytes=100000-"})
    assert status == 416 and headers["content-range"] == "bytes */100000"
    status, headers, body = c.fetch(blob_id)
    assert status == 200 and body == data
    status, headers, body = c.fetch(blob_id, "HEAD")
    assert (status, headers["content-length"], body) == (200, "100000", b"")


def test_cluster_fetch_hands_over_a_blob_that_reads_its_own_ranges(make_cluster):
    """The boundary itself: size, ETag and read(offset, count), no HTTP."""
    c = make_cluster([("g1", 2)])
    blob_id = c.upload(b"sized")[1]["id"]
    status, _, body = c.fetch(blob_id)
    assert (status, body) == (200, b"sized")
    blob = c.cluster.fetch(blob_id)
    with blob:
        assert (blob.size, blob.etag, b"".join(blob.read(1, 3))) == (5, blob_id, b"ize")


@pytest.mark.parametrize("header", [b"X-Sos-Manifest: \xb2", b"X-Sos-Manifest: 12x"])
def test_a_manifest_size_that_is_no_number_is_a_bad_copy_not_a_500(header):
    """A blob-server whose reply says it holds a manifest of "²" bytes
    ("²".isdigit() is true, int("²") fails): a bad copy, so 503 when it is
    the only one, never a 500 or a crash."""
    blob_id = sha1(b"x")
    reply = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\n"
             b"Connection: close\r\n\r\n{}" % header)
    with canned_server(reply) as port:
        front = InProcessSos([Group("g", ["http://127.0.0.1:%d" % port])])
        try:
            status, body = get_json(front.down.url + "/fetch/" + blob_id)
        finally:
            front.stop()
    assert status == 503 and "could not ask" in body["error"]


def test_timestamps_and_sizes_are_ascii_digits_only():
    assert [rules.number(t) for t in ("0", "123", "\xb2", "12x", "", None, "9" * 20,
                                     str(1 << 63), str((1 << 63) - 1))] == [
        0, 123, None, None, None, None, None, None, (1 << 63) - 1]


class Failing(httpd.Handler):
    """A handler whose routes fail as a program's might."""

    class Gone(rules.Missing):
        """A subclass of a mapped exception."""

    routes = {("GET", "gone"): "do_gone", ("GET", "boom"): "do_boom"}

    def do_gone(self):
        raise self.Gone("gone")

    def do_boom(self):
        raise RuntimeError("boom in a handler")


def test_exceptions_map_to_statuses_along_the_class_hierarchy():
    srv = InProcessServer(httpd.Server(("127.0.0.1", 0), Failing, "test",
                                       sos.Metrics("test")))
    try:
        status, body = get_json(srv.url + "/gone")
        assert (status, body) == (404, {"error": "not found"})
    finally:
        srv.stop()


def test_every_500_reaches_the_status_pages_recent_errors(make_cluster):
    """The handler's 500s log on the "httpd" logger; the status page listens
    on the root logger, as sos-server's main sets it up."""
    c = make_cluster([("g1", 1)])
    errors = sos.watch_errors()
    srv = InProcessServer(httpd.Server(("127.0.0.1", 0), Failing, "test",
                                       sos.Metrics("test")))
    admin = InProcessServer(sos.make_admin_server(c.cluster, ("127.0.0.1", 0),
                                                  recent_errors=errors.lines))
    try:
        status, body = get_json(srv.url + "/boom")
        assert (status, body) == (500, {"error": "Internal Server Error"})
        status, _, page = request(admin.url + "/status")
        assert status == 200 and b"error on GET /boom" in page
    finally:
        logging.getLogger().removeHandler(errors)
        srv.stop()
        admin.stop()
