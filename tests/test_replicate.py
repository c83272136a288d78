"""replicate: groups converge, corruption is never spread and is repaired,
memory stays flat, and the digest shortcut agrees with a full comparison."""

import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile

from hypothesis import given, settings, strategies as st

import blobstore
import rules
import replicate
import sos
from cluster import Group
from go_original import GoOriginal
from support import (ROOT, InProcessSos, blob_path, flip_byte, get_json, request,
                     run_replicate, sha1, stop_hard)


def put(srv, data, meta=None):
    """Write a content-addressed blob straight into a server's store."""
    blob_id = sha1(data)
    srv.store.put(blob_id, [data], meta)
    return blob_id


def ids(srv):
    return set(srv.store.ids())


def servers(blob_server, n, prefix="m"):
    return [blob_server("%s%d" % (prefix, i)) for i in range(n)]


def test_three_members_with_different_content_converge(blob_server, capsys):
    a, b, c = servers(blob_server, 3)
    put(a, b"only on a")
    put(b, b"only on b")
    put(c, b"only on c")
    both = put(a, b"on a and b")
    put(b, b"on a and b")
    union = ids(a) | ids(b) | ids(c)
    assert len(union) == 4
    rc, summary, _ = run_replicate(capsys, "-blob-server", ",".join((a.url, b.url, c.url)))
    assert rc == 0
    assert ids(a) == ids(b) == ids(c) == union
    assert summary["default"]["copied"] == 2 + 2 + 2 + 1
    for srv in (a, b, c):
        assert srv.store.verify(both) is True


def test_second_run_copies_nothing(blob_server, capsys):
    a, b, c = servers(blob_server, 3)
    for i in range(30):
        put((a, b, c)[i % 3], b"blob %d" % i)
    urls = ",".join((a.url, b.url, c.url))
    assert run_replicate(capsys, "-blob-server", urls)[:2] == \
        (0, {"default": {"examined": 30, "copied": 60, "deleted": 0, "failed": 0,
                         "unreachable": 0}})
    assert run_replicate(capsys, "-blob-server", urls)[:2] == \
        (0, {"default": {"examined": 0, "copied": 0, "deleted": 0, "failed": 0,
                         "unreachable": 0}})


def test_metadata_is_preserved_on_copies(blob_server, capsys):
    a, b = servers(blob_server, 2)
    blob_id = put(a, b"<b>bold</b>", {"X-Mime-Type": "text/html", "X-Foo": "bar"})
    assert run_replicate(capsys, "-blob-server", a.url + "," + b.url)[0] == 0
    assert b.store.metadata(blob_id) == {"X-Mime-Type": "text/html", "X-Foo": "bar"}
    status, headers, body = request(b.url + "/blob/" + blob_id)
    assert status == 200 and body == b"<b>bold</b>"
    assert headers["content-type"] == "text/html" and headers["x-foo"] == "bar"


def test_member_down_exits_1_and_the_rest_converge(blob_server, capsys):
    a, b, gone = servers(blob_server, 3)
    put(a, b"from a")
    put(b, b"from b")
    stop_hard(gone)
    rc, summary, _ = run_replicate(capsys, "-blob-server", ",".join((a.url, gone.url, b.url)))
    assert rc == 1
    assert summary["default"]["unreachable"] == 1
    assert ids(a) == ids(b) == {sha1(b"from a"), sha1(b"from b")}


def test_scrub_quarantines_a_flipped_byte_and_repairs_it(blob_server, capsys):
    a, b = servers(blob_server, 2)
    data = os.urandom(5000)
    blob_id = put(a, data, {"X-Foo": "kept"})
    put(b, data, {"X-Foo": "kept"})
    put(a, b"a healthy neighbour")
    put(b, b"a healthy neighbour")
    flip_byte(b.store, blob_id, 1234)
    rc, summary, out = run_replicate(capsys, "-blob-server", a.url + "," + b.url,
                           "--scrub", "--scrub-rate", "0")
    assert rc == 0
    assert "quarantined by scrub: 1" in out
    quarantined = os.listdir(os.path.join(b.store.root, blobstore.QUARANTINE_DIR))
    assert any(name.startswith(blob_id + ".") and not name.endswith(".json")
               for name in quarantined)
    assert summary["default"]["copied"] == 1
    with open(blob_path(b.store, blob_id), "rb") as f:
        assert f.read() == data
    assert b.store.metadata(blob_id) == {"X-Foo": "kept"}
    assert a.store.verify(blob_id) is True


def test_corrupt_source_is_never_copied(blob_server, capsys):
    a, b, c = servers(blob_server, 3)
    data = os.urandom(3000)
    blob_id = put(a, data)
    flip_byte(a.store, blob_id, 10)
    good = put(b, b"a good blob")
    rc, summary, out = run_replicate(capsys, "-blob-server", ",".join((a.url, b.url, c.url)))
    assert rc == 1
    assert "corrupt copies refused: 2" in out
    assert not b.store.exists(blob_id) and not c.store.exists(blob_id)
    assert ids(a) == {blob_id, good} and ids(b) == ids(c) == {good}
    assert summary["default"]["failed"] == 2


def test_dry_run_changes_nothing(blob_server, capsys):
    a, b = servers(blob_server, 2)
    x = put(a, b"x")
    y = put(b, b"y")
    rc, _, out = run_replicate(capsys, "-blob-server", a.url + "," + b.url, "--dry-run")
    assert rc in (0, 1)
    assert ids(a) == {x} and ids(b) == {y}
    assert "would copy %s %s -> %s" % (x, a.url, b.url) in out
    assert "would copy %s %s -> %s" % (y, b.url, a.url) in out


# VmHWM, not getrusage: ru_maxrss survives exec, so a child started from a
# big pytest process would report the parent's size.
PEAK_RSS = ("import re, sys; sys.path.insert(0, %r); import replicate; "
            "rc = replicate.main(sys.argv[1:]) if sys.argv[1:] else 0; "
            "print(re.search(r'VmHWM:.*', open('/proc/self/status').read())[0], "
            "file=sys.stderr); sys.exit(rc)" % ROOT)


def peak_rss_kib(*argv):
    """Run replicate in a fresh interpreter: (exit code, its peak RSS in KiB)."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS] + list(argv),
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"^VmHWM:\s+(\d+) kB$", out.stderr, re.M)
    assert m, out.stderr
    return out.returncode, int(m.group(1))


def test_large_blob_is_copied_with_flat_memory(blob_server):
    a, b = servers(blob_server, 2)
    size, piece = 64 << 20, 1 << 20

    def chunks():
        rng = random.Random(64)
        for _ in range(size // piece):
            yield rng.randbytes(piece)
    h = hashlib.sha1()
    for chunk in chunks():
        h.update(chunk)
    blob_id = h.hexdigest()
    a.store.put(blob_id, chunks())
    _, baseline = peak_rss_kib()
    rc, peak = peak_rss_kib("-blob-server", a.url + "," + b.url)
    assert rc == 0
    assert b.store.verify(blob_id) is True
    # Buffering the blob would cost at least 64 MiB; streaming, a few.
    assert peak - baseline < 32 * 1024, (baseline, peak)


# Short ids (one letter pads to bucket "a-") and a small alphabet, so that
# buckets are often shared and differ by a single id.
IDS = st.text(alphabet="ab0", min_size=1, max_size=5)


def test_digest_shortcut_agrees_with_a_full_comparison(blob_server):
    a, b = servers(blob_server, 2)
    rep = replicate.Replicator(sos.Pool(connect_timeout=1, timeout=10), jobs=2)

    @settings(max_examples=40, deadline=None)
    @given(common=st.sets(IDS, max_size=10), only_a=st.sets(IDS, max_size=6),
           only_b=st.sets(IDS, max_size=6))
    def check(common, only_a, only_b):
        with tempfile.TemporaryDirectory() as tmp:
            for srv, name in ((a, "a"), (b, "b")):
                srv.store = srv.srv.store = blobstore.BlobStore(os.path.join(tmp, name))
            want_a, want_b = common | only_a, common | only_b
            for srv, want in ((a, want_a), (b, want_b)):
                for blob_id in want:
                    srv.store.put(blob_id, [b"body of " + blob_id.encode()])
            members, differ, errors = rep.plan([a.url, b.url])
            assert members == [a.url, b.url] and not errors
            assert set(differ) == {rules.shard(i)[0]
                                   for i in want_a ^ want_b}
            summary = rep.sync(Group("g", [a.url, b.url]))
            assert summary["copied"] == len(want_a ^ want_b)
            assert ids(a) == ids(b) == want_a | want_b
            assert rep.plan([a.url, b.url])[1] == []
            for srv in (a, b):
                srv.store.close()
    stores = a.store, b.store
    try:
        check()
    finally:
        for srv, store in zip((a, b), stores):
            srv.store = srv.srv.store = store


def test_a_differing_bucket_is_listed_by_its_differing_leaves_or_whole(blob_server):
    a, b = servers(blob_server, 2)
    rep = replicate.Replicator(sos.Pool(connect_timeout=1, timeout=10), jobs=2)
    for blob_id in ("aa11", "aa22", "aa33x", "aa33y"):
        for srv in (a, b):
            srv.store.put(blob_id, [b"x"])
    a.store.put("aa44", [b"only on a"])
    b.store.put("aa33z", [b"only on b"])
    assert rep.narrow([a.url, b.url], "aa") == ("aa33", "aa44")
    actions = list(rep.differences([a.url, b.url], ["aa"]))
    assert [x[:3] for x in actions] == [("aa33z", "copy", a.url), ("aa44", "copy", b.url)]
    # Every leaf agrees by now (a write landed between the asks): nothing listed.
    assert rep.narrow([a.url, a.url], "aa") == ()
    assert list(rep.differences([a.url, a.url], ["aa"])) == []
    for i in range(replicate.NARROW_MAX + 1):
        a.store.put("ab%02x" % i, [b"x"])
    assert rep.narrow([a.url, b.url], "ab") == ("ab",)


def write_config(tmp_path, groups):
    text = "".join("[%s]\n%s" % (name, "".join("-: %s\n" % s.url for s in members))
                   for name, members in groups)
    path = tmp_path / "sos.conf"
    path.write_text(text)
    return str(path)


def test_group_flag_syncs_only_that_group(blob_server, tmp_path, capsys):
    a, b, c, d = servers(blob_server, 4)
    for srv in (a, b, c, d):
        put(srv, b"on " + srv.url.encode())
    config = write_config(tmp_path, [("g1", (a, b)), ("g2", (c, d))])
    rc, summary, _ = run_replicate(capsys, "--config", config, "--group", "g1")
    assert rc == 0 and list(summary) == ["g1"]
    assert ids(a) == ids(b) and len(ids(a)) == 2
    assert len(ids(c)) == len(ids(d)) == 1


def test_groups_never_copy_across(blob_server, tmp_path, capsys):
    a, b, c, d = servers(blob_server, 4)
    for srv in (a, b, c, d):
        put(srv, b"on " + srv.url.encode())
    config = write_config(tmp_path, [("g1", (a, b)), ("g2", (c, d))])
    rc, summary, _ = run_replicate(capsys, "--config", config)
    assert rc == 0 and summary["g1"]["copied"] == summary["g2"]["copied"] == 2
    g1 = {sha1(b"on " + a.url.encode()), sha1(b"on " + b.url.encode())}
    g2 = {sha1(b"on " + c.url.encode()), sha1(b"on " + d.url.encode())}
    assert ids(a) == ids(b) == g1 and ids(c) == ids(d) == g2


def test_unknown_group_or_bad_config_exits_2(blob_server, tmp_path, capsys):
    a, b = servers(blob_server, 2)
    config = write_config(tmp_path, [("g1", (a, b))])
    rc = None
    try:
        run_replicate(capsys, "--config", config, "--group", "nope")
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    bad = tmp_path / "bad.conf"
    bad.write_text("[g1]\n-: not a url\n")
    try:
        run_replicate(capsys, "--config", str(bad))
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and "%s:2" % bad in capsys.readouterr().err


# --- Mixed clusters: blob-servers of the Go original -----------------------------------

def test_replicate_falls_back_to_full_listings_against_the_original(blob_server, capsys):
    ours = blob_server("ours")
    go = GoOriginal()
    try:
        mine = {put(ours, b"ours %d" % i, {"X-Foo": "o%d" % i}) for i in range(5)}
        theirs = set()
        for i in range(5):
            data = b"theirs %d " % i + os.urandom(3000 * (i % 2))   # some chunked
            go.blobs[sha1(data)] = (data, {"X-Mime-Type": "text/plain"})
            theirs.add(sha1(data))
        urls = ours.url + "," + go.url
        rc, summary, _ = run_replicate(capsys, "-blob-server", urls)
        assert rc == 0 and summary["default"]["copied"] == 10
        assert ids(ours) == set(go.blobs) == mine | theirs
        assert any(r.startswith("GET /blobs") for r in go.requests)
        for blob_id in theirs:
            assert ours.store.verify(blob_id) is True
            assert ours.store.metadata(blob_id) == {"X-Mime-Type": "text/plain"}
        for blob_id in mine:
            data = go.blobs[blob_id][0]
            assert sha1(data) == blob_id and go.blobs[blob_id][1]["X-Foo"]
        rc, summary, _ = run_replicate(capsys, "-blob-server", urls)
        assert rc == 0 and summary["default"]["copied"] == 0
    finally:
        go.stop()


def test_sos_server_uploads_to_and_fetches_from_the_original(blob_server):
    ours = blob_server("ours")
    go = GoOriginal()
    front = InProcessSos([Group("mixed", [ours.url, go.url])])
    try:
        data = os.urandom(10000)             # the original sends it chunked
        status, reply = front.upload(data, {"X-Mime-Type": "image/png"})
        assert status == 200 and reply["copies"] == 2
        # The original stores every X-* header, the upload's time too; our
        # fetch never passes X-Sos-* on (below).
        assert go.blobs[reply["id"]][0] == data
        assert go.blobs[reply["id"]][1].keys() == {"X-Mime-Type", "X-Sos-Timestamp"}
        assert ours.store.exists(reply["id"])
        stop_hard(ours)                       # only the original can answer now
        status, headers, body = front.fetch(reply["id"])
        assert status == 200 and body == data
        assert headers["content-type"] == "image/png"
        assert "x-sos-timestamp" not in headers
        status, _, body = front.fetch(sha1(b"absent"))
        assert status == 503                  # ours could not be asked
        assert get_json(front.up.url + "/upload", "POST", b"small")[0] == 200
        assert sha1(b"small") in go.blobs
    finally:
        front.stop()
        go.stop()
