"""Row 19: many writers at once.

Distinct uploads from many threads through a real sos-server all land
(0 errors, every one fetchable), and a crowd uploading the same body with
different X-* headers leaves one coherent blob whose metadata comes from
exactly one of them, and no temp file.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from support import request, sha1

from .kit import scaled


def test_distinct_uploads_from_many_threads_all_land(procs, figures, rng):
    c = procs.cluster()
    n, threads = scaled(1000), min(64, scaled(64))
    bodies = [rng.randbytes(rng.choice((0, 100, 10000, 200000))) + b"%d" % i for i in range(n)]

    def upload(body):
        try:
            status, reply = c.sos.upload(body)
            return status == 200 and reply["id"] == sha1(body)
        except OSError:
            return False
    with ThreadPoolExecutor(threads) as pool:
        ok = list(pool.map(upload, bodies))
    missing = [b for b in bodies if c.sos.fetch(sha1(b))[2] != b]
    temps = [f for m in c.members for f in m.tmp_files()]
    figures.add(19, n, ok.count(False) + len(missing) + len(temps), seed=rng.seed_value,
                note="%d uploads from %d threads" % (n, threads))
    assert all(ok) and missing == [] and temps == []


def test_one_body_uploaded_by_a_crowd_keeps_one_writers_metadata(procs, figures, rng):
    blob = procs.blob()
    n = scaled(100)
    body = rng.randbytes(100000)
    blob_id = sha1(body)
    start = threading.Barrier(n)

    def upload(i):
        # Two headers that must stay together: a mix would show.
        headers = {"X-Writer": str(i), "X-Check": sha1(b"%d" % i), "Content-Length": str(len(body))}
        start.wait()
        return blob.post(blob_id, body, headers)[0]
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(upload, range(n)))
    status, headers, data = request(blob.url + "/blob/" + blob_id)
    writer = headers.get("x-writer", "")
    coherent = (data == body and writer.isdigit()
                and headers.get("x-check") == sha1(writer.encode()))
    files = sorted(os.listdir(os.path.dirname(blob.path(blob_id))))
    bad = (n - statuses.count(200) + (not coherent) + (files != [blob_id, blob_id + ".json"])
           + len(blob.tmp_files()))
    figures.add(19, n, bad, seed=rng.seed_value,
                note="%d concurrent uploads of one body: metadata of writer %s" % (n, writer))
    assert statuses == [200] * n
    assert coherent, headers
    assert files == [blob_id, blob_id + ".json"]
    assert blob.tmp_files() == []


def test_one_body_uploaded_by_a_crowd_through_sos_is_coherent_on_every_member(
        procs, figures, rng):
    c = procs.cluster((("g1", 2),))
    n = scaled(50)
    body = rng.randbytes(5000)
    blob_id = sha1(body)
    start = threading.Barrier(n)

    def upload(i):
        start.wait()
        return c.sos.upload(body, {"X-Writer": str(i), "X-Check": sha1(b"%d" % i)})[0]
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(upload, range(n)))
    writers = []
    bad = [s for s in statuses if s != 200]
    for m in c.members:
        status, headers, data = m.get(blob_id)
        w = headers.get("x-writer", "")
        writers.append(w)
        if data != body or headers.get("x-check") != sha1(w.encode()):
            bad.append((m.url, headers))
        bad += m.tmp_files()
    figures.add(19, n, len(bad), seed=rng.seed_value,
                note="through sos: members kept writers %s" % "/".join(writers))
    assert bad == []


def test_concurrent_listings_and_stats_each_see_every_id_once(procs, figures, rng):
    """Found by the kill -9 soak: a listing racing warm() or /stats right
    after a restart came back short, as their scans of the store's root
    shared one directory offset."""
    blob = procs.blob()
    expected = []
    for i in range(scaled(300)):
        body = b"listed %d" % i
        assert blob.post(sha1(body), body)[0] == 200
        expected.append(sha1(body))
    expected.sort()
    rounds = scaled(40)
    wrong = []

    def lister():
        for _ in range(rounds):
            ids = blob.ids()
            if ids != expected:
                wrong.append((len(ids), len(set(ids))))

    def summaries():
        for _ in range(rounds):
            request(blob.url + "/stats")
            request(blob.url + "/digests")
    threads = [threading.Thread(target=f) for f in (lister, lister, summaries, summaries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    figures.add(19, 2 * rounds, len(wrong), seed=rng.seed_value,
                note="%d concurrent listings of %d ids" % (2 * rounds, len(expected)))
    assert wrong == []
