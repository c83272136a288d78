"""Rows 8 and 9: blob files that rot or change size under a running server.

The sos-server must never send a complete 200 whose bytes don't match the
id (I4): a bad copy up to --verify-limit is caught before anything is sent
and the blob comes from a replica instead; a larger one is cut short.
`replicate --scrub` quarantines exactly the bad copies and restores them
(I5).
"""

import http.client
import os
import socket
import time

from support import RawConnection, address, flip_bit, replicate_process, sha1

from .kit import scaled

from cluster import rank

VERIFY_LIMIT = 256 * 1024


def first_asked(cluster, blob_id):
    """The member the sos-server asks first for blob_id (the group's own
    ranking; both members are healthy)."""
    members = cluster.groups["g1"]
    url = rank(blob_id, [m.url for m in members])[0]
    return next(m for m in members if m.url == url)


def upload_all(cluster, rng, count, sizes):
    blobs = {}
    for i in range(count):
        body = rng.randbytes(rng.choice(sizes)) + b"%d" % i
        status, reply = cluster.sos.upload(body)
        assert status == 200 and reply["copies"] == 2, reply
        blobs[reply["id"]] = body
    return blobs


def served_as_good(cluster, blob_id, body):
    """Fetch through the sos-server: 'good' (200, right bytes), 'bad' (a
    complete 200 of other bytes: an I4 violation) or 'cut' (no complete
    response)."""
    try:
        status, _, data = cluster.sos.fetch(blob_id)
    except (OSError, http.client.HTTPException):    # IncompleteRead: cut short
        return "cut"
    if status != 200:
        return "status %d" % status
    return "good" if data == body else "bad"


def test_a_flipped_bit_is_never_served_as_good_the_replica_serves_it_and_scrub_finds_every_one(
        procs, figures, rng):
    c = procs.cluster((("g1", 2),), "--verify-limit", str(VERIFY_LIMIT))
    n = scaled(100)
    blobs = upload_all(c, rng, n, (1, 100, 5000, 100000, VERIFY_LIMIT - 10))
    clean = upload_all(c, rng, scaled(900), (0, 10, 1000))
    flipped = {}
    for i, (blob_id, body) in enumerate(blobs.items()):
        victim = first_asked(c, blob_id)
        # The first and last byte are where off-by-one checks miss.
        offset = (0, len(body) - 1)[i % 2] if i < n // 2 else rng.randrange(len(body))
        flip_bit(victim.path(blob_id), offset, rng.randrange(8))
        flipped[blob_id] = victim
    outcomes = [served_as_good(c, i, blobs[i]) for i in blobs]
    bad = [o for o in outcomes if o != "good"]

    status, out, err = replicate_process(c.config(), "--scrub", "--scrub-rate", "0")
    quarantined = {m.url: sorted(f.split(".")[0] for f in m.quarantined()) for m in c.members}
    expected = {m.url: sorted(i for i, v in flipped.items() if v is m) for m in c.members}
    false_alarms = sum(1 for m in c.members for i in quarantined[m.url] if i not in flipped)
    missed = sum(1 for m in c.members for i in expected[m.url] if i not in quarantined[m.url])
    # The same run restores every quarantined copy from the good member.
    unrestored = [i for i in blobs if len(c.holders(i)) != 2 or any(
        sha1(open(m.path(i), "rb").read()) != i for m in c.members)]
    figures.add(8, n, len(bad) + missed + false_alarms + len(unrestored), seed=rng.seed_value,
                note="%d/%d served right from a replica; scrub quarantined %d/%d, "
                "%d false alarms in %d clean" % (outcomes.count("good"), n, n - missed, n,
                                                 false_alarms, len(clean) + n))
    assert not bad, bad
    assert (missed, false_alarms) == (0, 0), (quarantined, expected, out, err)
    assert status == 0 and not unrestored, (out, err)


def test_a_large_rotten_blob_is_cut_short_never_sent_complete(procs, figures, rng):
    """Above --verify-limit the bytes stream as they are hashed: a bad copy
    ends in a cut connection, not a 200 the client would trust."""
    c = procs.cluster((("g1", 2),), "--verify-limit", str(VERIFY_LIMIT))
    n = scaled(6)
    blobs = upload_all(c, rng, n, (VERIFY_LIMIT * 3, 2 << 20))
    for i, (blob_id, body) in enumerate(blobs.items()):
        for m in c.members:       # no good copy anywhere
            flip_bit(m.path(blob_id), (0, len(body) - 1, len(body) // 2)[i % 3])
    outcomes = [served_as_good(c, i, blobs[i]) for i in blobs]
    figures.add(8, n, outcomes.count("bad") + outcomes.count("good"), seed=rng.seed_value,
                note="%d large rotten blobs all cut short" % n)
    assert outcomes == ["cut"] * n


def test_a_blob_file_changing_size_never_yields_a_complete_200_of_wrong_bytes(
        procs, figures, rng):
    c = procs.cluster((("g1", 2),), "--verify-limit", str(VERIFY_LIMIT))
    n = scaled(30)
    blobs = upload_all(c, rng, n, (1, 1000, 100000, VERIFY_LIMIT - 10, VERIFY_LIMIT * 2))
    kinds, large = [], []
    for i, (blob_id, body) in enumerate(blobs.items()):
        path = first_asked(c, blob_id).path(blob_id)
        kind = ("truncated", "emptied", "extended")[i % 3]
        with open(path, "r+b") as f:
            if kind == "truncated":
                f.truncate(rng.randrange(len(body)) if len(body) > 1 else 0)
            elif kind == "emptied":
                f.truncate(0)
            else:
                f.seek(0, os.SEEK_END)
                f.write(rng.randbytes(rng.randrange(1, 5000)))
        kinds.append(kind)
        large.append(os.path.getsize(path) > VERIFY_LIMIT)
    outcomes = [served_as_good(c, i, blobs[i]) for i in blobs]
    # A copy up to the limit is verified before sending, so the replica
    # serves it; a larger one streams, and may only be cut short.
    wrong = [(k, o) for k, o, big in zip(kinds, outcomes, large)
             if o == "bad" or (not big and o != "good")]
    figures.add(9, n, len(wrong), seed=rng.seed_value,
                note="%d served right from a replica, %d cut short"
                % (outcomes.count("good"), outcomes.count("cut")))
    assert not wrong, wrong


def test_a_blob_file_truncated_while_being_sent_is_cut_short_by_the_blob_server(
        procs, figures, rng):
    srv = procs.blob()
    trials = scaled(3)
    complete_wrong = 0
    for _ in range(trials):
        body = rng.randbytes(16 << 20)
        blob_id = sha1(body)
        assert srv.post(blob_id, body)[0] == 200
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.connect(address(srv.url))
            sock.sendall(b"GET /blob/%s HTTP/1.1\r\nHost: t\r\n\r\n" % blob_id.encode())
            first = sock.recv(65536)
            with open(srv.path(blob_id), "r+b") as f:
                f.truncate(1 << 20)
            resp = RawConnection(sock, buffered=first).reply("GET", time.monotonic() + 60)
        complete_wrong += bool(resp and resp.complete and resp.status == 200
                               and resp.body != body)
    figures.add(9, trials, complete_wrong, seed=rng.seed_value,
                note="truncated mid-transfer: %d/%d cut" % (trials - complete_wrong, trials))
    assert complete_wrong == 0
