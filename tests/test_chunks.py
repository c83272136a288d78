"""Large objects as chunks under a manifest: same id as a whole upload,
verified chunk by chunk and whole, ranges that read only their chunks,
failover per chunk, a manifest that is checked before it is followed."""

import http.client
import os
import time

import pytest
from hypothesis import given, settings, strategies as st

import rules
from cluster import Group, placement
from go_original import GoOriginal
from support import (InProcessSos, blob_path, get_json, request, run_replicate,
                     blob_servers, sha1, summary)

CHUNK = 1000


def chunked_cluster(make_cluster, **options):
    return make_cluster([("g1", 2), ("g2", 2), ("g3", 2)], chunk_size=CHUNK, **options)


def test_a_large_upload_is_chunks_under_a_manifest_with_the_whole_id(make_cluster):
    c = chunked_cluster(make_cluster)
    data = os.urandom(5 * CHUNK + 17)
    status, reply = c.upload(data)
    assert status == 200
    assert reply == {"id": sha1(data), "size": len(data), "status": "OK",
                     "copies": 2, "chunks": 6}
    blob_id = reply["id"]
    manifest_holders = c.holders(blob_id)
    assert len(manifest_holders) == 2
    raw = open(blob_path(c.blobs[manifest_holders[0]].store.root, blob_id), "rb").read()
    manifest = rules.Manifest.decode(raw, blob_id)
    assert [n for _, n in manifest.chunks] == [CHUNK] * 5 + [17]
    groups = set()
    for i, (chunk_id, _) in enumerate(manifest.chunks):
        assert chunk_id == "c" + sha1(data[i * CHUNK:(i + 1) * CHUNK])
        where = c.holders(chunk_id)
        assert len(where) == 2
        groups.add(next(g.name for g in c.groups if where[0] in g.members))
    assert len(groups) > 1                          # spread over the groups
    status, headers, body = c.fetch(blob_id)
    assert (status, body) == (200, data)
    assert headers["etag"] == '"%s"' % blob_id and "x-sos-manifest" not in headers
    status, headers, body = c.fetch(blob_id, "HEAD")
    assert (status, headers["content-length"], body) == (200, str(len(data)), b"")
    status, _, body = c.fetch(blob_id, headers={"If-None-Match": '"%s"' % blob_id})
    assert status == 304


def test_sizes_around_the_chunk_boundary(make_cluster):
    c = chunked_cluster(make_cluster)
    for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 7 * CHUNK + 3):
        data = os.urandom(size)
        status, reply = c.upload(data)
        assert status == 200 and reply["id"] == sha1(data)
        assert reply.get("chunks", 0) == (0 if size <= CHUNK else -(-size // CHUNK))
        status, _, body = c.fetch(reply["id"])
        assert (status, body) == (200, data), size


@settings(max_examples=40, deadline=None)
@given(size=st.integers(CHUNK + 1, 6 * CHUNK), data=st.data())
def test_random_ranges_of_a_chunked_object_round_trip(chunked_front, size, data):
    c, stored = chunked_front
    body = stored.setdefault(size, os.urandom(size))
    if not c.fetch(sha1(body), "HEAD")[0] == 200:
        assert c.upload(body)[0] == 200
    first = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(first, size - 1))
    status, headers, got = c.fetch(sha1(body), headers={"Range": "bytes=%d-%d" % (first, last)})
    assert (status, got) == (206, body[first:last + 1])
    assert headers["content-range"] == "bytes %d-%d/%d" % (first, last, size)


@pytest.fixture(scope="module")
def chunked_front(tmp_path_factory):
    with blob_servers(tmp_path_factory.mktemp("chunks")) as start:
        groups = [Group("g%d" % g, [start("g%d-%d" % (g, i)).url for i in range(2)])
                  for g in range(3)]
        front = InProcessSos(groups, chunk_size=CHUNK)
        try:
            yield front, {}
        finally:
            front.stop()


def test_a_bad_chunk_copy_falls_over_and_rot_everywhere_is_never_a_whole_200(
        make_cluster):
    c = chunked_cluster(make_cluster)
    data = os.urandom(4 * CHUNK + 1)
    blob_id = c.upload(data)[1]["id"]
    manifest = read_manifest(c, blob_id)
    chunk_id = manifest.chunks[2][0]
    first, second = c.holders(chunk_id)
    flip(c, first, chunk_id, 10)
    status, _, body = c.fetch(blob_id)
    assert (status, body) == (200, data)               # the other copy
    status, _, body = c.fetch(blob_id, headers={"Range": "bytes=2005-2014"})
    assert (status, body) == (206, data[2005:2015])
    flip(c, second, chunk_id, 10)
    try:
        status, _, body = c.fetch(blob_id)
    except (http.client.HTTPException, OSError):
        pass                                 # cut short: never a complete 200
    else:
        assert status == 503
    assert c.cluster.counters["corrupt"] >= 2


def test_a_corrupt_manifest_is_never_followed(make_cluster):
    c = chunked_cluster(make_cluster)
    data = os.urandom(3 * CHUNK + 5)
    blob_id = c.upload(data)[1]["id"]
    first, second = c.holders(blob_id)
    flip(c, first, blob_id, 60)
    status, _, body = c.fetch(blob_id)
    assert (status, body) == (200, data)               # the good manifest
    flip(c, second, blob_id, 60)
    status, _, body = c.fetch(blob_id)
    assert status == 503 and body != data


def test_a_blob_server_refuses_a_malformed_manifest(blob_server):
    srv = blob_server("m")
    data = os.urandom(2500)
    chunks = [("c" + sha1(data[i:i + CHUNK]), len(data[i:i + CHUNK]))
              for i in range(0, 2500, CHUNK)]
    good = rules.Manifest(sha1(data), 2500, CHUNK, chunks).encode()
    url = "%s/blob/%s" % (srv.url, sha1(data))
    for body, size, why in ((good.replace(b"2500", b"2501", 1), "2500", "check"),
                            (b"not json", "2500", "not a manifest"),
                            (good, "2501", "X-Sos-Manifest")):
        status, reply = get_json(url, "POST", body, {"X-Sos-Manifest": size})
        assert status == 400 and why in reply["error"], why
    status, reply = get_json("%s/blob/%s" % (srv.url, sha1(b"other")), "POST", good,
                             {"X-Sos-Manifest": "2500"})
    assert status == 400 and "stored under" in reply["error"]
    assert get_json(url, "POST", good, {"X-Sos-Manifest": "2500"})[0] == 200
    status, headers, body = request(url)
    assert (status, body, headers["x-sos-manifest"]) == (200, good, "2500")
    assert get_json("%s/verify/%s" % (srv.url, sha1(data)), "POST", b"")[1][
        "quarantined"] is False
    status, listing = get_json(srv.url + "/blobs?manifests=1")
    assert status == 200 and [i for i, _ in listing] == [sha1(data)]


def read_manifest(c, blob_id):
    url = c.holders(blob_id)[0]
    return rules.Manifest.decode(open(blob_path(c.blobs[url].store.root, blob_id),
                                      "rb").read(), blob_id)


def flip(c, url, blob_id, offset):
    path = blob_path(c.blobs[url].store.root, blob_id)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# --- Collection (replicate --gc-grace) -----------------------------------------------

def config_of(c, tmp_path):
    path = tmp_path / "sos.conf"
    path.write_text("".join("[%s]\n%s" % (g.name, "".join("-: %s\n" % m for m in g.members))
                            for g in c.groups))
    return str(path)


def gc_line(out):
    return next(line for line in out.splitlines() if line.startswith("gc:"))


def test_deleted_objects_chunks_are_collected_and_shared_ones_kept(
        make_cluster, tmp_path, capsys):
    c = chunked_cluster(make_cluster, delete_token="t")
    shared = os.urandom(CHUNK)
    a, b = shared + os.urandom(CHUNK + 1), shared + os.urandom(CHUNK + 2)
    ida, idb = c.upload(a)[1]["id"], c.upload(b)[1]["id"]
    chunks_a = [i for i, _ in read_manifest(c, ida).chunks]
    assert chunks_a[0] == "c" + sha1(shared)
    assert c.delete(ida)[0] == 200
    conf = config_of(c, tmp_path)
    rc, _, out = run_replicate(capsys, "--config", conf)      # grace: 1 day
    assert rc == 0 and "0 collected" in gc_line(out)
    assert all(c.holders(i) for i in chunks_a)
    rc, _, out = run_replicate(capsys, "--config", conf, "--gc-grace", "0s")
    assert rc == 0, out
    assert gc_line(out).startswith("gc: 1 manifests, 3 chunks referenced, 4 collected")
    assert c.holders(chunks_a[0]) and not any(c.holders(i) for i in chunks_a[1:])
    assert c.fetch(idb)[:3:2] == (200, b) and c.fetch(ida)[0] == 404


def test_chunks_of_an_upload_that_died_are_collected_after_the_grace(
        make_cluster, tmp_path, capsys):
    c = chunked_cluster(make_cluster)
    orphan = os.urandom(CHUNK)
    chunk_id = "c" + sha1(orphan)
    old = time.time_ns() - 7200 * 10 ** 9
    for url in c.groups[0].members:          # as if sent, then the upload died
        assert get_json("%s/blob/%s" % (url, chunk_id), "POST", orphan,
                        {"X-Sos-Timestamp": str(old)})[0] == 200
    conf = config_of(c, tmp_path)
    rc, _, out = run_replicate(capsys, "--config", conf, "--gc-grace", "3h")
    assert rc == 0 and c.holders(chunk_id)
    # An upload re-uses the chunk before the collection: it is referenced.
    reuse = orphan + os.urandom(10)
    assert c.upload(reuse)[0] == 200
    rc, _, out = run_replicate(capsys, "--config", conf, "--gc-grace", "1h")
    assert rc == 0 and c.holders(chunk_id) and "0 collected" in gc_line(out)
    status, _, body = c.fetch(sha1(reuse))
    assert (status, body) == (200, reuse)


def test_a_manifest_whose_chunk_is_gone_everywhere_is_reported(make_cluster, tmp_path,
                                                               capsys):
    c = chunked_cluster(make_cluster)
    data = os.urandom(2 * CHUNK + 3)
    blob_id = c.upload(data)[1]["id"]
    lost = read_manifest(c, blob_id).chunks[1][0]
    for url in c.holders(lost):
        os.unlink(blob_path(c.blobs[url].store.root, lost))
    rc, _, out = run_replicate(capsys, "--config", config_of(c, tmp_path))
    assert rc == 1 and "1 MISSING" in gc_line(out)
    status = None
    try:
        status, _, body = c.fetch(blob_id)
    except (http.client.HTTPException, OSError):
        pass
    assert status in (None, 503)


def test_a_cluster_with_a_go_original_stores_large_uploads_whole(blob_server):
    """The original would keep a manifest unchecked and can't list one: with
    it among the members, chunking is off and uploads are stored whole."""
    go = GoOriginal()
    front = InProcessSos([Group("mixed", [blob_server("ours").url, go.url])],
                         chunk_size=CHUNK)
    try:
        data = os.urandom(3 * CHUNK)
        status, reply = front.upload(data)
        assert status == 200 and "chunks" not in reply
        assert go.blobs[sha1(data)][0] == data
        assert front.fetch(sha1(data))[:3:2] == (200, data)
    finally:
        front.stop()
        go.stop()


def test_scrub_and_rebalance_treat_chunks_and_manifests_as_what_they_are(
        make_cluster, tmp_path, capsys):
    c = make_cluster([("g1", 2)], chunk_size=CHUNK)
    data = os.urandom(4 * CHUNK + 9)
    blob_id = c.upload(data)[1]["id"]
    chunk_id = read_manifest(c, blob_id).chunks[1][0]
    flip(c, c.holders(chunk_id)[0], chunk_id, 3)        # a rotten chunk copy
    conf = config_of(c, tmp_path)
    rc, _, out = run_replicate(capsys, "--config", conf, "--scrub")
    assert rc == 0 and "quarantined by scrub: 1" in out, out
    assert len(c.holders(chunk_id)) == 2                 # restored, verified
    # A new group: the manifest and chunks move where they belong, and the
    # object reads back whole through a sos-server that knows both groups.
    extra = [make_cluster([("g2", 2)]).blobs]
    g2 = Group("g2", list(extra[0]))
    groups = c.groups + [g2]
    path = tmp_path / "grown.conf"
    path.write_text("".join("[%s]\n%s" % (g.name, "".join("-: %s\n" % m for m in g.members))
                            for g in groups))
    ids = [blob_id] + [i for i, _ in read_manifest(c, blob_id).chunks]
    rc, _, out = run_replicate(capsys, "--config", str(path), "--rebalance")
    assert rc == 0 and summary(out, "moves")["g1"]["moved_out"] > 0, out
    front = InProcessSos(groups, chunk_size=CHUNK)
    try:
        assert front.fetch(blob_id)[:3:2] == (200, data)
    finally:
        front.stop()
    everyone = {**c.blobs, **extra[0]}
    for i in ids:
        home = placement(i, groups)[0]
        assert {u for u, s in everyone.items() if s.store.exists(i)} == set(home.members)
