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
listed at all; for a bucket that differs, the digests of its 256 leaves
(GET /digests?bucket=) say which leaves to list, and their sorted, paged
listings (GET /blobs?prefix=&after=&limit=) are compared a range of ids at a
time, so memory stays bounded whatever the count.  Against a blob-server of the Go original (no
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

--rebalance first moves every id that lives outside its placement group into
it (rebalance.py), --dry-run says what it would move.
Every run ends by collecting the chunks of large objects that no live
manifest references, once older than --gc-grace (collect.py).

Exit status: 0 every group in sync; 1 some copies failed or a member was
unreachable (the rest still synced); 2 usage or configuration error.
"""

import bisect
import http.client
import itertools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from cluster import ConfigError, add_cluster_args, load_groups
from collect import Collector
from rebalance import Mover
from rules import CHUNK, blob_metadata, chunked, shard, valid_id
from upstream import Pool, Unreachable
from process import ArgumentParser, parse_age, read_token, setup_logging

PAGE = 10000
DEFAULT_GC_GRACE = "1d"
# A bucket whose digests differ is listed leaf by leaf (those that differ,
# in one request) when at most this many of its 256 leaves differ.
NARROW_MAX = 64
LEAF_RE = re.compile(r"[a-z0-9]{4}")
SMALL_COPY = 64 * 1024    # bytes: a copy this small is read whole, then sent

log = logging.getLogger("replicate")


class Progress:
    """Counts what a run did; draws a live line on a terminal."""

    def __init__(self, live):
        self.live = live
        self.lock = threading.Lock()
        self.copied = self.bytes = self.failed = self.examined = self.deleted = 0
        self.corrupt = self.scrubbed = self.quarantined = self.moved = 0
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
                         "%d deleted, %d moved, %d failed%s%s" % (
                             self.examined, self.copied, self.bytes / 2**20,
                             self.bytes / 2**20 / elapsed, self.deleted, self.moved,
                             self.failed,
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

    def get_json(self, member, path):
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
        status, body = self.get_json(member, "/digests")
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
            status, page = self.get_json(member, "/blobs?prefix=%s&after=%s&limit=%d"
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

    def narrow(self, members, bucket):
        """The prefixes to list for a bucket whose digests differ: the
        leaves whose digests differ (GET /digests?bucket=), none if they all
        agree by now (a write landed between the asks), or the bucket's own
        prefix when too many do, or a member can't tell (an older
        blob-server answers with its buckets)."""
        whole = (bucket.rstrip("-"),)
        leaves = []
        for m in members:
            status, body = self.get_json(m, "/digests?bucket=" + bucket)
            if status != HTTPStatus.OK or not isinstance(body, dict) or not all(
                    isinstance(k, str) and k[:2] == bucket and len(k) == 4
                    for k in body):
                return whole
            leaves.append(body)
        differ = sorted(k for k in set().union(*leaves)
                        if len({d.get(k) for d in leaves}) > 1)
        if len(differ) > NARROW_MAX or not all(LEAF_RE.fullmatch(k) for k in differ):
            return whole                # a short id's padded leaf: the bucket
        return tuple(differ)

    def pages(self, member, prefixes=("",)):
        """Yield lists of (id, timestamp, kind) of member's blobs and
        tombstones starting with any of prefixes, ascending, a page at a
        time; a member without states (the Go original, or an older
        blob-server) lists its blobs, as written at time 0."""
        after = ""
        query = "&".join("prefix=%s" % p for p in prefixes)
        while True:
            status, page = self.get_json(member, "/blobs?state=1&%s&after=%s"
                                         "&limit=%d" % (query, after, PAGE))
            if status != HTTPStatus.OK or not isinstance(page, list) or not all(
                    isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                    and isinstance(e[1], int) and e[2] in ("blob", "tombstone")
                    for e in page):
                if after:
                    raise Unreachable("%s: /blobs?state=1 stopped answering" % member)
                ids = self.ids(member, prefixes[0])
                while batch := list(itertools.islice(ids, PAGE)):
                    yield [(blob_id, 0, "blob") for blob_id in batch]
                return
            if page:
                yield list(map(tuple, page))
            if len(page) < PAGE:
                return
            after = page[-1][0]

    def states(self, member, prefix=""):
        """Yield (id, timestamp, kind) of member's ids with prefix, ascending
        (see pages)."""
        for page in self.pages(member, (prefix,)):
            yield from page

    def differences(self, members, prefixes):
        """Yield (blob_id, action, target, source list or timestamp): what
        brings the members to every id's newest state, from their sorted
        listings, a range of ids at a time (ranges).  Most ids are listed
        alike by every member and need nothing: they are told apart from the
        rest by set operations, and only the rest is looked at id by id
        (comparing a million ids one by one cost more CPU than listing them)."""
        buckets = prefixes if prefixes is not None else [None]
        for n, bucket in enumerate(buckets):
            listed = self.narrow(members, bucket) if bucket else ("",)
            for chunk in self.ranges(members, listed) if listed else ():
                if bucket and len(listed[0]) < 2:
                    # A short prefix also lists other buckets.
                    chunk = {m: [e for e in entries if shard(e[0])[0] == bucket]
                             for m, entries in chunk.items()}
                sets = [set(entries) for entries in chunk.values()]
                alike = set.intersection(*sets)
                states = {}
                for member, entries in zip(chunk, sets):
                    for blob_id, ts, kind in entries - alike:
                        states.setdefault(blob_id, {})[member] = (ts, kind == "tombstone")
                self.progress.add(examined=len(alike) + len(states))
                for blob_id in sorted(states):
                    yield from self._actions(blob_id, states[blob_id], members)
            self.progress.fraction = (n + 1) / len(buckets)

    def ranges(self, members, prefixes):
        """Yield {member: [(id, timestamp, kind)]}, each holding every
        member's entries (with any of prefixes) of one range of ids, ranges
        ascending: at most a page per member is held at a time."""
        streams = {m: self.pages(m, prefixes) for m in members}
        held = {m: [] for m in members}
        while streams or any(held.values()):
            for m in list(streams):
                if not held[m]:
                    held[m] = next(streams[m], None)
                    if held[m] is None:
                        held[m] = []
                        del streams[m]        # listed to its end
            # Every entry up to the lowest last id held of a member still
            # listing is held: later pages hold only higher ids.
            bound = min((held[m][-1][0] for m in streams), default=None)
            chunk = {}
            for m in members:
                cut = len(held[m]) if bound is None else bisect.bisect_right(
                    held[m], (bound, math.inf))
                chunk[m], held[m] = held[m][:cut], held[m][cut:]
            yield chunk

    def tagged(self, member, prefix):
        for blob_id, ts, kind in self.states(member, prefix):
            yield blob_id, member, ts, kind

    def _actions(self, blob_id, states, members):
        """states is {member: (timestamp, is tombstone)}: the newest wins,
        the tombstone on a tie."""
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
        done = self.transfer(blob_id, holders, target)
        if done is None:
            self.progress.add(failed=1)
            return False
        if done[0] == "copied":
            self.progress.add(copied=1, bytes=done[1])
        return True

    def transfer(self, blob_id, holders, target):
        """Stream blob_id, with its metadata and timestamp, from the first
        holder that can to target, which verifies it: ("copied", bytes),
        ("superseded", 0) if target holds a newer delete, None on failure."""
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
                headers, length = self._copy_headers(reply)
                if length is not None and length <= SMALL_COPY:
                    # As bytes it can go on a kept-alive connection; a stream
                    # takes a new one (a connect and a server thread a copy).
                    body = reply.read()
                else:
                    body = iter(lambda: reply.read(CHUNK), b"")
                    if length is None:
                        body = chunked(body)
                done = self._answer(blob_id, source, target, length, lambda: self.pool
                                    .request(target, "POST", "/blob/" + blob_id, body,
                                             headers))
            except (OSError, http.client.HTTPException, ValueError) as e:
                log.warning("%s: copy %s -> %s failed: %s", blob_id, source, target, e)
                continue
            finally:
                reply.close()
            if done:
                return done
        return None

    def transfer_all(self, blob_id, holders, targets):
        """transfer() to each of targets: [result per target].  A blob of
        SMALL_COPY bytes or less is read once and sent to them all at once
        (a move's targets are a whole group: reading it once per member was
        half of a move's reads); a larger one, or a target that failed,
        goes through transfer()."""
        results = [None] * len(targets)
        for source in holders[:1]:
            try:
                reply = self.pool.request(source, "GET", "/blob/" + blob_id)
            except (OSError, http.client.HTTPException):
                break
            try:
                headers, length = self._copy_headers(reply)
                if reply.status == HTTPStatus.OK and length is not None \
                        and length <= SMALL_COPY:
                    body = reply.read()
                    sent = [self._post(t, blob_id, body, headers) for t in targets]
                    results = [exchange and self._answer(blob_id, source, t, length,
                                                         exchange.reply)
                               for t, exchange in zip(targets, sent)]
            except (OSError, http.client.HTTPException, ValueError) as e:
                log.warning("%s: copy from %s failed: %s", blob_id, source, e)
            finally:
                reply.close()
        return [done or self.transfer(blob_id, holders, t)
                for done, t in zip(results, targets)]

    def _post(self, target, blob_id, body, headers):
        """Send a copy without waiting for its answer: an Exchange, or None
        if target can't be reached (transfer() tries it again)."""
        try:
            return self.pool.send(target, "POST", "/blob/" + blob_id, body, headers)
        except (OSError, http.client.HTTPException) as e:
            log.warning("%s: copy to %s failed: %s", blob_id, target, e)
            return None

    @staticmethod
    def _copy_headers(reply):
        """The copy's request headers, from the holder's reply: its X-*
        metadata, the time of its write, its length; and that length."""
        headers = blob_metadata(reply.headers.items())
        # The copy keeps the time of its write, and a manifest stays one
        # (its receiver checks it by its own rules).
        for name in ("X-Sos-Timestamp", "X-Sos-Manifest"):
            if reply.headers.get(name):
                headers[name] = reply.headers.get(name)
        length = reply.headers.get("Content-Length")
        if length is not None:
            headers["Content-Length"] = length
        else:
            headers["Transfer-Encoding"] = "chunked"
        return headers, None if length is None else int(length)

    def _answer(self, blob_id, source, target, length, send):
        """What target said to a copy (send() gives its reply): as transfer()."""
        try:
            out = send()
            answer = out.read()
            out.close()
        except (OSError, http.client.HTTPException) as e:
            log.warning("%s: copy %s -> %s failed: %s", blob_id, source, target, e)
            return None
        if out.status == HTTPStatus.OK and b'"superseded"' in answer:
            # A delete newer than this copy reached the target meanwhile.
            log.info("%s: %s holds a newer delete", blob_id, target)
            return "superseded", 0
        if out.status == HTTPStatus.OK:
            log.info("copied %s %s -> %s", blob_id, source, target)
            return "copied", length or 0
        if out.status == HTTPStatus.UNPROCESSABLE_ENTITY:
            log.error("CORRUPT copy of %s on %s: refused by %s; run "
                      "replicate --scrub to quarantine and repair it",
                      blob_id, source, target)
            self.progress.add(corrupt=1)
        else:
            log.warning("%s: %s refused the copy: %d %s", blob_id, target,
                        out.status, answer[:200])
        return None

    def delete(self, blob_id, ts, target):
        """Record blob_id's tombstone, as of ts, on target; True on success."""
        status = self.ask(target, "DELETE", "/blob/" + blob_id,
                          {"X-Sos-Timestamp": str(ts)})
        if status is None:
            self.progress.add(failed=1)
            return False
        self.progress.add(deleted=int(status == "deleted"))
        return True

    def ask(self, member, method, path, headers=None):
        """A blob-server's answer to a request without a body: the "status"
        of its 200 JSON reply, None (logged) if it failed."""
        try:
            reply = self.pool.request(member, method, path, headers=headers)
            answer = reply.read()
            reply.close()
            if reply.status == HTTPStatus.OK:
                status = json.loads(answer).get("status")
                log.info("%s %s on %s: %s", method, path, member, status)
                return status
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as e:
            answer = str(e).encode()
        log.warning("%s %s on %s failed: %s", method, path, member, answer[:200])
        return None

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


def parser():
    """replicate's flags."""
    parser = ArgumentParser(prog="replicate",
                            description="Copy every blob to every member of its "
                            "SOS group.")
    add_cluster_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be copied, deleted and moved; "
                        "change nothing")
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
    parser.add_argument("--rebalance", action="store_true",
                        help="first move every blob and tombstone outside its "
                        "placement group into it (see README: Growing, "
                        "shrinking and replacing)")
    parser.add_argument("--rate", type=float, default=0,
                        help="--rebalance: moves per second (default: no limit)")
    parser.add_argument("--copies", type=int, default=2,
                        help="--rebalance: a move needs this many copies in the "
                        "placement group (default 2, capped by its size)")
    parser.add_argument("--gc-grace", type=parse_age, default=DEFAULT_GC_GRACE,
                        help="chunks that no live manifest references are "
                        "collected once this old (default %(default)s; e.g. "
                        "12h, 0s)")
    parser.add_argument("--metrics-file", metavar="PATH",
                        help="write the run's summary here in Prometheus text "
                        "format (atomically), e.g. for node_exporter's textfile "
                        "collector")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--cluster-token", metavar="FILE",
                        help="shared secret of the blob-servers")
    return parser


def main(argv=None):
    try:
        return run(argv)
    except BrokenPipeError:
        # `replicate --dry-run | head`: the reader has all it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(argv):
    flags = parser()
    args = flags.parse_args(argv)
    setup_logging(args.verbose, serving=False)
    if not args.verbose:
        log.setLevel(logging.WARNING)
    if args.jobs < 1 or args.copies < 1 or args.rate < 0:
        flags.error("--jobs and --copies must be at least 1, --rate at least 0")
    try:
        groups = load_groups(args.blob_server, args.config)
    except ConfigError as e:
        flags.exit(2, "replicate: %s\n" % e)
    everywhere = groups
    if args.group:
        groups = [g for g in groups if g.name == args.group]
        if not groups:
            flags.exit(2, "replicate: no group named %r\n" % args.group)

    progress = Progress(sys.stderr.isatty())
    rep = Replicator(Pool(timeout=args.timeout, token=read_token(args.cluster_token)),
                     args.jobs, args.dry_run, progress)
    status = 0
    moves = None
    if args.rebalance:
        moves = Mover(rep, everywhere, args.copies, args.rate).run()
    summaries = []
    for group in groups:
        if args.scrub:
            for member in group.members:
                try:
                    rep.scrub(member, args.scrub_rate)
                except Unreachable as e:
                    log.error("scrub: %s", e)
                    status = 1
        summaries.append(rep.sync(group))
    collector = Collector(rep, everywhere, args.gc_grace)
    collector.run()
    progress.end()
    status = report(summaries, moves, everywhere, progress) or status
    status = report_gc(collector) or status
    if args.metrics_file:
        try:
            write_metrics(args.metrics_file, summaries, moves)
        except OSError as e:
            log.error("cannot write %s: %s", args.metrics_file, e)
            status = 1
    return status


def report(summaries, moves, groups, progress):
    """Print the run's summary; returns the exit status it implies."""
    status = 0
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
    if moves is None:
        return status
    print("%-12s %10s %10s %14s %7s %8s" % ("moves", "moved-in", "moved-out",
                                            "bytes-moved", "failed", "left"))
    for g in groups:
        m = moves[g.name]
        print("%-12s %10d %10d %14d %7d %8d" % (g.name, m["moved_in"], m["moved_out"],
                                                m["bytes"], m["failed"], m["left"]))
        status = status or int(bool(m["failed"] or m["unreachable"]))
        if g.weight == 0:
            print("group %s is draining: %s" % (g.name, "EMPTY: remove it from the "
                  "configuration" if not (m["left"] or m["unreachable"]) else
                  "%d id(s) left, %d member(s) unreachable: run again"
                  % (m["left"], m["unreachable"])))
    return status


def report_gc(collector):
    """Print what the collection did; returns the exit status it implies."""
    f = collector.figures
    if collector.original:
        print("gc: not run: %s is a blob-server of the Go original (large "
              "uploads are stored whole)" % collector.original)
        return 0
    if collector.skipped:
        print("gc: skipped: %s" % collector.skipped)
        return 1
    print("gc: %d manifests, %d chunks referenced, %d collected, %d kept (newer "
          "meanwhile or unreachable), %d MISSING" % (
              f["manifests"], f["referenced"], f["collected"], f["kept"],
              f["missing"]))
    return int(bool(f["missing"]))


METRICS = (("examined", "ids compared"), ("copied", "copies made"),
           ("moved", "ids moved out of the group"), ("deleted", "tombstones sent"),
           ("failed", "copies, deletes and moves that failed"),
           ("unreachable", "members that could not be asked"),
           ("seconds", "how long the group took"))
LAST_SUCCESS = re.compile(r'sos_replicate_last_success_timestamp_seconds'
                          r'\{group="((?:[^"\\]|\\.)*)"\} ([0-9.e+]+)')


def write_metrics(path, summaries, moves):
    """The run's summary per group in Prometheus text format, replacing
    path atomically (written beside it, fsynced, renamed), so a collector
    never reads half a file.  A group's last success is carried over from
    the file's previous version when this run had failures there."""
    try:
        with open(path, encoding="utf-8") as f:
            last = {label(g): float(t) for g, t in LAST_SUCCESS.findall(f.read())}
    except (OSError, ValueError):
        last = {}
    now = time.time()
    rows = []
    for s in summaries:
        s = dict(s, moved=(moves or {}).get(s["group"], {}).get("moved_out", 0))
        if not (s["failed"] or s["unreachable"]):
            last[s["group"]] = now
        rows.append(s)
    out = []
    for key, text in METRICS:
        name = "sos_replicate_%s" % key
        out.append("# HELP %s %s in the last run\n# TYPE %s gauge" % (name, text, name))
        out += ['%s{group="%s"} %s' % (name, quote(s["group"]), s[key]) for s in rows]
    name = "sos_replicate_last_success_timestamp_seconds"
    out.append("# HELP %s when a run last ended with no failure in the group\n"
               "# TYPE %s gauge" % (name, name))
    out += ['%s{group="%s"} %.3f' % (name, quote(g), t) for g, t in sorted(last.items())]
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def quote(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label(value):
    return value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


if __name__ == "__main__":
    sys.exit(main())
