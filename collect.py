"""collect: the chunks no live manifest references are removed, after a grace.

A chunked object is a manifest under its id and its chunks (ids ``c<sha1>``,
see README: Large objects).  Deleting the object tombstones its manifest; its
chunks, and those of an upload that died before its manifest was stored, are
garbage.  replicate collects them by mark and sweep over the whole cluster:

1. Mark.  Every member of every group lists its live manifests
   (``GET /blobs?manifests=1``); each is read from a member that lists it and
   checked by its rules; their chunks are the referenced set.  If a member
   can't be listed, or a manifest can't be read, nothing is collected: that
   manifest could name any chunk.
2. Sweep.  Every member lists its chunks (``GET /blobs?state=1&prefix=c``).
   A chunk that no manifest references and that was written more than
   --gc-grace ago is removed from that member with ``DELETE
   /blob/<id>?moved=<its timestamp>``: only that version, leaving no
   tombstone.

Chunks live in their own namespace (an object's id never starts with "c"),
so a chunk is never an object of its own, and a chunk that two objects share
is referenced while either lives.  Collection is safe against an upload
that re-uses a chunk while it runs: an upload stores each of its chunks
(which rewrites the chunk with the upload's time) before its manifest, so
a chunk being re-used was either listed as newer than the grace, or is newer
than the version the removal names, which then keeps it.  The grace also
covers uploads still sending chunks (their manifest comes last).

A live manifest whose chunk no member holds is reported loudly (exit 1).
"""

import http.client
import logging
import time
from http import HTTPStatus

from rules import CHUNK_ID, BadManifest, Manifest
from upstream import Unreachable

PAGE = 10000

log = logging.getLogger("collect")


class Collector:
    """Mark and sweep over every member of `groups`, through a Replicator's
    connections (its listings, ask(), dry_run)."""

    def __init__(self, replicator, groups, grace):
        self.rep = replicator
        self.members = [m for g in groups for m in g.members]
        self.grace = grace
        self.figures = dict.fromkeys(("manifests", "referenced", "collected",
                                      "kept", "missing"), 0)
        self.skipped = None       # why nothing was collected, if so
        self.original = None      # a Go-original member: no chunks to collect

    def run(self):
        """Collect; returns the figures (and sets .skipped if it could not)."""
        try:
            referenced = self.mark()
            chunks = {m: list(self._chunks(m)) for m in self.members}
        except Original as e:
            # sos-server stores no chunked object in such a cluster.
            self.original = str(e)
            return self.figures
        except (Unreachable, BadManifest) as e:
            self.skipped = str(e)
            log.error("gc skipped: %s", e)
            return self.figures
        held = {c for listed in chunks.values() for c, _ in listed}
        for chunk_id, manifest in sorted(referenced.items()):
            if chunk_id not in held:
                log.error("MISSING: chunk %s of %s is on no blob-server",
                          chunk_id, manifest)
                self.figures["missing"] += 1
        cutoff = time.time_ns() - int(self.grace * 1e9)
        for member, listed in chunks.items():
            for chunk_id, ts in listed:
                if chunk_id not in referenced and ts < cutoff:
                    self.sweep(member, chunk_id, ts)
        return self.figures

    def mark(self):
        """{chunk id: a manifest naming it} over every live manifest."""
        holders = {}
        for member in self.members:
            for blob_id in self._manifests(member):
                holders.setdefault(blob_id, []).append(member)
        referenced = {}
        for blob_id, members in holders.items():
            manifest = self._read(blob_id, members)
            if manifest:
                referenced.update((c, blob_id) for c, _ in manifest.chunks)
        self.figures.update(manifests=len(holders), referenced=len(referenced))
        return referenced

    def sweep(self, member, chunk_id, ts):
        if self.rep.dry_run:
            print("would collect %s on %s" % (chunk_id, member))
            return
        status = self.rep.ask(member, "DELETE", "/blob/%s?moved=%d" % (chunk_id, ts))
        self.figures["collected" if status == "removed" else "kept"] += 1

    def _manifests(self, member):
        after = ""
        while True:
            status, page = self.rep.get_json(
                member, "/blobs?manifests=1&after=%s&limit=%d" % (after, PAGE))
            if status != HTTPStatus.OK or not isinstance(page, list):
                raise Unreachable("%s: manifests answered %s" % (member, status))
            if not all(isinstance(e, list) and len(e) == 2 for e in page):
                raise Original(member)      # it ignored ?manifests=1
            yield from (entry[0] for entry in page)
            if len(page) < PAGE:
                return
            after = page[-1][0]

    def _chunks(self, member):
        """(chunk id, timestamp) of member's chunks."""
        for blob_id, ts, kind in self.rep.states(member, "c"):
            if kind == "blob" and CHUNK_ID.fullmatch(blob_id):
                yield blob_id, ts

    def _read(self, blob_id, members):
        """The manifest of blob_id from the first member with a good copy;
        None if every member says it is gone (deleted since it was listed)."""
        gone = 0
        for member in members:
            try:
                reply = self.rep.pool.request(member, "GET", "/blob/" + blob_id)
                data = reply.read()
                reply.close()
                if reply.status == HTTPStatus.OK:
                    return Manifest.decode(data, blob_id)
                gone += reply.status == HTTPStatus.NOT_FOUND
            except (OSError, http.client.HTTPException, BadManifest) as e:
                log.warning("manifest %s on %s: %s", blob_id, member, e)
        if gone == len(members):
            return None
        raise BadManifest("no good copy of the manifest %s (run replicate "
                          "--scrub)" % blob_id)


class Original(Exception):
    """A blob-server of the Go original, which lists no manifests."""
