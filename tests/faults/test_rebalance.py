"""Rows 27-33: the cluster changes shape under faults (issue 20).

`replicate --rebalance` moves every blob and tombstone that lives outside
its placement group into it: copy to the placement group, then remove from
the old group exactly the version it listed.  These rows stop it, take
members away on both sides, race it with writers of either configuration
and with a fetch, fill the placement group and drain a group with a member
down, and check:

    M1 no acknowledged blob is ever lost: at every moment some member holds
       it whole, and the new configuration's sos-server serves its bytes
    M2 a source member's copy goes only once every member of the placement
       group holds the id (every group here has 2 members, --copies 2)
    M3 after the faults heal and a rerun, every blob and tombstone is in its
       placement group only, on every member ("left in two groups")
    M4 no acknowledged delete comes back, no acknowledged upload is undone
    M5 what cannot move (a member down, a full group) is reported: exit 1,
       the moves table's failed/left columns, "draining: ... run again"
    M6 a fetch never fails because of a move (issue 20: "reads never fail
       during a move")
"""

import itertools
import os
import random
import signal
import subprocess
import threading
import time

from support import PYTHON, ROOT, get_json, sha1, summary, wait_for

from . import kit
from .kit import scaled

from cluster import Group, placement
from rebalance import Mover
from replicate import Replicator
from upstream import Pool

TOKEN = "fault-suite-rebalance-token"
NS = 10 ** 9
SERIAL = itertools.count()       # makes every body (so every id) of a session new


# --- Helpers -------------------------------------------------------------------

def write_config(path, groups):
    """A configuration file: groups is [(name, [member], weight)]; its path."""
    with open(path, "w") as f:
        for name, members, weight in groups:
            f.write("[%s]\nweight = %g\n" % (name, weight))
            f.writelines("- : %s\n" % m.url for m in members)
    return str(path)


def shape(groups):
    """The cluster.Group list placement() ranks (names and weights count)."""
    return [Group(name, [m.url for m in members], weight) for name, members, weight in groups]


def home(blob_id, groups):
    """The name of blob_id's placement group."""
    return placement(blob_id, shape(groups))[0].name


def new_body(rng, sizes=(1, 3000, 40000)):
    """Random bytes of one of the sizes (give or take a few), never seen before."""
    return rng.randbytes(rng.choice(sizes)) + b"%d" % next(SERIAL)


def bodies_for(rng, groups, group, n, sizes=(1, 3000, 40000)):
    """n new random bodies whose placement group (in groups) is `group`."""
    out = []
    while len(out) < n:
        body = new_body(rng, sizes)
        if home(sha1(body), groups) == group:
            out.append(body)
    return out


def put(members, body, ts):
    """Store body on each member, as written at ts."""
    for m in members:
        status, _, reply = m.post(sha1(body), body, {"X-Sos-Timestamp": str(ts)})
        assert status == 200, (m.url, status, reply)


def tombstone(members, blob_id, ts):
    for m in members:
        status, reply = get_json(m.url + "/blob/" + blob_id, "DELETE", None,
                                     {"X-Sos-Timestamp": str(ts)})
        assert status == 200, (m.url, status, reply)


def held(member, blob_id):
    """What a member's store holds of an id, read from its disk (the member
    may be down): "blob" (whole: its bytes hash to the id), "torn",
    "tombstone" or None."""
    path = member.path(blob_id)
    try:
        with open(path, "rb") as f:
            return "blob" if sha1(f.read()) == blob_id else "torn"
    except FileNotFoundError:
        return "tombstone" if os.path.exists(path + ".deleted") else None


class Rebalance:
    """replicate --rebalance as a real process; its --verbose log is read
    as it runs, so the test can strike after the k-th step of the moves
    (a copy made, or a removal from the old group)."""

    STEP = ("copied ", "?moved=")

    def __init__(self, config, *args):
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(ROOT, "replicate.py"), "--config", config,
             "--rebalance", "--verbose"] + list(args),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.steps = 0
        self.err = []
        self.out = ""
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.seen:
                self.err.append(line)
                self.steps += any(s in line for s in self.STEP)
                self.seen.notify_all()
        with self.seen:
            self.seen.notify_all()

    def after(self, k, timeout=60):
        """Wait until k steps were logged or the run ended; True if k were."""
        with self.seen:
            self.seen.wait_for(lambda: self.steps >= k or not self.reader.is_alive(),
                               timeout)
            return self.steps >= k

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        return self.wait()

    def wait(self, timeout=120):
        self.out = self.proc.stdout.read()
        status = self.proc.wait(timeout)
        self.reader.join(timeout)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return status

    def log(self):
        return "".join(self.err)[-3000:]


def rebalance(config, *args):
    """Run replicate --rebalance to the end: (exit status, stdout, stderr)."""
    run = Rebalance(config, *args)
    status = run.wait()
    return status, run.out, run.log()


def in_neither(groups, blobs, sos):
    """M1 now: ids of blobs that no member holds whole, or that the sos-server
    doesn't serve with their bytes, as messages."""
    members = [m for _, ms, _ in groups for m in ms]
    bad = []
    for blob_id, body in blobs.items():
        if not any(held(m, blob_id) == "blob" for m in members):
            bad.append("%s: held whole by no member" % blob_id)
        status, _, data = sos.fetch(blob_id)
        if status != 200 or data != body:
            bad.append("%s: fetch %d (%d bytes)" % (blob_id, status, len(data)))
    return bad


def removed_early(source, target, ids):
    """M2 now: ids gone from some source member while a target member
    lacks them, as messages."""
    return ["%s: gone from %s while %s holds %s" % (
        i, [m.url for m in source if held(m, i) is None],
        [m.url for m in target if held(m, i) is None], [held(m, i) for m in target])
        for i in ids if any(held(m, i) is None for m in source)
        and any(held(m, i) is None for m in target)]


def misplaced(groups, expected):
    """M3: expected is {id: "blob" or "tombstone"}; messages for every id
    not held by exactly the members of its placement group, as expected."""
    bad = []
    for blob_id, kind in expected.items():
        want = home(blob_id, groups)
        for name, members, _ in groups:
            there = [held(m, blob_id) for m in members]
            if name == want and there != [kind] * len(members):
                bad.append("%s (%s): its placement group %s holds %s" % (
                    blob_id, kind, name, there))
            elif name != want and any(there):
                bad.append("%s (%s): left in %s: %s" % (blob_id, kind, name, there))
    return bad


def served(sos, blobs, deleted, gone=(404,)):
    """M1/M4 through a sos-server: every blob with its bytes, every deleted
    id answered one of `gone` (with a member down, 503 says "can't tell",
    not "here it is")."""
    bad = []
    for blob_id, body in blobs.items():
        status, _, data = sos.fetch(blob_id)
        if status != 200 or data != body:
            bad.append("%s: lost: fetch %d (%d bytes)" % (blob_id, status, len(data)))
    for blob_id in deleted:
        status = sos.fetch(blob_id)[0]
        if status not in gone:
            bad.append("%s: deleted, yet fetch %d" % (blob_id, status))
    return bad


def cluster(procs, layout):
    """Groups of blob.py processes: layout is [(name, size, weight)];
    returns [(name, [BlobServer], weight)]."""
    return [(name, [procs.blob("%s-%d" % (name, i)) for i in range(size)], weight)
            for name, size, weight in layout]


# --- Row 27: kill -9 of replicate --rebalance mid-move ---------------------------

def test_a_rebalance_killed_at_any_point_loses_nothing_and_a_rerun_finishes_it(
        procs, figures, rng, tmp_path):
    """Every trial writes new blobs and tombstones into a random group (as
    the old configuration, or a diversion, would), starts a rebalance and
    kills it after a random number of steps, or at once.  Between the kill
    and the rerun every blob is somewhere whole and served; after the rerun
    every id is in its placement group only."""
    groups = cluster(procs, [("g1", 2, 1), ("g2", 2, 1)])
    config = write_config(tmp_path / "new.conf", groups)
    sos = procs.sos([(n, ms) for n, ms, _ in groups])
    trials = scaled(5)
    blobs, deleted = {}, set()
    bad, lost = [], []
    killed = mid = 0
    ts = time.time_ns() - 60 * NS
    for trial in range(trials):
        for _ in range(12):
            name, members, _ = rng.choice(groups)
            body = new_body(rng)
            ts += 1000
            put(members, body, ts)
            if rng.random() < 0.25:
                ts += 1000
                tombstone(members, sha1(body), ts)
                deleted.add(sha1(body))
            else:
                blobs[sha1(body)] = body
        run = Rebalance(config, "--jobs", str(rng.choice((1, 4))))
        k = rng.randrange(0, 12)
        struck = run.after(k)
        status = run.kill()
        killed += status == -signal.SIGKILL
        mid += struck and k > 0 and status == -signal.SIGKILL
        # Between the kill and the rerun (M1): reads never fail.
        lost += ["trial %d, killed after %d steps: %s" % (trial, k, b)
                 for b in in_neither(groups, blobs, sos)]
        status, out, err = rebalance(config)
        if status != 0:
            bad.append("trial %d: rerun exited %d\n%s\n%s" % (trial, status, out, err))
        expected = dict({i: "blob" for i in blobs}, **{i: "tombstone" for i in deleted})
        bad += ["trial %d: %s" % (trial, b) for b in misplaced(groups, expected)]
        lost += ["trial %d: %s" % (trial, b) for b in served(sos, blobs, deleted)]
    for _, members, _ in groups:
        for m in members:
            wait_for(lambda: not m.tmp_files(), 15, what="%s's temp files to go" % m.url)
    figures.add(27, trials, len(bad) + len(lost), len(lost), rng.seed_value,
                "%d runs killed (%d after a step of a move); acked blobs lost: %d of %d, "
                "left in two groups or unplaced: %d" % (killed, mid, len(lost), len(blobs),
                                                        len(bad)))
    assert not lost
    assert not bad
    assert mid, "no run was killed mid-move: the test tested nothing"


# --- Rows 28, 29: a member of the placement group / of the old group down -----------

def member_down_during_move(procs, rng, tmp_path, side):
    """g1 holds blobs (and a few tombstones) whose placement group is g2; a
    member of g2 (side "target") or of g1 ("source") is killed after a random
    number of steps of a rebalance at --rate 50.  Returns (trials, bad, lost,
    note)."""
    groups = cluster(procs, [("g1", 2, 1), ("g2", 2, 1)])
    (_, g1, _), (_, g2, _) = groups
    config = write_config(tmp_path / "new.conf", groups)
    sos = procs.sos([(n, ms) for n, ms, _ in groups])
    trials = scaled(3)
    blobs, deleted = {}, set()
    bad, lost = [], []
    failed = left = 0
    ts = time.time_ns() - 60 * NS
    for trial in range(trials):
        ids = []
        for body in bodies_for(rng, groups, "g2", 10):
            ts += 1000
            put(g1, body, ts)
            ids.append(sha1(body))
            if rng.random() < 0.2:
                ts += 1000
                tombstone(g1, sha1(body), ts)
                deleted.add(sha1(body))
            else:
                blobs[sha1(body)] = body
        victim = rng.choice(g2 if side == "target" else g1)
        run = Rebalance(config, "--rate", "50", "--jobs", "2")
        k = rng.randrange(0, 8)
        run.after(k)
        victim.kill()
        status = run.wait()
        table = summary(run.out, "moves")
        stayed = [i for i in ids if any(held(m, i) for m in g1)]
        # M5: what could not move is reported (as left, or its holder as
        # unreachable when it was down before the listing); M2: nothing
        # left g1 early.
        reported = table["g1"]["left"] or summary(run.out)["g1"]["unreachable"]
        if stayed and (status != 1 or not reported):
            bad.append("trial %d: %d ids stayed in g1, yet exit %d, moves %s"
                       % (trial, len(stayed), status, table))
        failed += table["g1"]["failed"]
        left += table["g1"]["left"]
        bad += ["trial %d: %s" % (trial, b) for b in removed_early(g1, g2, ids)]
        lost += ["trial %d, %s down: %s" % (trial, victim.url, b)
                 for b in in_neither(groups, blobs, sos)]
        # Still down: a rerun moves nothing more out of g1 than it may.
        status, out, err = rebalance(config)
        if status != 1:
            bad.append("trial %d: a rerun with %s down exited %d" % (trial, victim.url, status))
        bad += ["trial %d, rerun: %s" % (trial, b) for b in removed_early(g1, g2, ids)]
        victim.start()
        status, out, err = rebalance(config)
        if status != 0:
            bad.append("trial %d: a rerun with every member back exited %d\n%s\n%s"
                       % (trial, status, out, err))
        expected = dict({i: "blob" for i in blobs}, **{i: "tombstone" for i in deleted})
        bad += ["trial %d: %s" % (trial, b) for b in misplaced(groups, expected)]
        lost += ["trial %d: %s" % (trial, b) for b in served(sos, blobs, deleted)]
    return trials, bad, lost, "%s member killed mid-move %d times: %d moves failed, " \
        "%d left, all done after its return; acked blobs lost: %d of %d" % (
            side, trials, failed, left, len(lost), len(blobs))


def test_a_placement_group_member_down_mid_move_holds_the_move_up_and_loses_nothing(
        procs, figures, rng, tmp_path):
    trials, bad, lost, note = member_down_during_move(procs, rng, tmp_path, "target")
    figures.add(28, trials, len(bad) + len(lost), len(lost), rng.seed_value, note)
    assert not lost
    assert not bad


def test_an_old_group_member_down_mid_move_keeps_its_copy_until_a_rerun_after_its_return(
        procs, figures, rng, tmp_path):
    trials, bad, lost, note = member_down_during_move(procs, rng, tmp_path, "source")
    figures.add(29, trials, len(bad) + len(lost), len(lost), rng.seed_value, note)
    assert not lost
    assert not bad


# --- Row 30: writers of both configurations racing the move ------------------------------

def test_uploads_of_the_old_configuration_and_deletes_of_the_new_racing_a_move_are_kept(
        procs, figures, rng, tmp_path):
    """A sos-server still on the old configuration (g1 only) re-uploads ids
    that are being moved to g2, and one on the new configuration (g1, g2)
    deletes them, each id's operations one after another, while a
    rebalance runs; then a final rerun.  The last acknowledged operation of
    every id is what the new sos-server serves."""
    groups = cluster(procs, [("g1", 2, 1), ("g2", 2, 1)])
    (_, g1, _), (_, g2, _) = groups
    config = write_config(tmp_path / "new.conf", groups)
    token = tmp_path / "delete.token"
    token.write_text(TOKEN + "\n")
    old = procs.sos([("g1", g1)], name="old")
    new = procs.sos([("g1", g1), ("g2", g2)], "--delete-token", str(token), name="new")
    rounds = scaled(2)
    bad, lost, resurrected = [], [], []
    ops = 0
    for r in range(rounds):
        bodies = {sha1(b): b for b in bodies_for(rng, groups, "g2", 16)}
        for body in bodies.values():
            status, reply = old.upload(body)
            assert status == 200, reply
        last = dict.fromkeys(bodies, "upload")
        run = Rebalance(config, "--rate", "40", "--jobs", "4")
        ids = list(bodies)
        rng.shuffle(ids)
        errors = []

        counts = []

        def client(share, seed):
            r = random.Random(seed)
            while run.proc.poll() is None:
                for blob_id in share:
                    if r.random() < 0.5:
                        status, reply = old.upload(bodies[blob_id])
                        kind = "upload"
                    else:
                        status, reply = get_json(
                            new.up + "/fetch/" + blob_id, "DELETE", None,
                            {"Authorization": "Bearer " + TOKEN})
                        kind = "delete"
                    if status != 200:
                        errors.append("%s %s: %d %s" % (kind, blob_id, status, reply))
                    last[blob_id] = kind
                    counts.append(kind)
        threads = [threading.Thread(target=client, args=(ids[k::3], rng.random()),
                                    daemon=True) for k in range(3)]
        for t in threads:
            t.start()
        status = run.wait()
        for t in threads:
            t.join(60)
        ops += len(counts)
        bad += ["round %d: %s" % (r, e) for e in errors]
        if status not in (0, 1):
            bad.append("round %d: the racing rebalance exited %d" % (r, status))
        status, out, err = rebalance(config)
        if status != 0:
            bad.append("round %d: the final rerun exited %d\n%s\n%s" % (r, status, out, err))
        expected = {i: "blob" if k == "upload" else "tombstone" for i, k in last.items()}
        bad += ["round %d: %s" % (r, b) for b in misplaced(groups, expected)]
        for blob_id, kind in last.items():
            status, _, data = new.fetch(blob_id)
            if kind == "upload" and (status != 200 or data != bodies[blob_id]):
                lost.append("round %d: %s uploaded last, then fetch %d" % (r, blob_id, status))
            if kind == "delete" and status != 404:
                resurrected.append("round %d: %s deleted last, then fetch %d"
                                   % (r, blob_id, status))
    figures.add(30, ops, len(bad) + len(lost) + len(resurrected),
                len(lost) + len(resurrected), rng.seed_value,
                "%d uploads (old config) and deletes (new) racing moves; acked uploads "
                "lost: %d, acked deletes resurrected: %d" % (ops, len(lost), len(resurrected)))
    assert not lost
    assert not resurrected
    assert not bad
    assert ops, "no operation raced the move: the test tested nothing"


# --- Row 31: the placement group is full --------------------------------------------------

def test_a_full_placement_group_keeps_the_blob_where_it_is_and_says_so(
        procs, figures, rng, tmp_path):
    """g2's members refuse blobs: first with a reserve larger than any disk
    (every write 507), then with --max-size under the larger blobs (413).
    What can't move stays in g1, whole and served, and the run exits 1
    with it counted as failed and left; tombstones (no space needed) and
    small blobs move.  With the limits lifted a rerun moves the rest."""
    g1 = [procs.blob("g1-%d" % i) for i in range(2)]
    g2 = [procs.blob("g2-%d" % i, "--reserve", "1000T") for i in range(2)]
    groups = [("g1", g1, 1), ("g2", g2, 1)]
    config = write_config(tmp_path / "new.conf", groups)
    sos = procs.sos([("g1", g1), ("g2", g2)])
    n = scaled(8)
    small = bodies_for(rng, groups, "g2", n, (1, 500))
    large = bodies_for(rng, groups, "g2", n, (5000, 40000))
    gone = bodies_for(rng, groups, "g2", 2, (100,))
    ts = time.time_ns() - 60 * NS
    for body in small + large + gone:
        ts += 1000
        put(g1, body, ts)
    for body in gone:
        tombstone(g1, sha1(body), ts + 1)
    blobs = {sha1(b): b for b in small + large}
    deleted = {sha1(b) for b in gone}
    bad, lost = [], []

    def check(stage, status, out, stuck, expected_failed):
        table = summary(out, "moves")
        if status != 1 or table["g1"]["failed"] != expected_failed \
                or table["g1"]["left"] < expected_failed:
            bad.append("%s: exit %d, moves %s; %d blobs could not move"
                       % (stage, status, table, expected_failed))
        for blob_id in stuck:
            there = [held(m, blob_id) for m in g1 + g2]
            if there[:2] != ["blob", "blob"] or any(there[2:]):
                bad.append("%s: %s should stay in g1 only, held %s" % (stage, blob_id, there))
        for m in g2:
            if m.tmp_files():
                bad.append("%s: %s kept temp files %s" % (stage, m.url, m.tmp_files()))
        lost.extend("%s: %s" % (stage, b) for b in served(sos, blobs, deleted))

    status, out, err = rebalance(config)
    check("507", status, out, blobs, len(blobs))
    bad += ["507: %s" % b for b in misplaced(groups, {i: "tombstone" for i in deleted})]
    for m in g2:
        m.args = ["--workers", "1", "--max-size", "4000"]
        m.restart()
    status, out, err = rebalance(config)
    check("413", status, out, [sha1(b) for b in large], len(large))
    bad += ["413: %s" % b for b in misplaced(groups, {sha1(b): "blob" for b in small})]
    for m in g2:
        m.args = ["--workers", "1"]
        m.restart()
    status, out, err = rebalance(config)
    if status != 0:
        bad.append("with room: exit %d\n%s\n%s" % (status, out, err))
    expected = dict({i: "blob" for i in blobs}, **{i: "tombstone" for i in deleted})
    bad += ["with room: %s" % b for b in misplaced(groups, expected)]
    lost += ["with room: %s" % b for b in served(sos, blobs, deleted)]
    figures.add(31, 3 * len(blobs), len(bad) + len(lost), len(lost), rng.seed_value,
                "%d blobs refused by a full group (507), %d too large (413): stayed, "
                "reported; all moved once room was made; lost %d" % (
                    len(blobs), len(large), len(lost)))
    assert not lost
    assert not bad


# --- Row 32: draining a group with a member down -----------------------------------------

def test_draining_a_group_with_a_member_down_moves_what_it_can_and_empties_after_its_return(
        procs, figures, rng, tmp_path):
    groups = cluster(procs, [("old", 2, 0), ("new", 2, 1)])
    (_, old, _), (_, new, _) = groups
    config = write_config(tmp_path / "drain.conf", groups)
    sos = procs.sos([("old", old), ("new", new)])
    n = scaled(16)
    blobs, deleted = {}, set()
    ts = time.time_ns() - 60 * NS
    away = rng.choice(old)
    for i in range(n):
        body = new_body(rng)
        ts += 1000
        # A few only on the member that will be away (written while the
        # other was down, never synced).
        put([away] if i < n // 4 else old, body, ts)
        if i % 5 == 4:
            ts += 1000
            tombstone(old, sha1(body), ts)
            deleted.add(sha1(body))
        else:
            blobs[sha1(body)] = body
    only_away = [i for i in list(blobs) + list(deleted)
                 if all(held(m, i) is None for m in old if m is not away)]
    away.kill()
    bad, lost = [], []
    status, out, err = rebalance(config)
    table = summary(out, "moves")
    reachable = len(blobs) + len(deleted) - len(only_away)
    if status != 1 or "group old is draining: EMPTY" in out or \
            "1 member(s) unreachable: run again" not in out or \
            table["old"]["moved_out"] != reachable:
        bad.append("member down: exit %d, %d reachable ids, moves %s\n%s"
                   % (status, reachable, table, out))
    here = next(m for m in old if m is not away)
    left = [i for i in list(blobs) + list(deleted) if held(here, i)]
    if left:
        bad.append("the reachable member still holds %d ids" % len(left))
    bad += removed_early(old, new, [i for i in list(blobs) + list(deleted)
                                    if i not in only_away])
    lost += ["member down: %s" % b for b in served(
        sos, {i: b for i, b in blobs.items() if i not in only_away}, deleted, (404, 503))]
    away.start()
    lost += ["member back: %s" % b for b in served(sos, blobs, deleted)]
    status, out, err = rebalance(config)
    if status != 0 or "group old is draining: EMPTY" not in out:
        bad.append("member back: exit %d\n%s\n%s" % (status, out, err))
    for m in old:
        status, listed = get_json(m.url + "/blobs?state=1")
        if status != 200 or listed:
            bad.append("%s drained, yet lists %d %s" % (m.url, status, listed))
    expected = dict({i: "blob" for i in blobs}, **{i: "tombstone" for i in deleted})
    bad += misplaced(groups, expected)
    lost += ["drained: %s" % b for b in served(sos, blobs, deleted)]
    figures.add(32, n, len(bad) + len(lost), len(lost), rng.seed_value,
                "%d ids, %d only on the member down: %d moved at once, the rest after its "
                "return; EMPTY then; lost %d" % (n, len(only_away), reachable, len(lost)))
    assert only_away, "no id was only on the member away: the test tested nothing"
    assert not lost
    assert not bad


# --- Row 33: a fetch racing a move ---------------------------------------------------------

def test_a_fetch_racing_a_move_of_its_blob_still_finds_it(procs, figures, rng):
    """The sos-server asks the placement group (not there yet: 404), and
    is held up (strace delays its next request) while the whole move runs:
    copy into the placement group, removal from the old one.  Then it asks
    the old group: 404 there too.  The blob was in one group or the other
    at every moment, so the fetch must find it."""
    a, c = procs.blob("g1-0"), procs.blob("g2-0")
    groups = [("g1", [a], 1), ("g2", [c], 1)]
    sos = procs.sos([("g1", [a]), ("g2", [c])])
    trials = scaled(2)
    bad, hits = [], 0
    pool = Pool(timeout=30)
    ts = time.time_ns() - 60 * NS
    # Each fetch has a handler thread of its own, and strace counts per
    # thread: the 2nd request a fetch sends upstream (to g1, after g2's 404)
    # waits 1.5 s.  A fetch that finds its blob at the first ask is not held.
    tracer = kit.Tracer(sos.pid, "sendto:delay_enter=1500000:when=2", trace="sendto")
    try:
        for trial in range(trials):
            body = bodies_for(rng, groups, "g2", 1)[0]
            blob_id = sha1(body)
            ts += 1000
            put([a], body, ts)
            got = []
            fetcher = threading.Thread(target=lambda: got.append(sos.fetch(blob_id)[::2]),
                                       daemon=True)
            fetcher.start()
            wait_for(lambda: "GET /blob/%s " % blob_id in c.log() or got, 30,
                 what="the fetch to ask the placement group")
            mover = Mover(Replicator(pool, jobs=1), shape(groups), copies=1)
            moved = mover.run()["g1"]["moved_out"]
            raced = not got          # the move ended while the fetch was held up
            fetcher.join(60)
            if moved and raced:
                hits += 1
                status, data = got[0]
                if status != 200 or data != body:
                    bad.append("trial %d: %s moved while fetched: fetch %d (%d bytes)"
                               % (trial, blob_id, status, len(data)))
            status, _, data = sos.fetch(blob_id)
            if status != 200 or data != body or held(c, blob_id) != "blob" or \
                    held(a, blob_id):
                bad.append("trial %d: after the move: fetch %d, g2 %s, g1 %s" % (
                    trial, status, held(c, blob_id), held(a, blob_id)))
    finally:
        tracer.stop()
    figures.add(33, trials, len(bad), len(bad), rng.seed_value,
                "%d fetches raced a whole move; answered wrong: %d" % (hits, len(bad)))
    assert hits, "no fetch was held up across a move: the test tested nothing"
    assert not bad
