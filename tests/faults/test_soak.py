"""Row 21 and the long variants of rows 1, 4 and 17: `make soak`.

Only run with -m soak.  Together they take SOAK_MINUTES (default 10); each
test has its share of that time and stops starting new trials when it is
used up.  The chaos soak runs a whole cluster through kill -9, freezes
(SIGSTOP: a partition as the sos-server sees it, connections that go
nowhere), bit flips and a near-full disk while a client uploads, fetches
and deletes; once, the cluster grows a group (a new sos-server with the new
configuration takes over), and `replicate --rebalance` runs in the
background now and then, sometimes killed -9 mid-move.  Then it heals
everything, runs replicate --rebalance --scrub, and checks every
invariant, and that every blob and tombstone is in its placement group.
Uploads above 256 KiB are stored as chunks, and replicate collects the
chunks of deleted objects (--gc-grace 0s) between the client's operations:
the client is the only one, so no upload is in flight during a collection
(a grace of 0s is not safe against one).
"""

import http.client
import os
import random
import signal
import subprocess
import threading
import time
import warnings

import pytest
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning

import rules
from support import PYTHON, ROOT, flip_bit, get_json, replicate_process, sha1

from .kit import (SOAK_MINUTES, Uploader, check_store, judge, mount_ext4, mutated, responses,
                  stored, umount)

from cluster import Group, placement

pytestmark = pytest.mark.soak

TOKEN = "soak-delete-token"

SHARES = {"chaos": 0.55, "kill": 0.2, "round-trip": 0.1, "fuzz": 0.15}


def budget(name):
    """The monotonic time at which this soak test must stop starting trials."""
    return time.monotonic() + SOAK_MINUTES * 60 * SHARES[name]


def test_soak_chaos_loses_nothing_serves_nothing_corrupt_and_does_not_drift(
        procs, figures, rng, tmp_path):
    end = budget("chaos")
    # One member's store is on a filesystem of its own, which the chaos
    # fills to within a few MiB and frees again: ext4 in a sparse image, so
    # the ballast (fallocated) costs neither memory nor real disk.
    disk = tmp_path / "near-full"
    mount_ext4(disk, tmp_path / "near-full.img", int(1024 * max(2, SOAK_MINUTES / 5)))
    try:
        _chaos(procs, figures, rng, disk, end, tmp_path)
    finally:
        procs.stop_all()
        umount(disk)


def _chaos(procs, figures, rng, disk, end, tmp_path):
    groups = {"g1": [procs.blob("g1-0"), procs.blob("g1-1")],
              "g2": [procs.blob("g2-0"), procs.blob("g2-1", store=disk / "store")]}
    ballast = disk / "ballast"
    token = tmp_path / "delete.token"
    token.write_text(TOKEN + "\n")
    sos_args = ("--timeout", "5", "--delete-token", str(token), "--chunk-size", "256K")
    sos = procs.sos(list(groups.items()), *sos_args)
    members = [m for ms in groups.values() for m in ms]
    acknowledged, deleted = {}, {}      # deleted: {id: how its delete was answered}
    counts = dict.fromkeys(("ops", "uploads", "fetches", "deletes", "kills", "freezes",
                            "flips", "fills", "rebalances", "rebalances killed",
                            "collections", "I3", "I4",
                            "unanswered", "unavailable"), 0)
    frozen, dead, flipped = {}, {}, set()
    warm_level = warm_rss = None
    warm_at = time.monotonic() + (end - time.monotonic()) * 0.1
    # The configuration changes once: a third group joins.
    grow_at = time.monotonic() + (end - time.monotonic()) * rng.uniform(0.1, 0.5)
    warm_deletes = 8
    mover = None                  # a replicate --rebalance running in the background

    def heal(all_=False):
        now = time.monotonic()
        for m, until in list(frozen.items()):
            if all_ or now > until:
                os.kill(m.pid, signal.SIGCONT)
                del frozen[m]
        for m, until in list(dead.items()):
            if all_ or now > until:
                m.start()
                del dead[m]

    while time.monotonic() < end:
        counts["ops"] += 1
        heal()
        if grow_at and time.monotonic() > grow_at:
            grow_at = None
            groups["g3"] = [procs.blob("g3-0"), procs.blob("g3-1")]
            members += groups["g3"]
            sos.kill()
            sos = procs.sos(list(groups.items()), *sos_args, name="sos-grown")
            # Measure drift on the new sos-server from its own warm-up.
            warm_level = None
            warm_at = time.monotonic() + (end - time.monotonic()) * 0.1
            warm_deletes = counts["deletes"] + 8
        # Warm means deletes too have run (they start the sos-server's
        # thread pool, which then stays).
        if warm_level is None and time.monotonic() > warm_at and \
                counts["deletes"] >= warm_deletes:
            warm_level, warm_rss = sos.level(), sos.rss()
        if mover and mover.poll() is not None:
            mover = None
        r = rng.random()
        up = [m for m in members if m not in frozen and m not in dead]
        if r < 0.02 and mover is None:
            mover = subprocess.Popen([PYTHON, os.path.join(ROOT, "replicate.py"), "--config",
                                      sos.config, "--rebalance", "--rate", "200",
                                      "--timeout", "5"], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            counts["rebalances"] += 1
        elif r < 0.08 and acknowledged:
            blob_id = rng.choice(list(acknowledged))
            del acknowledged[blob_id]      # unknown, unless acknowledged
            counts["deletes"] += 1
            try:
                status, _ = get_json(sos.up + "/fetch/" + blob_id, "DELETE", None,
                                         {"Authorization": "Bearer " + TOKEN}, 60)
            except (OSError, http.client.HTTPException):
                status = None
                counts["unanswered"] += 1
            if status in (200, 202):
                deleted[blob_id] = "%s at %d, config %d" % (status, time.time_ns(),
                                                           len(groups))
            elif status not in (503, None):
                counts["I3"] += 1
        elif r < 0.55:
            body = rng.randbytes(rng.choice((0, 10, 1000, 100000, 300000, 1 << 20,
                                             4 << 20)))
            headers = {"X-Soak": str(counts["ops"])}
            counts["uploads"] += 1
            try:
                status, reply = sos.upload(body, headers)
            except (OSError, http.client.HTTPException):
                status = None          # the sos-server must answer, 200 or 503
                counts["unanswered"] += 1
            if status == 200:
                acknowledged[reply["id"]] = body
                deleted.pop(reply["id"], None)     # an empty body again: uploaded anew
                got = fetch(sos, reply["id"])
                counts["I3"] += got[0] != 200 and not (frozen or dead) and \
                    reply["id"] not in flipped
                counts["I4"] += got[0] == 200 and got[1] != body
            elif status not in (503, None):
                counts["I3"] += 1
        elif r < 0.85 and acknowledged:
            blob_id = rng.choice(list(acknowledged))
            counts["fetches"] += 1
            status, data = fetch(sos, blob_id)
            counts["I4"] += status == 200 and data != acknowledged[blob_id]
            counts["unavailable"] += status != 200
        elif r < 0.87 and mover is None:
            # A collection between the client's operations (members down
            # or frozen: it collects nothing and says why).
            replicate_process(sos.config, "--gc-grace", "0s", "--timeout", "5",
                              timeout=1800)
            counts["collections"] += 1
        elif r < 0.88 and mover and rng.random() < 0.3:
            mover.kill()                   # kill -9 mid-move; a later run resumes
            mover.wait()
            mover = None
            counts["rebalances killed"] += 1
        elif r < 0.88 and up:
            m = rng.choice(up)
            m.kill()
            dead[m] = time.monotonic() + rng.uniform(0, 5)
            counts["kills"] += 1
        elif r < 0.91:
            if os.path.exists(ballast):
                os.unlink(ballast)
            else:
                st = os.statvfs(disk)
                room = st.f_bavail * st.f_frsize - (rng.randrange(1, 8) << 20)
                if room > 0:
                    with open(ballast, "wb") as f:
                        os.posix_fallocate(f.fileno(), 0, room)
                    counts["fills"] += 1
        elif r < 0.95 and up:
            m = rng.choice(up)
            os.kill(m.pid, signal.SIGSTOP)
            frozen[m] = time.monotonic() + rng.uniform(0.5, 8)
            counts["freezes"] += 1
        elif up:
            m = rng.choice(up)
            files = stored(m.store)
            if files:
                blob_id = rng.choice(sorted(files))
                size = os.path.getsize(files[blob_id])
                # Rot only where a good copy remains somewhere: two faults
                # on one blob lose it, and that is not what is tested here.
                spare = any(os.path.exists(o.path(blob_id)) for o in members if o is not m)
                if size and spare and blob_id not in flipped:
                    flip_bit(files[blob_id], rng.randrange(size))
                    flipped.add(blob_id)
                    counts["flips"] += 1

    # Heal: thaw, restart, free the disk, and one replicate run (which
    # finishes any move a killed rebalance left).  It may fail a move whose
    # only old copy is rotten (the scrub, after the moves, quarantines it;
    # the good copy is in the placement group): a second run must find
    # everything in place.
    heal(all_=True)
    if mover:
        mover.wait(600)
    if os.path.exists(ballast):
        os.unlink(ballast)
    status, out, err = replicate_process(sos.config, "--rebalance", "--scrub",
                                         "--scrub-rate", "0", "--gc-grace", "0s",
                                         timeout=1800)
    status, out2, err2 = replicate_process(sos.config, "--rebalance", timeout=1800)
    out, err = out + out2, err + err2
    lost = corrupt = unsynced = resurrected = 0
    shape = [Group(name, [m.url for m in ms]) for name, ms in groups.items()]
    misplaced = []
    for name, ms in groups.items():
        listed = [entries(m.store) for m in ms]
        ids = [{i for i, kind in h.items() if kind == "blob"} for h in listed]
        union = set().union(*ids)
        unsynced += sum(len(union - s) for s in ids)                       # I5
        misplaced += ["%s in %s" % (i, name) for h in listed for i in h
                      if placement(i, shape)[0].name != name]
        for m in ms:
            for blob_id, path in stored(m.store).items():
                if blob_id.endswith(".deleted"):
                    continue
                with open(path, "rb") as f:
                    corrupt += not whole_copy(blob_id, f.read())             # I1
    for blob_id, body in acknowledged.items():
        got = sos.fetch(blob_id)
        lost += got[0] != 200 or got[2] != body                              # I2
    back = []
    for blob_id, how in deleted.items():
        fetched = sos.fetch(blob_id)[0]
        if fetched != 404:
            back.append("%s (delete %s): fetch %d; held %s" % (blob_id, how, fetched, [
                (m.url, held(m, blob_id)) for m in members]))
    resurrected = len(back)
    level, rss = sos.settled(warm_level or sos.level()), sos.rss()
    drift = [
        ("threads", warm_level[0], level[0]), ("fds", warm_level[1], level[1]),
        ("rss", warm_rss, rss)] if warm_level else []
    drifted = [(what, a, b) for what, a, b in drift if b > a * 1.05 + (2 << 20 if what == "rss" else 1)]
    missing = any(line.startswith("gc:") and " 0 MISSING" not in line
                  for line in out.splitlines())
    violations = (counts["I3"] + counts["I4"] + counts["unanswered"] + corrupt + unsynced
                  + missing
                  + len(drifted) + resurrected + len(misplaced))
    figures.add(21, counts["ops"], violations, lost + resurrected, rng.seed_value,
                note="%(uploads)d uploads, %(fetches)d fetches, %(deletes)d deletes, "
                "%(kills)d kills, %(freezes)d freezes, %(flips)d flips, %(fills)d disk fills, "
                "a group added, %(rebalances)d rebalances (%(rebalances killed)d killed), "
                "%(collections)d collections; "
                % counts + "%d unsynced, %d misplaced, %d of %d deletes resurrected after "
                "replicate; drift %s" % (unsynced, len(misplaced), resurrected, len(deleted),
                                         drift))
    print(counts, out, err[-3000:])
    assert (lost, corrupt, unsynced, resurrected) == (0, 0, 0, 0), (back, out, err[-3000:])
    assert misplaced == [], misplaced[:20]
    assert not missing, out
    assert counts["I3"] == counts["I4"] == counts["unanswered"] == 0, counts
    assert drifted == []
    assert status == 0, (out, err[-3000:])


def whole_copy(name, data):
    """Does a stored file hold what its name says: a chunk (c<sha1>) its
    bytes, an object its bytes or a manifest that passes its check?"""
    if rules.CHUNK_ID.fullmatch(name):
        return sha1(data) == name[1:]
    if sha1(data) == name:
        return True
    try:
        return rules.Manifest.decode(data, name).id == name
    except rules.BadManifest:
        return False


def entries(store):
    """{id: "blob" or "tombstone"} of a store, read from its disk."""
    return {name[:-len(".deleted")] if name.endswith(".deleted") else name:
            "tombstone" if name.endswith(".deleted") else "blob" for name in stored(store)}


def held(member, blob_id):
    """(kind, mtime ns) of what a member's disk holds of an id, or None."""
    for kind, path in (("blob", member.path(blob_id)),
                       ("tombstone", member.path(blob_id) + ".deleted")):
        try:
            return kind, os.stat(path).st_mtime_ns
        except FileNotFoundError:
            pass
    return None


def fetch(sos, blob_id):
    """(status, bytes); status None if the transfer was cut short, as the
    sos-server does when a large copy turns out rotten as it streams."""
    try:
        status, _, data = sos.fetch(blob_id)
        return status, data
    except (OSError, http.client.HTTPException):
        return None, None


def test_soak_kill_9_mid_upload(procs, figures, rng):
    end = budget("kill")
    srv = procs.blob()
    attempted, acknowledged, verified = {}, {}, set()
    lock = threading.Lock()
    trials = violations = 0
    lost = set()
    while time.monotonic() < end:
        trials += 1
        uploaders = [Uploader(srv.url, random.Random(rng.random()), attempted,
                              acknowledged, lock) for _ in range(3)]
        for u in uploaders:
            u.start()
        time.sleep(rng.uniform(0.01, 0.4))
        srv.kill()
        for u in uploaders:
            u.stop.set()
            u.join(30)
        srv.start()
        v, gone, _ = check_store(srv, acknowledged, attempted, verified)
        violations += v
        lost |= gone
    v, gone, _ = check_store(srv, acknowledged, attempted)
    lost |= gone
    figures.add(4, trials, violations + v, len(lost), rng.seed_value,
                note="soak: %d acknowledged" % len(acknowledged))
    assert violations + v == 0 and not lost


def test_soak_round_trip_up_to_64_mib(procs, figures, rng):
    end = budget("round-trip")
    c = procs.cluster((("g1", 2),))
    cases = bad = 0
    while time.monotonic() < end:
        cases += 1
        size = rng.choice((0, 1, rng.randrange(1 << 20), rng.randrange(64 << 20)))
        body = rng.randbytes(size)
        headers = {"X-Case": str(cases), "X-Mime-Type": "a/b"}
        status, reply = c.sos.upload(body, headers)
        got = c.sos.fetch(sha1(body))
        bad += status != 200 or got[0] != 200 or got[2] != body
    figures.add(1, cases, bad, seed=rng.seed_value, note="soak: up to 64 MiB")
    assert bad == 0


def test_soak_fuzz(procs, figures, rng):
    end = budget("fuzz")
    blob = procs.blob()
    sos = procs.sos([("g1", [blob])], "--copies", "1")
    cases = 0
    bad = []
    strategy = st.one_of(mutated(), st.binary(max_size=600))
    warnings.simplefilter("ignore", NonInteractiveExampleWarning)
    while time.monotonic() < end:
        data = strategy.example()
        for url in (blob.url, sos.up, sos.down):
            cases += 1
            problems = judge(responses(url, data))
            if problems:
                bad.append((data, problems))
    figures.add(17, cases, len(bad), note="soak")
    assert bad == []
