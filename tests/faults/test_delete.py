"""Rows 22-26: deletes under faults (issue 14).

In a store that heals itself, a delete is undone by anti-entropy unless its
tombstone outlives every stale copy, and a re-upload is lost if an old
tombstone beats it.  Last-writer-wins per id, with the sos-server's time on
every write, is what must hold through members that were away, two
sos-servers racing, kill -9 and a crash at every syscall of the delete path:

    D1 an acknowledged delete is never undone: after replicate no member
       holds or serves the bytes, and fetch is 404 ("acked deletes
       resurrected")
    D2 an acknowledged upload newer than a delete survives it ("acked
       uploads lost")
    D3 after replicate every member of a group is in the same state per id
    D4 an interrupted delete leaves the blob whole (hash = id) or deleted,
       never torn, and no debris that lists or serves as a blob
"""

import collections
import os
import random
import re
import threading
import time

import pytest

from . import kit
from support import get_json, raw_exchange, replicate_process, sha1, summary_total, wait_for

from .kit import scaled

TOKEN = "fault-suite-delete-token"

LEAF_NAME = re.compile(r"^[0-9a-z]+(\.json|\.deleted)?$")


# --- Helpers -------------------------------------------------------------------

class Tracer(kit.Tracer):
    """kit.Tracer, but a thread that ends while it is being looked at (the
    handler of the previous request) is not an error: look again."""

    def attached(self):
        try:
            return super().attached()
        except ProcessLookupError:
            return False


def token_file(tmp_path):
    path = tmp_path / "delete.token"
    path.write_text(TOKEN + "\n")
    return str(path)


def delete(sos, blob_id, timeout=60):
    """DELETE /fetch/<id> on a sos-server's upload port: (status, JSON reply)."""
    return get_json(sos.up + "/fetch/" + blob_id, "DELETE", None,
                        {"Authorization": "Bearer " + TOKEN}, timeout)


def blob_delete_bytes(blob_id, timestamp=None):
    head = "DELETE /blob/%s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n" % blob_id
    if timestamp is not None:
        head += "X-Sos-Timestamp: %d\r\n" % timestamp
    return (head + "\r\n").encode()


def states(member):
    """{id: (kind, timestamp)} of every blob and tombstone a blob-server lists."""
    status, rows = get_json(member.url + "/blobs?state=1")
    assert status == 200, status
    return {blob_id: (kind, ts) for blob_id, ts, kind in rows}


def leaf_debris(store):
    """Names in a store's leaf directories that are neither a blob, its
    sidecar nor a tombstone (a temp file left where listings look)."""
    out = []
    for d1 in os.listdir(store):
        p1 = os.path.join(store, d1)
        if d1.startswith(".") or not os.path.isdir(p1):
            continue
        for d2 in os.listdir(p1):
            p2 = os.path.join(p1, d2)
            if os.path.isdir(p2):
                out += [os.path.join(d1, d2, n) for n in os.listdir(p2)
                        if not LEAF_NAME.match(n)]
    return out


def served(member, blob_id):
    """What one blob-server says of an id: 'gone' (404), 'whole' (200 with
    bytes hashing to the id) or a description of what is wrong."""
    status, _, data = member.get(blob_id)
    if status == 404:
        return "gone"
    if status == 200 and sha1(data) == blob_id:
        return "whole"
    return "%d with %d bytes (sha1 %s)" % (status, len(data), sha1(data)[:12])


def upload_all(sos, bodies):
    """Upload through sos; every upload must be acknowledged: {id: body}."""
    out = {}
    for body in bodies:
        status, reply = sos.upload(body)
        assert status == 200, reply
        out[reply["id"]] = body
    return out


def random_bodies(rng, n, sizes=(1, 3000, 70000)):
    return [rng.randbytes(rng.choice(sizes)) + b"%d" % i for i in range(n)]


# --- Row 22: a member away during a delete ---------------------------------------------

def test_a_member_away_during_deletes_gets_them_from_replicate_and_none_comes_back(
        procs, figures, rng, tmp_path):
    c = procs.cluster((("g1", 2), ("g2", 2)), "--delete-token", token_file(tmp_path))
    n = scaled(20)
    blobs = upload_all(c.sos, random_bodies(rng, n))
    away = rng.choice(c.members)
    stale = [i for i in blobs if os.path.exists(away.path(i))]
    away.kill()
    bad = []
    for blob_id in blobs:
        status, reply = delete(c.sos, blob_id)
        if status != 202 or reply.get("pending") != [away.url]:
            bad.append("%s: delete with %s away answered %d %s"
                       % (blob_id, away.url, status, reply))
    # Back with its stale copies; until replicate runs it may serve them.
    away.start()
    status, out, err = replicate_process(c.config())
    if status != 0:
        bad.append("replicate exited %d: %s" % (status, err[-1000:]))
    propagated = summary_total(out, "deleted")
    resurrected = []
    for blob_id in blobs:
        where = ["%s %s" % (m.url, served(m, blob_id)) for m in c.members
                 if os.path.exists(m.path(blob_id)) or served(m, blob_id) != "gone"]
        fetched = c.sos.fetch(blob_id)[0]
        if where or fetched != 404:
            resurrected.append("%s: deleted, yet fetch %d, on %s" % (blob_id, fetched, where))
    kinds = {m.url: states(m) for m in c.members}
    for g, members in c.groups.items():
        for blob_id in blobs:
            seen = {kinds[m.url].get(blob_id, ("absent",))[0] for m in members}
            if seen != {"tombstone"}:
                bad.append("%s: group %s members hold %s after replicate"
                           % (blob_id, g, sorted(seen)))
    status, out, err = replicate_process(c.config())
    if status != 0 or summary_total(out, "copied") or summary_total(out, "deleted"):
        bad.append("a second replicate exited %d, copied %d, deleted %d"
                   % (status, summary_total(out, "copied"), summary_total(out, "deleted")))
    # The client may repeat the DELETE until it gets 200: now it does.
    for blob_id in blobs:
        status, reply = delete(c.sos, blob_id)
        if status != 200 or reply.get("status") != "deleted":
            bad.append("%s: repeated DELETE with every member up: %d %s"
                       % (blob_id, status, reply))
    figures.add(22, n, len(bad) + len(resurrected), len(resurrected), rng.seed_value,
                "acked deletes resurrected: %d of %d; %d stale copies came back, "
                "replicate deleted %d" % (len(resurrected), n, len(stale), propagated))
    assert not resurrected
    assert not bad
    assert stale, "the member away held no copy: the test tested nothing"
    assert propagated >= len(stale)


# --- Row 23: delete, then re-upload while a member is away ----------------------------

def test_a_re_upload_after_a_delete_survives_a_member_away_and_replicate(
        procs, figures, rng, tmp_path):
    """The member away holds a tombstone older than the re-upload: in g2 (3
    members) the re-upload still lands in its home group beside that
    tombstone, which replicate must overwrite; with a g1 member away it is
    diverted to g2 while g1 keeps only tombstones, and fetch must fall
    through them."""
    c = procs.cluster((("g1", 2), ("g2", 3)), "--delete-token", token_file(tmp_path))
    n = scaled(10)
    bad, lost = [], []
    trials = 0
    for g, members in c.groups.items():
        blobs = upload_all(c.sos, random_bodies(rng, n))
        for blob_id in blobs:
            status, reply = delete(c.sos, blob_id)
            if status != 200:
                bad.append("%s: delete with every member up: %d %s" % (blob_id, status, reply))
        away = rng.choice(members)
        away.kill()
        for blob_id, body in blobs.items():
            status, reply = c.sos.upload(body)
            if status != 200:
                bad.append("%s: re-upload with %s away: %d %s" % (blob_id, away.url, status, reply))
        away.start()
        status, out, err = replicate_process(c.config())
        if status != 0:
            bad.append("replicate exited %d: %s" % (status, err[-1000:]))
        kinds = {m.url: states(m) for m in c.members}
        for blob_id, body in blobs.items():
            trials += 1
            status, _, data = c.sos.fetch(blob_id)
            if status != 200 or data != body:
                lost.append("%s: re-uploaded with %s away, then fetch %d" % (blob_id, away.url, status))
            for group, ms in c.groups.items():
                seen = {kinds[m.url].get(blob_id, ("absent",))[0] for m in ms}
                if len(seen) != 1:
                    bad.append("%s: group %s disagrees after replicate: %s"
                               % (blob_id, group, sorted(seen)))
                elif seen == {"blob"}:
                    bad += ["%s on %s: %s" % (blob_id, m.url, served(m, blob_id))
                            for m in ms if served(m, blob_id) != "whole"]
    figures.add(23, trials, len(bad) + len(lost), len(lost), rng.seed_value,
                "acked uploads lost: %d of %d" % (len(lost), trials))
    assert not lost
    assert not bad


# --- Row 24: uploads and deletes racing from two sos-servers, members killed ----------

class Op:
    """One client operation and what the client saw of it."""

    def __init__(self, kind, blob_id, front):
        self.kind, self.blob_id, self.front = kind, blob_id, front
        self.start = time.monotonic()
        self.end = None
        self.status = None

    def done(self, status):
        self.status = status
        self.end = time.monotonic()

    @property
    def acknowledged(self):
        if self.kind == "upload":
            return self.status == 200
        return self.status in (200, 202)

    def __repr__(self):
        return "%s via %s: %s" % (self.kind, self.front, self.status)


def outcomes(ops):
    """The states ("blob" or "gone") an id may end in after its operations.

    Each write carries the time its sos-server took it, within the client's
    interval, and the newest write that was recorded anywhere wins.  So the
    winner is an operation after whose end no acknowledged one began (an
    acknowledged operation is recorded, and newer); unacknowledged ones may
    have been recorded, or not.  No operation: never stored."""
    last = [o for o in ops if not any(p.acknowledged and p.start > o.end for p in ops)]
    return {"blob" if o.kind == "upload" else "gone" for o in last} or {"gone"}


class Race:
    """Four clients, two per sos-server, uploading and deleting a few ids
    at random over the same blob-servers, recording every operation."""

    def __init__(self, fronts, bodies, rng):
        self.fronts, self.bodies, self.rng = fronts, bodies, rng
        self.ids = sorted(bodies)
        self.ops = []
        self.errors = []
        self.lock = threading.Condition()

    def run(self, members, kills):
        """Race while one member at a time dies after a few operations and
        comes back a few operations later (more finish while it starts), so
        operations meet a member dying, away, or just back."""
        stop = threading.Event()
        threads = [threading.Thread(target=self.work, args=(w, random.Random(self.rng.random()),
                                                            stop), daemon=True)
                   for w in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(kills):
                victim = self.rng.choice(members)
                self.wait_ops(self.rng.randrange(1, 5))
                victim.kill()
                self.wait_ops(self.rng.randrange(1, 5))
                victim.start()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert all(o.end is not None for o in self.ops), "a client is stuck"

    def work(self, w, r, stop):
        front = self.fronts[w % 2]
        while not stop.is_set():
            blob_id = r.choice(self.ids)
            op = Op(r.choice(("upload", "delete")), blob_id, w % 2)
            with self.lock:
                self.ops.append(op)
            try:
                if op.kind == "upload":
                    status, reply = front.upload(self.bodies[blob_id])
                else:
                    status, reply = delete(front, blob_id)
            except OSError as e:
                status, reply = None, str(e)
            op.done(status)
            if status not in (200, 202) or (op.kind == "upload" and status != 200):
                self.errors.append("%r answered %s %s" % (op, status, reply))
            with self.lock:
                self.lock.notify_all()

    def finished(self):
        return sum(o.end is not None for o in self.ops)

    def wait_ops(self, n):
        with self.lock:
            at = self.finished() + n
            if not self.lock.wait_for(lambda: self.finished() >= at, 60):
                raise AssertionError("the clients stalled at %d operations" % self.finished())


def test_uploads_and_deletes_racing_from_two_sos_servers_with_member_kills_converge(
        procs, figures, rng, tmp_path):
    token = token_file(tmp_path)
    groups = [(g, [procs.blob("%s-%d" % (g, i)) for i in range(2)]) for g in ("g1", "g2")]
    members = [m for _, ms in groups for m in ms]
    fronts = [procs.sos(groups, "--delete-token", token, name="sos%d" % i) for i in range(2)]
    race = Race(fronts, {sha1(b): b for b in random_bodies(rng, 10, (1, 2000, 40000))}, rng)
    rounds, kills = 3, scaled(4)
    bad, resurrected, lost = [], [], []
    known = disagree = 0
    for r in range(rounds):
        race.run(members, kills)
        status, out, err = replicate_process(fronts[0].config)
        if status != 0:
            bad.append("round %d: replicate exited %d: %s" % (r, status, err[-1000:]))
        # D3: one state per id in each group; blobs whole; no debris.
        kinds = {m.url: states(m) for m in members}
        for g, ms in groups:
            for blob_id in race.ids:
                seen = {kinds[m.url].get(blob_id, ("absent",))[0] for m in ms}
                if len(seen) != 1:
                    disagree += 1
                    bad.append("round %d: %s: group %s disagrees: %s" % (
                        r, blob_id, g, {m.url: kinds[m.url].get(blob_id) for m in ms}))
                bad += ["round %d: %s on %s: %s" % (r, blob_id, m.url, served(m, blob_id))
                        for m in ms if served(m, blob_id) not in ("whole", "gone")]
        for m in members:
            bad += ["round %d: %s lists %s, never uploaded" % (r, m.url, i)
                    for i in kinds[m.url] if i not in race.bodies]
            try:
                wait_for(lambda: not m.tmp_files(), 15, what="temp files to go")
            except AssertionError:
                bad.append("round %d: %s kept temp files %s" % (r, m.url, m.tmp_files()))
        # D1, D2: where the newest write is known, both sos-servers show it.
        for blob_id in race.ids:
            mine = [o for o in race.ops if o.blob_id == blob_id]
            answers = [f.fetch(blob_id)[::2] for f in fronts]
            fetched = [st for st, _ in answers]
            for status, data in answers:
                if status not in (200, 404) or (status == 200 and data != race.bodies[blob_id]):
                    bad.append("round %d: %s: fetch %d (%d bytes)" % (r, blob_id, status, len(data)))
            if fetched[0] != fetched[1]:
                bad.append("round %d: %s: the sos-servers disagree: %s" % (r, blob_id, fetched))
            may = outcomes(mine)
            if len(may) > 1:
                continue
            known += 1
            if may == {"gone"} and fetched != [404, 404]:
                resurrected.append("round %d: %s: after %s, fetch %s" % (r, blob_id, mine[-3:], fetched))
            if may == {"blob"} and fetched != [200, 200]:
                lost.append("round %d: %s: after %s, fetch %s" % (r, blob_id, mine[-3:], fetched))
    bad += race.errors
    answered = collections.Counter("%s %s" % (o.kind, o.status) for o in race.ops)
    figures.add(24, len(race.ops), len(bad) + len(resurrected) + len(lost),
                len(resurrected) + len(lost), rng.seed_value,
                "acked deletes resurrected: %d, acked uploads lost: %d (of %d checks where the "
                "newest write is known); %d kills; %s; %d group disagreements"
                % (len(resurrected), len(lost), known, rounds * kills,
                   ", ".join("%s: %d" % kv for kv in sorted(answered.items())), disagree))
    assert not resurrected
    assert not lost
    assert not bad
    assert known, "no id's newest write was known: the test tested nothing"


# --- Row 25: kill -9 in the middle of deletes ----------------------------------------------

def check_deletes(srv, uploaded, acknowledged, attempted):
    """Violations of D1 and D4 on a (restarted) blob-server, as messages.

    uploaded: {id: body} stored before the deletes; acknowledged: ids whose
    DELETE was answered 200; attempted: ids a DELETE was sent for."""
    bad = []
    listed = set(srv.ids())
    kinds = states(srv)
    for blob_id in uploaded:
        now = served(srv, blob_id)
        if blob_id in acknowledged:
            if now != "gone" or blob_id in listed or os.path.exists(srv.path(blob_id)):
                bad.append("%s: delete acknowledged, then %s after a restart" % (blob_id, now))
            elif kinds.get(blob_id, ("absent",))[0] != "tombstone":
                bad.append("%s: delete acknowledged, then no tombstone: %s"
                           % (blob_id, kinds.get(blob_id)))
        elif now not in ("whole", "gone") or (now == "gone") != (blob_id not in listed):
            bad.append("%s: %s, %s" % (blob_id, now, "listed" if blob_id in listed else
                                       "not listed"))
        elif blob_id not in attempted and now != "whole":
            bad.append("%s: never deleted, yet %s" % (blob_id, now))
    bad += ["listed but never uploaded: %s" % i for i in listed - set(uploaded)]
    bad += ["debris in a leaf directory: %s" % n for n in leaf_debris(srv.store)]
    if srv.tmp_files():
        bad.append("temp files after a restart: %s" % srv.tmp_files())
    return bad


def test_kill_9_mid_delete_never_undoes_an_acknowledged_delete_nor_tears_a_blob(
        procs, figures, rng):
    srv = procs.blob()
    trials = scaled(6)
    bad = []
    counts = {"acknowledged": 0, "interrupted": 0}
    for trial in range(trials):
        uploaded = {}
        for body in random_bodies(rng, scaled(30), (0, 1, 5000, 300000)):
            meta = {"X-Trial": str(trial)} if rng.random() < 0.5 else {}
            assert srv.post(sha1(body), body, meta)[0] == 200
            uploaded[sha1(body)] = body
        ids = list(uploaded)
        rng.shuffle(ids)
        acknowledged, attempted = set(), set()
        done = threading.Condition()

        def deleter(share, r):
            for blob_id in share:
                attempted.add(blob_id)
                stamp = time.time_ns() if r.random() < 0.5 else None
                try:
                    resp = raw_exchange(srv.url, blob_delete_bytes(blob_id, stamp), 10)
                except OSError:
                    return                   # the server died under us
                if resp is None or not resp.complete:
                    return
                with done:
                    if resp.status == 200:
                        acknowledged.add(blob_id)
                    else:
                        bad.append("trial %d: %s: DELETE answered %d" % (trial, blob_id, resp.status))
                    done.notify_all()
        # Two thirds of the ids get a DELETE, from three threads at once.
        targets = ids[:2 * len(ids) // 3]
        threads = [threading.Thread(target=deleter, args=(targets[k::3], random.Random(rng.random())),
                                    daemon=True)
                   for k in range(3)]
        for t in threads:
            t.start()
        # The fault's moment: after a random number of acknowledged deletes.
        at = rng.randrange(1, len(targets) // 2)
        with done:
            done.wait_for(lambda: len(acknowledged) >= at or
                          not any(t.is_alive() for t in threads), 30)
        srv.kill()
        for t in threads:
            t.join(30)
        srv.start()
        bad += ["trial %d: %s" % (trial, b)
                for b in check_deletes(srv, uploaded, acknowledged, attempted)]
        counts["acknowledged"] += len(acknowledged)
        counts["interrupted"] += len(attempted - acknowledged)
        # The next trial starts from an empty store.
        for blob_id in uploaded:
            status, _ = get_json(srv.url + "/blob/" + blob_id, "DELETE")
            assert status == 200
    undone = [b for b in bad if "acknowledged, then" in b]
    figures.add(25, trials, len(bad), len(undone), rng.seed_value,
                "acked deletes undone: %d of %d; %d deletes cut short"
                % (len(undone), counts["acknowledged"], counts["interrupted"]))
    assert counts["acknowledged"], "no delete completed before the kills: the test tested nothing"
    assert not bad


# --- Row 26: SIGKILL at the k-th call of each syscall the delete path makes ------------

DELETE_SYSCALLS = ("openat", "write", "fsync", "fdatasync", "utimensat", "renameat",
                   "linkat", "unlinkat", "mkdirat", "sendto")
DELETE_CASES = ("a blob with metadata", "an id never stored")


class DeleteSweep:
    """Deletes on one blob-server, each with strace killing it at the k-th
    call of a syscall in the thread that handles the DELETE (strace counts
    per thread; every connection gets a new thread)."""

    def __init__(self, srv, case, rng):
        self.srv, self.case, self.rng = srv, case, rng
        self.uploaded, self.acknowledged, self.attempted = {}, set(), set()
        self.trials = self.killed = 0
        self.bad, self.seen = [], set()

    def target(self):
        """A fresh id to delete: a stored blob with a sidecar, or an id
        never stored whose directories don't exist yet."""
        while True:
            body = self.rng.randbytes(self.rng.choice((1, 5000)))
            blob_id = sha1(body)
            if not os.path.exists(os.path.join(self.srv.store, blob_id[:2])):
                break
        if self.case == "a blob with metadata":
            assert self.srv.post(blob_id, body, {"X-Owner": "sweep"})[0] == 200
            self.uploaded[blob_id] = body
        return blob_id

    def trial(self, syscall, k):
        """One DELETE with a kill at the k-th syscall; False once k is past
        the number of calls (the delete completed and the server lives)."""
        self.trials += 1
        blob_id = self.target()
        self.attempted.add(blob_id)
        ok, restarted = kit.strike(self.srv, syscall, k,
                                   blob_delete_bytes(blob_id, time.time_ns()), self.bad)
        if ok:
            self.acknowledged.add(blob_id)
        if restarted:
            self.killed += 1
        # A bad store stays bad: each fault is counted once, where first seen.
        for b in self.check(blob_id):
            if b not in self.seen:
                self.seen.add(b)
                self.bad.append("%s k=%d: %s" % (syscall, k, b))
        return restarted

    def check(self, blob_id):
        if self.uploaded:
            return check_deletes(self.srv, self.uploaded, self.acknowledged, self.attempted)
        bad = []
        now = served(self.srv, blob_id)
        if now != "gone" or blob_id in self.srv.ids():
            bad.append("%s: never stored, deleted, then %s" % (blob_id, now))
        if blob_id in self.acknowledged and \
                states(self.srv).get(blob_id, ("absent",))[0] != "tombstone":
            bad.append("%s: delete acknowledged, then no tombstone" % blob_id)
        bad += ["debris in a leaf directory: %s" % n for n in leaf_debris(self.srv.store)]
        if self.srv.tmp_files():
            bad.append("temp files: %s" % self.srv.tmp_files())
        return bad


@pytest.mark.parametrize("case", DELETE_CASES)
def test_a_kill_at_every_step_of_a_delete_leaves_the_blob_whole_or_deleted(
        procs, figures, rng, case):
    sweep = DeleteSweep(procs.blob(), case, rng)
    calls = kit.kill_at_every_call(sweep, DELETE_SYSCALLS)
    print("calls per delete:", calls)
    undone = [b for b in sweep.bad if "acknowledged, then" in b]
    figures.add(26, sweep.trials, len(sweep.bad), len(undone), rng.seed_value,
                "%s: %d kills; acked deletes undone: %d of %d"
                % (case, sweep.killed, len(undone), len(sweep.acknowledged)))
    assert sweep.killed >= 3, "strace never killed the server: %s" % calls
    assert not sweep.bad
