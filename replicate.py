#!/usr/bin/env python3
"""replicate: make every member of each SOS group hold every blob of the group.

Anti-entropy for SOS.  Within each group (see cluster.py for configuration and
groups), every blob held by any member is copied, with its X-* metadata, to
every member that lacks it, and every delete reaches every member.  Nothing
crosses groups.  Run it from cron or the
systemd timer in packaging/:

    replicate --verbose                      # groups from /etc/sos.conf, ~/.sos.conf
    replicate -blob-server http://a:4001,http://b:4002
    replicate --scrub                        # also re-hash every blob first

How it scales: each blob-server keeps a digest of its ids per two-letter
bucket (GET /digests).  Members whose digests agree are in sync and are not
listed at all; for a bucket that differs, their sorted, paged listings
(GET /blobs?prefix=&after=&limit=) are merged as streams, so memory stays
bounded whatever the count.  Against a blob-server of the Go original (no
digests, no paging) it falls back to full listings.

Listings (?state=1) name tombstones too, and every blob's and tombstone's
timestamp.  Per id the newest wins, a tombstone on a tie: a newer tombstone
is sent (DELETE with its timestamp) to members holding the blob or nothing,
so it outlives every copy until reclaimed; a newer blob is copied, with its
timestamp, over older tombstones.  A blob-server always checks, so a blob
never lands on a newer tombstone.  The Go original's listing has no states:
its blobs count as written at time 0, and it can't take a delete.

Copies stream from a holder to the member that lacks the blob, and the
receiving blob-server checks the bytes against the id, so a corrupt copy is
never spread: it is reported and another holder is tried.  --scrub asks every
member to re-hash its blobs (POST /verify/<id>); a bad file is moved to the
member's quarantine and restored from a good member by the same run.

Exit status: 0 every group in sync; 1 some copies failed or a member was
unreachable (the rest still synced); 2 usage or configuration error.
"""

import heapq
import http.client
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from cluster import ConfigError, add_cluster_args, load_groups
from rules import CHUNK, blob_metadata, chunked, shard, valid_id
from upstream import Pool
from process import ArgumentParser, read_token, setup_logging

PAGE = 10000

log = logging.getLogger("replicate")


class Unreachable(Exception):
    """A member could not be listed or asked."""


class Progress:
    """Counts what a run did; draws a live line on a terminal."""

    def __init__(self, live):
        self.live = live
        self.lock = threading.Lock()
        self.copied = self.bytes = self.failed = self.examined = self.deleted = 0
        self.corrupt = self.scrubbed = self.quarantined = 0
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.fraction = 0.0       # of the work, as far as it can be known

    def add(self, **counts):
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
        self.draw()

    def draw(self, force=False):
        now = time.monotonic()
        if not self.live or (now - self.last_draw < 0.2 and not force):
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-6)
        eta = ""
        if 0 < self.fraction < 1:
            eta = " ETA %ds" % (elapsed / self.fraction - elapsed)
        sys.stderr.write("\r\033[K%d examined, %d copied (%.1f MiB, %.1f MiB/s), "
                         "%d deleted, %d failed%s%s" % (
                             self.examined, self.copied, self.bytes / 2**20,
                             self.bytes / 2**20 / elapsed, self.deleted, self.failed,
                             ", %d scrubbed" % self.scrubbed if self.scrubbed else "",
                             eta))
        sys.stderr.flush()

    def end(self):
        if self.live:
            self.draw(force=True)
            sys.stderr.write("\n")


class Replicator:
    """Brings one group's members into agreement; knows the blob-server API,
    not our command line."""

    def __init__(self, pool, jobs=16, dry_run=False, progress=None):
        self.pool = pool
        self.jobs = jobs
        self.dry_run = dry_run
        self.progress = progress or Progress(False)

    # Asking members.

    def _get_json(self, member, path):
        try:
            reply = self.pool.request(member, "GET", path)
            if reply.status != HTTPStatus.OK:
                reply.read()
                reply.close()
                return reply.status, None
            return reply.status, reply.json()
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise Unreachable("%s: %s" % (member, str(e) or type(e).__name__)) \
                from None

    def digests(self, member):
        """{bucket: digest}, or None for a blob-server without digests."""
        status, body = self._get_json(member, "/digests")
        if status == HTTPStatus.NOT_FOUND:
            return None
        if status != HTTPStatus.OK or not isinstance(body, dict):
            raise Unreachable("%s: /digests answered %s" % (member, status))
        return body

    def ids(self, member, prefix=""):
        """Yield member's ids starting with prefix, ascending, page by page.

        A blob-server of the original ignores the paging parameters and sends
        everything at once: then its (whole) list is filtered and sorted here."""
        after = ""
        while True:
            status, page = self._get_json(member, "/blobs?prefix=%s&after=%s&limit=%d"
                                          % (prefix, after, PAGE))
            if status != HTTPStatus.OK or not isinstance(page, list):
                raise Unreachable("%s: /blobs answered %s" % (member, status))
            # The merge needs ascending ids.  The original's whole, unsorted
            # list is no "page" even when it is short, so check what came.
            paged = len(page) <= PAGE and all(
                isinstance(i, str) and i > after and i.startswith(prefix)
                for i in page) and all(x < y for x, y in zip(page, page[1:]))
            if not paged:
                yield from sorted(i for i in set(page) if isinstance(i, str)
                                  and i > after and i.startswith(prefix)
                                  and valid_id(i))
                return
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1]

    # Syncing.

    def plan(self, members):
        """Which buckets to compare: returns (reachable members, prefixes or
        None for everything, unreachable errors)."""
        reachable, digests, errors = [], [], []
        for m in members:
            try:
                digests.append(self.digests(m))
                reachable.append(m)
            except Unreachable as e:
                errors.append(str(e))
        if any(d is None for d in digests):
            return reachable, None, errors
        buckets = set().union(*[d.keys() for d in digests]) if digests else set()
        differ = sorted(b for b in buckets
                        if len({d.get(b) for d in digests}) > 1)
        return reachable, differ, errors

    def states(self, member, prefix=""):
        """Yield (id, timestamp, kind) of member's blobs and tombstones with
        prefix, ascending; a member without states (the Go original, or an
        older blob-server) lists its blobs, as written at time 0."""
        after = ""
        while True:
            status, page = self._get_json(member, "/blobs?state=1&prefix=%s&after=%s"
                                          "&limit=%d" % (prefix, after, PAGE))
            if status != HTTPStatus.OK or not isinstance(page, list) or not all(
                    isinstance(e, list) and len(e) == 3 and isinstance(e[1], int)
                    and e[2] in ("blob", "tombstone") for e in page):
                if after:
                    raise Unreachable("%s: /blobs?state=1 stopped answering" % member)
                yield from ((blob_id, 0, "blob") for blob_id in self.ids(member, prefix))
                return
            yield from map(tuple, page)
            if len(page) < PAGE:
                return
            after = page[-1][0]

    def differences(self, members, prefixes):
        """Yield (blob_id, action, target, source list or timestamp): what
        brings the members to every id's newest state, by merging sorted
        listings."""
        buckets = prefixes if prefixes is not None else [None]
        for n, bucket in enumerate(buckets):
            prefix = (bucket or "").rstrip("-")
            streams = [self._tagged(m, prefix) for m in members]
            current, states = None, {}
            for blob_id, member, ts, kind in heapq.merge(*streams):
                if bucket and shard(blob_id)[0] != bucket:
                    continue            # a short prefix also lists other buckets
                if blob_id != current:
                    if current is not None:
                        yield from self._actions(current, states, members)
                    current, states = blob_id, {}
                states[member] = (ts, kind == "tombstone")
            if current is not None:
                yield from self._actions(current, states, members)
            self.progress.fraction = (n + 1) / len(buckets)

    def _tagged(self, member, prefix):
        for blob_id, ts, kind in self.states(member, prefix):
            yield blob_id, member, ts, kind

    def _actions(self, blob_id, states, members):
        """states is {member: (timestamp, is tombstone)}: the newest wins,
        the tombstone on a tie."""
        self.progress.add(examined=1)
        ts, deleted = max(states.values())
        for m in members:
            if deleted and not states.get(m, (0, False))[1]:
                yield blob_id, "delete", m, ts
            elif not deleted and (m not in states or states[m][1]):
                # The newest copy first: an older one may be superseded.
                yield blob_id, "copy", m, sorted(
                    (h for h in states if not states[h][1]),
                    key=lambda h: -states[h][0])

    def copy(self, blob_id, holders, target):
        """Stream blob_id from a holder to target; True on success."""
        for source in holders:
            try:
                reply = self.pool.request(source, "GET", "/blob/" + blob_id)
            except (OSError, http.client.HTTPException) as e:
                log.warning("%s: cannot read from %s: %s", blob_id, source, e)
                continue
            try:
                if reply.status != HTTPStatus.OK:
                    log.warning("%s: %s answered %d", blob_id, source, reply.status)
                    continue
                headers = blob_metadata(reply.headers.items())
                ts = reply.headers.get("X-Sos-Timestamp")
                if ts:                  # the copy keeps the time of its write
                    headers["X-Sos-Timestamp"] = ts
                length = reply.headers.get("Content-Length")
                if length is not None:
                    headers["Content-Length"] = length
                else:
                    headers["Transfer-Encoding"] = "chunked"
                body = iter(lambda: reply.read(CHUNK), b"")
                if length is None:
                    body = chunked(body)
                out = self.pool.request(target, "POST", "/blob/" + blob_id,
                                        body, headers)
                answer = out.read()
                out.close()
            except (OSError, http.client.HTTPException, ValueError) as e:
                log.warning("%s: copy %s -> %s failed: %s", blob_id, source,
                            target, e)
                continue
            finally:
                reply.close()
            if out.status == HTTPStatus.OK and b'"superseded"' in answer:
                # A delete newer than this copy reached the target meanwhile.
                log.info("%s: %s holds a newer delete", blob_id, target)
                return True
            if out.status == HTTPStatus.OK:
                log.info("copied %s %s -> %s", blob_id, source, target)
                self.progress.add(copied=1, bytes=int(length or 0))
                return True
            if out.status == HTTPStatus.UNPROCESSABLE_ENTITY:
                log.error("CORRUPT copy of %s on %s: refused by %s; run "
                          "replicate --scrub to quarantine and repair it",
                          blob_id, source, target)
                self.progress.add(corrupt=1)
            else:
                log.warning("%s: %s refused the copy: %d %s", blob_id, target,
                            out.status, answer[:200])
        self.progress.add(failed=1)
        return False

    def delete(self, blob_id, ts, target):
        """Record blob_id's tombstone, as of ts, on target; True on success."""
        try:
            reply = self.pool.request(target, "DELETE", "/blob/" + blob_id,
                                      headers={"X-Sos-Timestamp": str(ts)})
            answer = reply.read()
            reply.close()
        except (OSError, http.client.HTTPException) as e:
            reply, answer = None, str(e).encode()
        if reply and reply.status == HTTPStatus.OK:
            log.info("%s: tombstone sent to %s: %s", blob_id, target, answer.strip())
            self.progress.add(deleted=int(b'"deleted"' in answer))
            return True
        log.warning("%s: delete on %s failed: %s", blob_id, target, answer[:200])
        self.progress.add(failed=1)
        return False

    def sync(self, group):
        """Bring group's members into agreement; returns a summary dict."""
        start = time.monotonic()
        p = self.progress
        before = (p.examined, p.copied, p.failed, p.deleted)
        members, prefixes, errors = self.plan(group.members)
        for e in errors:
            log.error("group %s: member unreachable, skipped: %s", group.name, e)
        if prefixes == []:
            log.info("group %s: digests agree, in sync", group.name)
        elif len(members) > 1:
            log.info("group %s: comparing %s", group.name, "all ids" if prefixes
                     is None else "%d bucket(s)" % len(prefixes))
            try:
                self._apply_all(self.differences(members, prefixes))
            except Unreachable as e:
                log.error("group %s: %s", group.name, e)
                errors.append(str(e))
        return {"group": group.name, "examined": p.examined - before[0],
                "copied": p.copied - before[1], "failed": p.failed - before[2],
                "deleted": p.deleted - before[3],
                "unreachable": len(errors),
                "seconds": round(time.monotonic() - start, 2)}

    def _apply_all(self, plan):
        slots = threading.BoundedSemaphore(self.jobs * 2)   # bounded backlog
        with ThreadPoolExecutor(self.jobs) as pool:
            for blob_id, action, target, arg in plan:
                if self.dry_run:
                    print("would copy %s %s -> %s" % (blob_id, arg[0], target)
                          if action == "copy" else
                          "would delete %s on %s" % (blob_id, target))
                    continue
                slots.acquire()
                pool.submit(self._job, slots, blob_id, action, target, arg)

    def _job(self, slots, blob_id, action, target, arg):
        try:
            getattr(self, action)(blob_id, arg, target)     # copy() or delete()
        except Exception:
            log.exception("%s: %s on %s failed", blob_id, action, target)
            self.progress.add(failed=1)
        finally:
            slots.release()

    # Scrubbing.

    def scrub(self, member, rate):
        """Have member re-hash every blob, at most `rate` per second; returns
        the ids it quarantined."""
        bad = []
        interval = 1.0 / rate if rate else 0
        next_at = time.monotonic()
        for blob_id in self.ids(member):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at, time.monotonic() - 1) + interval
            try:
                reply = self.pool.request(member, "POST", "/verify/" + blob_id,
                                          b"", {"Content-Length": "0"})
                answer = reply.json() if reply.status == HTTPStatus.OK else None
                if reply.status != HTTPStatus.OK:
                    reply.close()
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise Unreachable("%s: %s" % (member, e)) from None
            self.progress.add(scrubbed=1)
            if answer and answer.get("quarantined"):
                log.error("CORRUPT %s on %s: quarantined", blob_id, member)
                self.progress.add(quarantined=1)
                bad.append(blob_id)
        return bad


def main(argv=None):
    parser = ArgumentParser(prog="replicate",
                            description="Copy every blob to every member of its "
                            "SOS group.")
    add_cluster_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be copied and deleted, change nothing")
    # Copies wait mostly on the receiver's fsyncs, so many can overlap.
    parser.add_argument("--jobs", type=int, default=16,
                        help="parallel transfers (default %(default)s)")
    parser.add_argument("--group", help="sync only this group")
    parser.add_argument("--scrub", action="store_true",
                        help="first have every member re-hash its blobs; bad "
                        "copies are quarantined and restored from a good member")
    parser.add_argument("--scrub-rate", type=float, default=200,
                        help="blobs verified per second per member (default "
                        "%(default)s; 0 for no limit)")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--cluster-token", metavar="FILE",
                        help="shared secret of the blob-servers")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, serving=False)
    if not args.verbose:
        logging.getLogger("replicate").setLevel(logging.WARNING)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        groups = load_groups(args.blob_server, args.config)
    except ConfigError as e:
        parser.exit(2, "replicate: %s\n" % e)
    if args.group:
        groups = [g for g in groups if g.name == args.group]
        if not groups:
            parser.exit(2, "replicate: no group named %r\n" % args.group)

    progress = Progress(sys.stderr.isatty())
    rep = Replicator(Pool(timeout=args.timeout, token=read_token(args.cluster_token)),
                     args.jobs, args.dry_run, progress)
    summaries = []
    status = 0
    for group in groups:
        if args.scrub:
            for member in group.members:
                try:
                    rep.scrub(member, args.scrub_rate)
                except Unreachable as e:
                    log.error("scrub: %s", e)
                    status = 1
        summaries.append(rep.sync(group))
    progress.end()
    print("%-12s %10s %8s %8s %7s %12s %8s" % ("group", "examined", "copied",
                                               "deleted", "failed", "unreachable",
                                               "seconds"))
    for s in summaries:
        print("%-12s %10d %8d %8d %7d %12d %8.2f" % (
            s["group"], s["examined"], s["copied"], s["deleted"], s["failed"],
            s["unreachable"], s["seconds"]))
        if s["failed"] or s["unreachable"]:
            status = 1
    if progress.corrupt or progress.quarantined:
        print("corrupt copies refused: %d, quarantined by scrub: %d"
              % (progress.corrupt, progress.quarantined))
    return status


if __name__ == "__main__":
    sys.exit(main())
