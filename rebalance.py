"""rebalance: replicate --rebalance, moving ids into their placement group.

After a group is added or drained (weight 0), and after uploads diverted
while their own group was full, some ids live outside their placement group
(the first of cluster.placement).  A fetch still finds them, one miss later;
a group that is taken out of the configuration takes them with it.
`replicate --rebalance` moves them, one id at a time, in the order every peer
that did this safely converged on (copy, verify at the target, only then
remove at the source; compare versions, never mere presence):

1. Copy.  The id's newest state in its old group, a blob with its X-* metadata
   and timestamp or a tombstone with its time, goes to every reachable member
   of its placement group.  Each receiving blob-server checks the bytes
   against the id and has them on disk before it answers, as for any copy.
2. Check.  Only if every reachable member of the placement group answered so,
   and at least --copies of them, does the move go on.  Otherwise the id
   stays where it is, where reads still find it, and the run reports a
   failure (exit 1): a member down or full in the placement group holds a
   move up, never loses it.
3. Remove.  Each member of the old group that listed the id is asked to
   remove exactly the version it listed (DELETE /blob/<id>?moved=<its
   timestamp>), leaving no tombstone.  A newer upload of the id (a sos-server
   still on the old configuration) or a newer delete that landed meanwhile
   is kept, and a later run moves it.

Every step can be repeated, so a move stopped anywhere (Ctrl-C, SIGTERM,
kill -9) is finished by running it again; until then the id is in both
groups, or only in its old one, never in neither.  A tombstone moves like a
blob, so a delete is never undone by a move; a sos-server asking an old group
after a newer delete in the placement group serves none of its older copies
(see Cluster.fetch).
"""

import heapq
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from cluster import placement
from upstream import Unreachable

log = logging.getLogger("rebalance")


class Mover:
    """Moves misplaced ids of every group into their placement group, over
    a Replicator's connections and progress.  `rate` is moves per second
    (0: no limit): each move of a small blob costs its targets two durable
    writes and its sources two more, so the blob count, not the bytes, is
    what production traffic competes with."""

    def __init__(self, replicator, groups, copies=2, rate=0):
        self.rep = replicator
        self.groups = groups
        self.copies = copies
        self.interval = 1.0 / rate if rate else 0.0
        self.lock = threading.Lock()
        self.summary = {g.name: dict.fromkeys(
            ("moved_in", "moved_out", "bytes", "failed", "left", "unreachable"), 0)
            for g in groups}
        self.up = set()

    def alive(self, member):
        try:
            reply = self.rep.pool.request(member, "GET", "/alive")
            reply.read()
            reply.close()
            return reply.status == HTTPStatus.OK
        except OSError as e:
            log.error("%s is unreachable: %s", member, e)
            return False

    def run(self):
        """Move the misplaced ids out of every group; returns the summary,
        {group name: {moved_in, moved_out, bytes, failed, left, unreachable}}."""
        members = [m for g in self.groups for m in g.members]
        self.up = {m for m in members if self.alive(m)}
        for group in self.groups:
            self.move_out(group)
        return self.summary

    def move_out(self, group):
        """Move every id that group's reachable members list and that belongs
        in another group; ids are examined in order, moves run in parallel."""
        down = [m for m in group.members if m not in self.up]
        self.count(group, unreachable=len(down))
        members = [m for m in group.members if m in self.up]
        streams = [self.rep.tagged(m, "") for m in members]
        with ThreadPoolExecutor(self.rep.jobs) as pool:
            try:
                self._submit(pool, group, self._ids(streams))
            except Unreachable as e:
                log.error("group %s: listing stopped: %s", group.name, e)
                self.count(group, unreachable=1)

    def _submit(self, pool, group, ids):
        slots = threading.BoundedSemaphore(self.rep.jobs * 2)    # bounded backlog
        next_at = time.monotonic()
        for blob_id, states in ids:
            target = placement(blob_id, self.groups)[0]
            if target is group:
                continue
            if self.rep.dry_run:
                print("would move %s (%s) %s -> %s" % (
                    blob_id, "tombstone" if max(states.values())[1] else "blob",
                    group.name, target.name))
                self.count(group, left=1)
                continue
            if self.interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at, time.monotonic() - 1) + self.interval
            slots.acquire()
            pool.submit(self._job, slots, blob_id, states, group, target)

    @staticmethod
    def _ids(streams):
        """(id, {member: (timestamp, is tombstone)}) from merged listings."""
        current, states = None, {}
        for blob_id, member, ts, kind in heapq.merge(*streams):
            if blob_id != current:
                if current is not None:
                    yield current, states
                current, states = blob_id, {}
            states[member] = (ts, kind == "tombstone")
        if current is not None:
            yield current, states

    def _job(self, slots, blob_id, states, source, target):
        try:
            self.move(blob_id, states, source, target)
        except Exception:
            log.exception("%s: move %s -> %s failed", blob_id, source.name,
                          target.name)
            self.count(source, failed=1, left=1)
        finally:
            slots.release()

    def move(self, blob_id, states, source, target):
        """Copy blob_id's newest state to target's reachable members; once
        they all hold it (at least --copies), remove from each member of
        source the version it listed.  True if moved."""
        ts, deleted = max(states.values())
        members = [m for m in target.members if m in self.up]
        need = min(self.copies, len(target.members))
        if len(members) < need:
            log.warning("%s: stays in %s: %d of %s's members reachable, %d needed",
                        blob_id, source.name, len(members), target.name, need)
            self.count(source, failed=1, left=1)
            return False
        size = 0
        if deleted:
            held = all(self.rep.ask(m, "DELETE", "/blob/" + blob_id,
                                    {"X-Sos-Timestamp": str(ts)}) for m in members)
        else:
            holders = sorted((m for m in states if not states[m][1]),
                             key=lambda m: -states[m][0])
            done = self.rep.transfer_all(blob_id, holders, members)
            held = all(done)
            size = max((d[1] for d in done if d), default=0)
        if not held:
            log.warning("%s: stays in %s: not every reachable member of %s "
                        "took it", blob_id, source.name, target.name)
            self.count(source, failed=1, left=1)
            return False
        removed = [self.rep.ask(member, "DELETE", "/blob/%s?moved=%d" % (
            blob_id, listed)) == "removed" for member, (listed, _) in states.items()]
        if all(removed):
            self.count(source, moved_out=1, bytes=size)
        else:
            self.count(source, left=1)     # newer meanwhile, or unreachable
        self.count(target, moved_in=1)
        self.rep.progress.add(moved=1, bytes=size)
        return True

    def count(self, group, **counts):
        with self.lock:
            for name, n in counts.items():
                self.summary[group.name][name] += n
