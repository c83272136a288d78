"""Rows 34-40: large objects as chunks under faults (issue 21).

An upload larger than --chunk-size is stored as chunks (ids c<sha1>, placed
like any blob) and then a manifest under the object's id; replicate collects
the chunks no live manifest references after --gc-grace.  What must hold,
with real blob.py, sos.py and replicate.py processes:

    C1 no manifest, no object: an upload that died half-way fetches 404
    C2 every acknowledged chunked upload fetches whole, through member
       failures, rot, deletes and collection runs ("acked uploads lost")
    C3 a 200 (or 206) is never complete with wrong bytes: a chunk or
       manifest rotten on one member is served right from another, rotten
       everywhere is a cut transfer or 503
    C4 collection removes exactly the chunks no live manifest names and
       that are older than the grace, and a chunk being re-used is kept

Found here and fixed: a manifest deleted while the collection read
manifests made it skip and exit 1 (row 37).  Found and documented (README,
Large objects): a grace shorter than an upload takes can collect the chunks
of that upload in flight; the default (1 day) is the guard, and row 38 checks
that a chunk an upload rewrites is kept by a grace shorter than its age.
"""

import os
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import given, strategies as st

import rules
from cluster import Group, placement
from support import (ROOT, Processes, RawConnection, address, flip_bit, get_json, raw_exchange,
                     replicate_process, sha1, wait_for)

from .kit import fuzz_settings, mount_tmpfs, require_tool, scaled, umount

CHUNK = 64 * 1024
SIZE = "64K"
TOKEN = "fault-suite-chunks-token"


# --- Helpers -------------------------------------------------------------------

def chunk_ids(body):
    """The chunk ids an upload of body is stored as ([] if it is stored whole)."""
    if len(body) <= CHUNK:
        return []
    return ["c" + sha1(body[i:i + CHUNK]) for i in range(0, len(body), CHUNK)]


def chunked_cluster(procs, tmp_path, *args, layout=(("g1", 2), ("g2", 2))):
    """blob.py processes in groups behind a sos.py cutting at CHUNK, with deletes."""
    token = tmp_path / "delete.token"
    token.write_text(TOKEN + "\n")
    return procs.cluster(layout, "--chunk-size", SIZE, "--delete-token", str(token),
                         *args)


def delete(sos, blob_id):
    return get_json(sos.up + "/fetch/" + blob_id, "DELETE", None,
                    {"Authorization": "Bearer " + TOKEN})


def fetch(sos, blob_id, headers=""):
    """GET through the sos-server over a raw connection: a support.Reply
    (.complete False if the transfer was cut), or None if no head came."""
    try:
        return raw_exchange(sos.down, ("GET /fetch/%s HTTP/1.1\r\nHost: t\r\n%s"
                                       "Connection: close\r\n\r\n" % (blob_id, headers))
                            .encode(), 60)
    except OSError:
        return None


def whole(sos, blob_id, body):
    """'' if the object fetches whole, else what came instead."""
    r = fetch(sos, blob_id)
    if r is not None and r.status == 200 and r.complete and r.body == body:
        return ""
    return "%s: %s" % (blob_id, "no reply" if r is None else
                       "%d, %d of %d bytes, complete %s" % (r.status, len(r.body),
                                                            len(body), r.complete))


def wrong_200(r, want):
    """A reply that is complete, 2xx and not the wanted bytes (C3)."""
    return r is not None and r.complete and r.status in (200, 206) and r.body != want


def gc_line(out):
    return next((line for line in out.splitlines() if line.startswith("gc:")), "")


def gc_figure(out, name):
    """A count from replicate's gc: line ("collected", "kept", "MISSING")."""
    words = gc_line(out).replace(",", "").split()
    return next(int(words[i - 1]) for i, w in enumerate(words) if w == name)


def on_disk(members, blob_id):
    return [m for m in members if os.path.exists(m.path(blob_id))]


def read_manifest(member, blob_id):
    with open(member.path(blob_id), "rb") as f:
        return rules.Manifest.decode(f.read(), blob_id)


def post_head(length):
    return ("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
            % length).encode()


# --- Row 34: kill -9 of sos-server mid chunked upload ------------------------------

def test_kill_9_mid_chunked_upload_leaves_no_object_and_chunks_gc_collects(
        procs, figures, rng, tmp_path):
    c = chunked_cluster(procs, tmp_path)
    trials = scaled(6)
    acked, left, bad, lost = {}, set(), [], []
    for trial in range(trials):
        body = rng.randbytes(rng.randrange(CHUNK + 1, 5 * CHUNK))
        status, reply = c.sos.upload(body)
        if status != 200 or reply.get("chunks") != len(chunk_ids(body)):
            bad.append("trial %d: upload %d %s" % (trial, status, reply))
        else:
            acked[reply["id"]] = body
        # The fault's random moment: after `sent` bytes of a chunked upload,
        # once the chunks they complete are stored.
        dying = rng.randbytes(rng.randrange(2 * CHUNK, 6 * CHUNK))
        sent = rng.randrange(1, len(dying))
        done = chunk_ids(dying)[:(sent - 1) // CHUNK]
        with socket.create_connection(address(c.sos.up), timeout=30) as sock:
            sock.sendall(post_head(len(dying)) + dying[:sent])
            wait_for(lambda: all(on_disk(c.members, i) for i in done), 30,
                     what="the chunks sent before the kill")
            c.sos.kill()
        left |= {i for i in chunk_ids(dying) if on_disk(c.members, i)}
        c.sos.start()
        r = fetch(c.sos, sha1(dying))
        if r is None or r.status != 404:
            bad.append("trial %d: killed after %d of %d bytes, fetch %r"
                       % (trial, sent, len(dying), r))
        if on_disk(c.members, sha1(dying)):
            bad.append("trial %d: a manifest of the killed upload" % trial)
        lost += [w for w in (whole(c.sos, i, b) for i, b in acked.items()) if w]
    copies = sum(len(on_disk(c.members, i)) for i in left)
    status, out, err = replicate_process(c.config())              # grace 1d
    if status != 0 or gc_figure(out, "collected") != 0:
        bad.append("default grace: exit %d, %s %s" % (status, gc_line(out), err[-500:]))
    kept = [i for i in left if on_disk(c.members, i)]
    status, out, err = replicate_process(c.config(), "--gc-grace", "0s")
    if status != 0 or gc_figure(out, "collected") != copies:
        bad.append("grace 0s: exit %d, %s (%d copies left) %s"
                   % (status, gc_line(out), copies, err[-500:]))
    uncollected = [i for i in left if on_disk(c.members, i)]
    lost += [w for w in (whole(c.sos, i, b) for i, b in acked.items()) if w]
    lost += ["%s: chunk %s collected" % (i, k) for i, b in acked.items()
             for k in chunk_ids(b) if not on_disk(c.members, k)]
    figures.add(34, trials, len(bad) + len(lost) + len(uncollected) + len(left) - len(kept),
                len(lost), rng.seed_value, "%d chunks left by the kills (%d copies), "
                "collected at 0s" % (len(left), copies))
    assert left, "no kill left a chunk: the test tested nothing"
    assert not lost
    assert not bad
    assert sorted(kept) == sorted(left), "the default grace collected chunks"
    assert not uncollected


# --- Row 35: a member down, full or refusing chunks during chunked uploads ----------

def test_a_member_down_or_full_during_chunked_uploads_fails_over_per_chunk(
        procs, figures, rng, tmp_path):
    """Each chunk is stored like any blob: a group that can't take its
    copies is passed over for the next, chunk by chunk.  The reply's copies
    are the fewest any chunk (or the manifest) got, never more than are on
    the disks; 503 when a chunk got none."""
    fs = tmp_path / "small"
    mount_tmpfs(fs, "size=1m,mode=0755")
    try:
        with open(fs / "ballast", "wb") as f:     # room for two chunks, then 507
            f.write(bytes((1 << 20) - 200 * 1024))
        groups = {g: [procs.blob("%s-%d" % (g, i)) for i in range(2)] for g in ("g1", "g2")}
        groups["g3"] = [procs.blob("g3-0", store=fs / "store"), procs.blob("g3-1")]
        sos = procs.sos(list(groups.items()), "--chunk-size", SIZE)
        members = [m for ms in groups.values() for m in ms]
        g1, g2, g3 = groups["g1"], groups["g2"], groups["g3"]
        n = scaled(3)
        acked, bad, trials = {}, [], 0

        def uploads(scene, copies):
            nonlocal trials
            for _ in range(n):
                trials += 1
                body = rng.randbytes(rng.randrange(CHUNK + 1, 6 * CHUNK))
                status, reply = sos.upload(body)
                if copies is None:
                    if status != 503:
                        bad.append("%s: %d %s, not 503" % (scene, status, reply))
                    continue
                if status != 200 or reply["copies"] != copies or \
                        reply["chunks"] != len(chunk_ids(body)):
                    bad.append("%s: %d %s, not 200 with %d copies" % (scene, status, reply,
                                                                     copies))
                    continue
                acked[reply["id"]] = body
                bad.extend("%s: %s" % (scene, w) for w in [whole(sos, reply["id"], body)] if w)
                bad.extend("%s: %s has %d copies, the reply said %d" % (scene, i, len(on_disk(
                    members, i)), copies) for i in chunk_ids(body) + [reply["id"]]
                    if len(on_disk(members, i)) < copies)
        g1[0].kill()
        uploads("g1-0 down, g3-0 filling", 2)
        probe = rng.randbytes(CHUNK)
        full = g3[0].post("c" + sha1(probe), probe)[0]     # a chunk no longer fits
        g1[0].start()
        g1[1].kill()
        g1[1].args += ["--max-size", "32K"]     # 413 for every chunk
        g1[1].start()
        uploads("g1-1 refusing chunks (413), g3-0 full", 2)
        for m in members:
            if m is not g2[0]:
                m.kill()
        uploads("only g2-0 up", 1)
        g2[0].kill()
        g3[0].start()
        uploads("only g3-0 (full) up", None)
        g3[0].kill()
        uploads("every member down", None)
        for m in members:
            m.start()
        lost = [w for w in (whole(sos, i, b) for i, b in acked.items()) if w]
    finally:
        procs.stop_all()
        umount(fs)
    figures.add(35, trials, len(bad) + len(lost), len(lost), rng.seed_value,
                "%d acknowledged; members down, full (tmpfs), --max-size < chunk"
                % len(acked))
    assert full == 507, "g3-0 never filled: the full member was not tested"
    assert not lost
    assert not bad


# --- Row 36: a chunk or a manifest flipped on one member and on all -----------------

def test_a_flipped_chunk_or_manifest_is_never_served_nor_followed(procs, figures, rng,
                                                                  tmp_path):
    c = chunked_cluster(procs, tmp_path)
    n = scaled(4)
    bad, cut = [], 0
    for _ in range(n):
        body = rng.randbytes(rng.randrange(3 * CHUNK, 5 * CHUNK))
        blob_id = c.sos.upload(body)[1]["id"]
        k = rng.randrange(len(chunk_ids(body)))
        chunk_id = chunk_ids(body)[k]
        size = min(CHUNK, len(body) - k * CHUNK)
        first = k * CHUNK + rng.randrange(size)
        last = min(len(body) - 1, first + rng.randrange(1, 2 * CHUNK))
        span = "Range: bytes=%d-%d\r\n" % (first, last)
        holders = on_disk(c.members, chunk_id)
        for i, member in enumerate(holders):
            flip_bit(member.path(chunk_id), rng.randrange(size), rng.randrange(8))
            got, part = fetch(c.sos, blob_id), fetch(c.sos, blob_id, span)
            if i < len(holders) - 1:                  # a good copy is left: unseen
                bad += ["chunk rotten on %d of %d: %s" % (i + 1, len(holders), w)
                        for w in [whole(c.sos, blob_id, body)] if w]
                if part is None or (part.status, part.complete, part.body) != \
                        (206, True, body[first:last + 1]):
                    bad.append("range over a chunk rotten on one member: %r" % part)
                continue
            for what, r, want in (("whole", got, body), ("range", part, body[first:last + 1])):
                if wrong_200(r, want):
                    bad.append("chunk rotten everywhere, %s: complete %d with wrong bytes"
                               % (what, r.status))
                elif r is not None and r.complete and r.status != 503:
                    bad.append("chunk rotten everywhere, %s: %d" % (what, r.status))
                cut += r is None or not r.complete
        # A manifest: never followed once rotten, on one member and then all.
        body = rng.randbytes(rng.randrange(2 * CHUNK, 4 * CHUNK))
        blob_id = c.sos.upload(body)[1]["id"]
        holders = on_disk(c.members, blob_id)
        for i, member in enumerate(holders):
            path = member.path(blob_id)
            flip_bit(path, rng.randrange(os.path.getsize(path)), rng.randrange(8))
            r = fetch(c.sos, blob_id)
            if i < len(holders) - 1:
                bad += ["manifest rotten on one member: %s" % w
                        for w in [whole(c.sos, blob_id, body)] if w]
            elif r is None or (r.status, r.complete) != (503, True):
                bad.append("manifest rotten everywhere: %r" % r)
    figures.add(36, 3 * n, len(bad), 0, rng.seed_value,
                "rot everywhere: %d of %d fetches cut, the rest 503" % (cut, 2 * n))
    assert not bad


# --- Row 37: delete racing collection -------------------------------------------

def test_deletes_racing_collection_leave_no_error_and_collect_their_chunks(
        procs, figures, rng, tmp_path):
    c = chunked_cluster(procs, tmp_path)
    rounds, per_round = scaled(3), 8
    shared = rng.randbytes(CHUNK)
    live, bad = {}, []
    for _ in range(2):
        body = shared + rng.randbytes(rng.randrange(1, 2 * CHUNK))
        live[c.sos.upload(body)[1]["id"]] = body
    deleted = {}
    for rnd in range(rounds):
        doomed = {}
        for i in range(per_round):
            body = (shared if i % 2 else b"") + rng.randbytes(rng.randrange(CHUNK + 1,
                                                                             3 * CHUNK))
            doomed[c.sos.upload(body)[1]["id"]] = body
        keep = rng.sample(sorted(doomed), 2)
        live.update((i, doomed.pop(i)) for i in keep)
        # The deletes go out, all at once, as soon as the collection's mark
        # has listed the first member (its access log shows the listing).
        first = c.members[0]
        marks = first.log().count("manifests=1")
        rep = subprocess.Popen([c.sos.argv[0], os.path.join(ROOT, "replicate.py"),
                                "--config", c.config(), "--gc-grace", "0s"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: first.log().count("manifests=1") > marks or rep.poll() is not None,
                 60, 0.002, "replicate's collection to begin")
        answers = {}
        senders = [threading.Thread(target=lambda i=i: answers.update({i: delete(c.sos, i)}))
                   for i in rng.sample(sorted(doomed), len(doomed))]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        bad += ["delete %s: %s" % (i, answers.get(i)) for i in doomed
                if answers.get(i, (None,))[0] != 200]
        out, err = rep.communicate(timeout=120)
        if rep.returncode != 0 or "skipped" in gc_line(out):
            bad.append("round %d: replicate racing deletes exited %d: %s %s"
                       % (rnd, rep.returncode, gc_line(out), err[-300:]))
        deleted.update(doomed)
    status, out, err = replicate_process(c.config(), "--gc-grace", "0s")
    if status != 0:
        bad.append("rerun: exit %d %s %s" % (status, gc_line(out), err[-300:]))
    wanted = {k for b in live.values() for k in chunk_ids(b)}
    stale = [k for b in deleted.values() for k in chunk_ids(b)
             if k not in wanted and on_disk(c.members, k)]
    gone = [k for k in wanted if not on_disk(c.members, k)]
    lost = [w for w in (whole(c.sos, i, b) for i, b in live.items()) if w]
    back = [i for i in deleted if fetch(c.sos, i).status != 404]
    figures.add(37, rounds * per_round, len(bad) + len(stale) + len(gone) + len(back),
                len(lost), rng.seed_value, "%d objects deleted while replicate "
                "--gc-grace 0s ran, in %d rounds" % (len(deleted), rounds))
    assert not lost
    assert not back
    assert not gone, "chunks of live objects collected"
    assert not stale, "chunks of deleted objects left after a rerun"
    assert not bad


def test_a_manifest_deleted_while_the_collection_reads_manifests_is_no_error(
        procs, figures, rng, tmp_path):
    """replicate runs under strace, every sendto delayed 0.3 s, so the
    delete lands between the mark's last listing and its reading of the
    manifests (the race of row 37, made certain)."""
    strace = require_tool("strace", "strace")
    c = chunked_cluster(procs, tmp_path)
    body = rng.randbytes(CHUNK + 100)
    blob_id = c.sos.upload(body)[1]["id"]
    last = c.members[-1]
    marks = last.log().count("manifests=1")
    rep = subprocess.Popen([strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=sendto",
                            "-e", "inject=sendto:delay_enter=300000", c.sos.argv[0],
                            os.path.join(ROOT, "replicate.py"), "--config", c.config(),
                            "--gc-grace", "0s"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: last.log().count("manifests=1") > marks, 120, 0.002,
                 "the mark's listing of the last member")
        assert delete(c.sos, blob_id)[0] == 200
        out, err = rep.communicate(timeout=120)
    finally:
        rep.kill()
    figures.add(37, 1, int(rep.returncode != 0), 0, rng.seed_value,
                "a delete between the mark's listing and reading: exit %d, %s"
                % (rep.returncode, gc_line(out)))
    assert (rep.returncode, "skipped" in gc_line(out)) == (0, False), (out, err[-500:])


# --- Row 38: collection racing uploads that re-use chunks ---------------------------

def old_chunks(c, bodies, age_s=7200):
    """Store each body as a chunk in its placement group, written age_s ago:
    the chunks of objects deleted (or uploads that died) long before."""
    groups = [Group(g, [m.url for m in ms]) for g, ms in c.groups.items()]
    when = time.time_ns() - age_s * 10 ** 9
    for body in bodies:
        chunk_id = "c" + sha1(body)
        for url in placement(chunk_id, groups)[0].members:
            status, reply = get_json("%s/blob/%s" % (url, chunk_id), "POST", body,
                                     {"X-Sos-Timestamp": str(when)})
            assert status == 200, reply


def test_collection_racing_uploads_that_re_use_old_chunks_loses_no_acked_upload(
        procs, figures, rng, tmp_path):
    """replicate --gc-grace 1h runs in a loop over chunks written 2 h ago
    (garbage, so collectable) while uploads re-use half of them: a re-used
    chunk is rewritten with the upload's time before its manifest is
    stored, so a collection either lists it as new or names a version that
    is no longer there (kept)."""
    c = chunked_cluster(procs, tmp_path)
    n = scaled(24)
    prefixes = [rng.randbytes(CHUNK) for _ in range(n)]
    old_chunks(c, prefixes)
    runs, stop = [], threading.Event()

    def collect():
        while not stop.is_set():
            runs.append(replicate_process(c.config(), "--gc-grace", "1h"))
    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    acked, bad = {}, []
    try:
        wait_for(lambda: runs or c.members[0].log().count("manifests=1"), 60, 0.005,
                 "the first collection")
        for prefix in prefixes[::2]:
            body = prefix + rng.randbytes(rng.randrange(1, 2 * CHUNK))
            status, reply = c.sos.upload(body)
            if status == 200:
                acked[reply["id"]] = body
            else:
                bad.append("upload: %d %s" % (status, reply))
    finally:
        stop.set()
        collector.join(120)
    runs.append(replicate_process(c.config(), "--gc-grace", "1h"))
    bad += ["replicate exited %d: %s %s" % (s, gc_line(o), e[-300:]) for s, o, e in runs if s]
    lost = [w for w in (whole(c.sos, i, b) for i, b in acked.items()) if w]
    unused = [p for p in prefixes[1::2] if on_disk(c.members, "c" + sha1(p))]
    kept = sum(gc_figure(o, "kept") for s, o, e in runs if not s)
    figures.add(38, len(acked), len(bad) + len(lost) + len(unused), len(lost), rng.seed_value,
                "%d collections racing %d uploads re-using old chunks; %d removals "
                "refused as the chunk was re-used meanwhile" % (len(runs), len(acked), kept))
    assert not lost
    assert not bad
    assert not unused, "old chunks no upload re-used were not collected"


def test_an_upload_in_flight_keeps_a_re_used_chunk_through_a_collection(
        procs, figures, tmp_path, rng):
    """The chunk of a deleted object, 2 h old, is re-used by an upload in
    flight (its manifest not yet stored) while a collection with a 1 h grace
    runs: the upload rewrote the chunk, so it is too young to collect.  (A
    grace shorter than an upload takes can't protect it: README.)"""
    c = chunked_cluster(procs, tmp_path)
    prefix = rng.randbytes(CHUNK)
    chunk_id = "c" + sha1(prefix)
    doomed = prefix + rng.randbytes(CHUNK)
    blob_id = c.sos.upload(doomed)[1]["id"]
    assert delete(c.sos, blob_id)[0] == 200
    home = on_disk(c.members, chunk_id)
    old = time.time_ns() - 7200 * 10 ** 9
    for m in home:
        os.utime(m.path(chunk_id), ns=(old, old))
    before = {m.url: old for m in home}
    body = prefix + rng.randbytes(CHUNK + 10)
    with socket.create_connection(address(c.sos.up), timeout=60) as sock:
        sock.sendall(post_head(len(body)) + body[:CHUNK + 1])
        # The upload has re-sent (rewritten) the shared chunk; its manifest
        # comes once the rest of the body is in.
        wait_for(lambda: all(os.path.exists(m.path(chunk_id)) and
                             os.stat(m.path(chunk_id)).st_mtime_ns > before[m.url]
                             for m in home), 30, what="the re-used chunk rewritten")
        status, out, err = replicate_process(c.config(), "--gc-grace", "1h")
        assert status == 0, (out, err)
        sock.sendall(body[CHUNK + 1:])
        reply = RawConnection(sock).reply("POST", time.monotonic() + 60)
    assert (reply.status, reply.json()["id"]) == (200, sha1(body))
    got = whole(c.sos, sha1(body), body)
    figures.add(38, 1, int(bool(got)), int(bool(got)), rng.seed_value,
                "an upload in flight through a collection (1 h grace, chunk 2 h old): %s"
                % (got or "whole"))
    assert got == ""


# --- Row 39: scrub finds a rotten chunk (or manifest) and repairs it in one run -----

def test_scrub_finds_rotten_chunks_and_manifests_and_repairs_them_in_the_same_run(
        procs, figures, rng, tmp_path):
    c = chunked_cluster(procs, tmp_path)
    n = scaled(4)
    objects, rotten = {}, {}
    for _ in range(n):
        body = rng.randbytes(rng.randrange(2 * CHUNK, 4 * CHUNK))
        blob_id = c.sos.upload(body)[1]["id"]
        objects[blob_id] = body
        chunk_id = rng.choice(chunk_ids(body))
        member = rng.choice(on_disk(c.members, chunk_id))
        flip_bit(member.path(chunk_id), rng.randrange(os.path.getsize(member.path(chunk_id))),
                 rng.randrange(8))
        rotten[chunk_id] = member
    blob_id = rng.choice(sorted(objects))
    member = rng.choice(on_disk(c.members, blob_id))
    flip_bit(member.path(blob_id), rng.randrange(os.path.getsize(member.path(blob_id))),
             rng.randrange(8))
    rotten[blob_id] = member
    status, out, err = replicate_process(c.config(), "--scrub", "--scrub-rate", "0")
    bad = [] if status == 0 and "quarantined by scrub: %d" % len(rotten) in out else \
        ["replicate --scrub exited %d: %s %s" % (status, out[-600:], err[-600:])]
    for i, member in rotten.items():
        if not os.path.exists(member.path(i)):
            bad.append("%s on %s: not restored in the same run" % (i, member.url))
            continue
        with open(member.path(i), "rb") as f:
            data = f.read()
        try:
            good = sha1(data) == i[1:] if rules.CHUNK_ID.fullmatch(i) else \
                rules.Manifest.decode(data, i).id == i
        except rules.BadManifest:
            good = False
        if not good:
            bad.append("%s on %s: still rotten after scrub" % (i, member.url))
    lost = [w for w in (whole(c.sos, i, b) for i, b in objects.items()) if w]
    figures.add(39, len(rotten), len(bad) + len(lost), len(lost), rng.seed_value,
                "%d rotten chunk copies and 1 manifest copy, one replicate --scrub" % n)
    assert not lost
    assert not bad


# --- Row 40: sizes around the chunk boundary and ranges, through sos.py --------------

@pytest.fixture(scope="module")
def chunked_front(tmp_path_factory):
    """One sos.py process cutting at CHUNK over two groups of blob.py."""
    procs = Processes(tmp_path_factory.mktemp("chunk-ranges"))
    c = procs.cluster((("g1", 2), ("g2", 2)), "--chunk-size", SIZE)
    yield c.sos, {}, []
    procs.stop_all()
    assert not procs.crashed()


EDGES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1,
         5 * CHUNK + 7]


@fuzz_settings(30)
@given(size=st.one_of(st.sampled_from(EDGES), st.integers(0, 6 * CHUNK)), data=st.data())
def test_sizes_around_the_chunk_boundary_and_random_ranges_round_trip(
        chunked_front, figures, size, data):
    sos, stored, seen = chunked_front
    if size not in stored:
        body = os.urandom(size)
        status, reply = sos.upload(body)
        assert status == 200 and reply["id"] == sha1(body), reply
        assert reply.get("chunks", 0) == len(chunk_ids(body))
        stored[size] = body
    body = stored[size]
    blob_id = sha1(body)
    seen.append(size)
    figures.add(40, 1, 0, note="hypothesis through sos.py, chunk 64K: the edges and "
                "sizes to 6 chunks, whole and ranged" if len(seen) == 1 else None)
    assert whole(sos, blob_id, body) == ""
    if not size:
        return
    kind = data.draw(st.sampled_from(["span", "from", "suffix"]))
    first = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(first, size - 1))
    if kind == "span":
        spec, want = "%d-%d" % (first, last), (first, last)
    elif kind == "from":
        spec, want = "%d-" % first, (first, size - 1)
    else:
        n = data.draw(st.integers(1, size + 10))
        spec, want = "-%d" % n, (max(0, size - n), size - 1)
    r = fetch(sos, blob_id, "Range: bytes=%s\r\n" % spec)
    assert r is not None and (r.status, r.complete) == (206, True), (spec, r)
    assert r.body == body[want[0]:want[1] + 1], spec
    assert r.header("content-range") == "bytes %d-%d/%d" % (want[0], want[1], size)
