#!/usr/bin/env python3
"""blob-server: dumb, durable storage of blobs by id on local disk.

The blob-server is the storage primitive of SOS (Simple Object Storage).  It
stores opaque byte strings under lowercase alphanumeric ids, serves them back,
and lists what it holds.  It is internal: sos-server and replicate talk to it,
clients never should.  The wire API is that of the Go original, so its
api-server and replicate work against this server unchanged:

    GET  /alive               200 "alive"
    POST /blob/<id>           store the body (Content-Length or chunked);
                              200 {"id", "status": "OK", "size"}; 400 bad id,
                              411 no length, 413 too large, 422 body does not
                              hash to a content id, 431 too much metadata,
                              507 disk full.  With X-Sos-Manifest: SIZE the
                              body is a chunked object's manifest (README:
                              Large objects), checked by its rules (400)
    GET  /blob/<id>           the bytes (sendfile), with ETag, Range, 304,
                              the X-* headers sent with the upload and
                              X-Sos-Timestamp; 404 if missing or deleted
                              (then X-Sos-Deleted: the delete's time).
                              HEAD: the same headers only.
    DELETE /blob/<id>         record a tombstone, remove the blob: 200
                              {"id", "status": "deleted"|"superseded"|
                              "expired" (older than --reclaim-age: no
                              tombstone), "removed", "timestamp"}
    DELETE /blob/<id>?moved=TS  a move's removal: the blob or tombstone goes,
                              leaving none, only if written at TS: 200
                              {"id", "status": "removed"|"kept", "timestamp"}
    (A write's X-Sos-Timestamp may be at most 300 s ahead of this server's
    clock: 400 otherwise.)
    GET  /blobs               JSON array of every id, streamed; sorted, with
                              ?after=ID&limit=N paging and ?prefix=P (given
                              again: ids with any of them);
                              ?state=1: [id, timestamp, "blob"|"tombstone"];
                              ?manifests=1: [id, timestamp] of manifests
    GET  /stats               JSON: blobs, bytes, tombstones, disk free, total
    GET  /digests             JSON {bucket: digest} of the ids per two-letter
                              bucket, so replicate lists only what differs;
                              ?bucket=B: {leaf: digest} per four-letter leaf
                              of bucket B
    POST /verify/<id>         re-hash a stored blob; a copy whose bytes no
                              longer match its id is moved to .quarantine/

How blobs are kept on disk (plain files, fsync, tombstones) is blobstore.py's
BlobStore; this program is its HTTP face.

Started as root, the server binds, chroots into its store and drops to
``--user`` (default nobody).  Run it as:

    blob-server -store data1 -port 4001

The HTTP server (parsing with limits, deadlines, replies) is httpd.py,
workers and flags are process.py, and the API's rules (ids, metadata, the
shard rule) are rules.py.
"""

import ctypes
import grp
import logging
import os
import pwd
import re
import sys
import threading
import time
from http import HTTPStatus

from blobstore import QUARANTINE_DIR, TMP_DIR, BlobStore, Tampered, TooLarge
from diskio import NoSpace
from rules import (MAX_MANIFEST, VERSION, BadManifest, FilePart, Manifest,
                   Missing, blob_headers, blob_metadata, http_range, number,
                   valid_id)
from metrics import Metrics
from httpd import HTTPError, Handler, Server
from process import (ArgumentParser, add_server_args, parse_age, parse_size,
                     read_token, serve_workers, setup_logging, tls_context)

DEFAULT_PORT = 3001
DEFAULT_RECLAIM_AGE = "7d"
BUCKET_RE = re.compile(r"[a-z0-9-]{2}")    # a digest's bucket: an id's d1
MAX_CLOCK_AHEAD = 300     # seconds a write's X-Sos-Timestamp may be ahead

log = logging.getLogger("blob")


class BlobHandler(Handler):
    """Routes the blob-server API onto a BlobStore (self.server.store)."""

    routes = {
        ("GET", "alive"): "do_alive",
        ("GET", "blob"): "do_get",
        ("POST", "blob"): "do_post", ("PUT", "blob"): "do_post",
        ("DELETE", "blob"): "do_delete",
        ("GET", "blobs"): "do_list",
        ("GET", "stats"): "do_stats",
        ("GET", "digests"): "do_digests",
        ("POST", "verify"): "do_verify",
        ("GET", "metrics"): "do_metrics",
    }
    open_routes = ("alive",)
    exceptions = {**Handler.exceptions,
                  NoSpace: (HTTPStatus.INSUFFICIENT_STORAGE, None),
                  TooLarge: (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, None),
                  Tampered: (HTTPStatus.INTERNAL_SERVER_ERROR, None),
                  BadManifest: (HTTPStatus.BAD_REQUEST, None)}

    def do_alive(self):
        self.send_text(HTTPStatus.OK, "alive")

    def do_get(self):
        blob_id = self.rest
        try:
            fd, size, meta, ts = self.server.store.get(blob_id)
        except Missing:
            # A delete's time goes along, so a sos-server asking other groups
            # next serves none of their older copies.
            deleted = self.server.store.deleted_at(blob_id)
            if deleted is None:
                raise
            raise HTTPError(HTTPStatus.NOT_FOUND, "not found",
                            [("X-Sos-Deleted", str(deleted))]) from None
        try:
            # The write's time goes along, so replicate's copy carries it.
            headers = blob_headers(blob_id, meta) + [("X-Sos-Timestamp", str(ts))]
            status, offset, count, extra = http_range(self.headers, blob_id, size,
                                                      self.command)
            if status in (HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                          HTTPStatus.PRECONDITION_FAILED):
                raise HTTPError(status, headers=extra)
            if status == HTTPStatus.NOT_MODIFIED:
                self.send(status, headers)
            else:
                self.send(status, headers + extra, FilePart(fd, offset, count))
        finally:
            os.close(fd)

    def do_post(self):
        length = self.body_length()
        meta = blob_metadata(self.header_list)
        manifest = self.headers.get("x-sos-manifest")
        body = self.body(length)
        if manifest is not None:
            body = [self.manifest(body, length, manifest)]
            manifest = int(manifest)
        size, stored = self.server.store.put(self.rest, body, meta, length,
                                             self.timestamp(), manifest)
        self.send_json(HTTPStatus.OK, {"id": self.rest, "size": size,
                                       "status": "OK" if stored else "superseded"})

    def manifest(self, body, length, size):
        """X-Sos-Manifest: SIZE says the body is the manifest of a chunked
        object of SIZE bytes: checked by its rules here, as the content
        check can't apply.  Returns its bytes."""
        if length is None or length > MAX_MANIFEST:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "a manifest "
                            "needs a Content-Length of at most %d" % MAX_MANIFEST)
        data = b"".join(body)
        if number(size) is None or Manifest.decode(data, self.rest).size != number(size):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "X-Sos-Manifest: the "
                            "object's size, as its manifest says")
        return data

    def do_delete(self):
        moved = self.params().get("moved")
        if moved is not None:
            self.remove_moved(moved)
            return
        deleted, removed, ts = self.server.store.delete(self.rest, self.timestamp())
        self.send_json(HTTPStatus.OK, {
            "id": self.rest, "removed": removed, "timestamp": ts, "status":
            "expired" if deleted is None else "deleted" if deleted else "superseded"})

    def remove_moved(self, moved):
        """?moved=<ts>: the id moved to its placement group; remove its
        blob or tombstone only if written at ts, and leave no tombstone."""
        if number(moved) is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad moved=: nanoseconds since the epoch")
        removed, ts = self.server.store.remove_moved(self.rest, number(moved))
        self.send_json(HTTPStatus.OK, {"id": self.rest, "timestamp": ts,
                                       "status": "removed" if removed else "kept"})

    def timestamp(self):
        """The write's X-Sos-Timestamp (ns since the epoch), None if not sent."""
        value = self.headers.get("x-sos-timestamp")
        if value is None:
            return None
        ts = number(value)
        if ts is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST,
                            "bad X-Sos-Timestamp: nanoseconds since the epoch")
        # A write from the future would win over every later delete of the
        # id until then: refused beyond the clock skew we tolerate.
        ahead = (ts - time.time_ns()) / 1e9
        if ahead > MAX_CLOCK_AHEAD:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "X-Sos-Timestamp is %.0f s "
                            "ahead of this server's clock (at most %d s allowed)"
                            % (ahead, MAX_CLOCK_AHEAD))
        return ts

    def do_list(self):
        p = self.params()
        after = p.get("after") or None
        # Several prefixes: ids starting with any (replicate's differing leaves).
        prefix = tuple(self.param_list("prefix")) or ""
        if len(prefix) == 1:
            prefix = prefix[0]
        try:
            limit = int(p["limit"]) if "limit" in p else None
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad limit") from None
        if (after and not valid_id(after)) or any(
                x and not valid_id(x) for x in (prefix if isinstance(prefix, tuple)
                                                else (prefix,))):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad after or prefix")
        # Streamed: the listing holds whatever the store holds, in constant
        # memory, and is still one JSON array for the Go original's replicate.
        # ?state=1 is for ours: tombstones too, with every write's time.
        if p.get("manifests"):          # [id, timestamp] of live manifests
            items = ('["%s",%d]' % e for e in self.server.store.manifests(after, limit))
        elif p.get("state"):
            items = ('["%s",%d,"%s"]' % e for e in self.server.store.entries(
                after, prefix, limit, tombstones=True))
        else:
            items = ('"%s"' % i for i in self.server.store.ids(after, prefix, limit))
        self.send(HTTPStatus.OK, [("Content-Type", "application/json")],
                  json_array(items))

    def do_stats(self):
        self.send_json(HTTPStatus.OK, self.server.store.stats())

    def do_digests(self):
        bucket = self.params().get("bucket")
        if bucket is not None and not BUCKET_RE.fullmatch(bucket):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad bucket")
        self.send_json(HTTPStatus.OK, self.server.store.digests(bucket))

    def do_metrics(self):
        st = self.server.store.stats()
        gauges = [("sos_blob_%s" % k, "gauge", "blob-server %s" % k.replace("_", " "),
                   [({}, int(v))]) for k, v in sorted(st.items())]
        self.send_text(HTTPStatus.OK, self.server.metrics.render(gauges),
                       "text/plain; version=0.0.4")

    def do_verify(self):
        result = self.server.store.verify(self.rest)
        self.send_json(HTTPStatus.OK, {"id": self.rest, "ok": result is not False,
                                       "verified": result is not None,
                                       "quarantined": result is False})


def json_array(items, batch=2000):
    """Yield a JSON array of items (each JSON text) in pieces of `batch`."""
    out, sep = ["["], ""
    for item in items:
        out.append(sep + item)
        sep = ","
        if len(out) >= batch:
            yield "".join(out).encode()
            out = []
    out.append("]\n")
    yield "".join(out).encode()


class BlobServer(Server):
    """A blob-server for `store` bound to `address`; not yet serving."""

    def __init__(self, address, store, **options):
        """options: token, tls, reuse_port (see httpd.Server)."""
        self.store = store
        super().__init__(address, BlobHandler, "blob-server", Metrics("sos_blob"),
                         **options)


make_server = BlobServer


def resolve_user(spec):
    """'nobody', '65534' or '1000:1000' -> (uid, gid)."""
    name, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not name.isdigit():
            raise ValueError("no such user %r" % name) from None
        uid = gid = int(name)
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid


def preload():
    """Load now what this process would otherwise load at first use: after
    the chroot nothing outside the store can be opened, so a module, shared
    library or time zone file first wanted then is missing for good.

    The stdlib loads some modules lazily, on paths that are rare and must
    still work: a 500 logs its traceback, and formatting one imports
    tokenize (through linecache, since Python 3.13; a ModuleNotFoundError
    there, then again in logging's own error handler, killed the request
    thread and the client got a dropped connection instead of the 500), ast
    (the ^^^ under an expression), unicodedata (a line with wide characters)
    and _suggestions (3.13's "Did you mean").  Those are imported by name;
    then a real traceback goes through every log handler's formatter, which
    loads whatever else this Python's formatting needs, and the time zone."""
    # Imported here, not at the top: this is the one place that states what
    # the chroot needs beyond the program's own imports.
    import ast  # noqa: F401
    import tokenize  # noqa: F401
    import unicodedata  # noqa: F401
    try:
        # glibc dlopens libgcc_s when a thread exits (for unwinding); after the
        # chroot it couldn't, and the process would abort on its first exit.
        ctypes.CDLL("libgcc_s.so.1")
    except OSError:
        pass
    try:
        object().missing      # AttributeError: the kind that looks for a suggestion
    except AttributeError:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                "preloading", (), sys.exc_info())
    for handler in logging.getLogger().handlers or [logging.lastResort]:
        handler.format(record)


def drop_privileges(store_dir, uid, gid):
    """chroot into the store and become uid:gid; exits if that fails.

    Everything the process will ever need is loaded before this (preload()):
    after the chroot nothing outside the store can be opened, imported or
    resolved."""
    st = os.stat(store_dir)
    if (st.st_uid, st.st_gid) != (uid, gid):
        for top, dirs, files in os.walk(store_dir):
            for name in [top] + [os.path.join(top, n) for n in dirs + files]:
                os.chown(name, uid, gid, follow_symlinks=False)
    # BlobStore made these as root a moment ago, also in a store that already
    # belongs to uid (made with `install -d -o nobody`): every write needs them.
    for name in (TMP_DIR, QUARANTINE_DIR):
        os.chown(os.path.join(store_dir, name), uid, gid, follow_symlinks=False)
    preload()
    os.chroot(store_dir)
    os.chdir("/")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    sys.exit("blob-server: privilege drop failed, refusing to run as root")


def main(argv=None):
    parser = ArgumentParser(prog="blob-server",
                            description="Durable storage of blobs by id (SOS).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: internal)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port (default %(default)s; 0 picks a free one)")
    parser.add_argument("--store", default="data",
                        help="directory holding the blobs (created if missing)")
    parser.add_argument("--user", default="nobody",
                        help="NAME|UID[:GID] to run as when started as root")
    parser.add_argument("--reserve", type=parse_size, default=None,
                        help="free space always kept (default 256M, or 5%% of a "
                        "smaller disk)")
    parser.add_argument("--max-size", type=parse_size, default=None,
                        help="largest blob accepted (default: no limit)")
    parser.add_argument("--reclaim-age", type=parse_age, default=DEFAULT_RECLAIM_AGE,
                        help="tombstones of deletes are removed after this long "
                        "(default %(default)s; e.g. 12h, 30m, 90s)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--version", action="version",
                        version="blob-server " + VERSION)
    add_server_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.access_log)

    store = BlobStore(args.store, max_size=args.max_size,
                      reclaim_age=args.reclaim_age)
    if args.reserve is None:
        st = os.statvfs(store.root_fd)
        args.reserve = min(256 << 20, st.f_blocks * st.f_frsize // 20)
    store.reserve = args.reserve
    removed, migrated = store.recover()
    if removed or migrated:
        log.info("start-up: removed %d temp files, adopted %d flat blobs",
                 removed, migrated)
    try:
        options = dict(token=read_token(args.cluster_token),
                       tls=tls_context(args.tls_cert, args.tls_key),
                       reuse_port=args.workers > 1)
        workers = [BlobServer((args.host, args.port), store, **options)]
        while len(workers) < args.workers:
            workers.append(BlobServer((args.host, workers[0].server_port), store,
                                      **options))
        srv = workers[0]
    except OSError as e:
        parser.exit(1, "blob-server: %s\n" % e.strerror)
    chroot = os.getuid() == 0
    if chroot:
        try:
            uid, gid = resolve_user(args.user)
        except (ValueError, KeyError) as e:
            parser.exit(2, "blob-server: --user: %s\n" % e)
        drop_privileges(store.root, uid, gid)
    print("blob-server %s listening on %s://%s:%d/, storing blobs in %s%s"
          % (VERSION, "https" if srv.tls else "http", args.host, srv.server_port,
             store.root,
             " (chrooted, running as %s)" % args.user if chroot else ""),
          flush=True)

    def background():
        threading.Thread(target=store.warm, daemon=True).start()
        threading.Thread(target=store.reclaim_forever, args=(args.reclaim_age,),
                         daemon=True).start()
    code = serve_workers([[w] for w in workers], background, args.pin)
    store.save_summaries()      # the next start reads only what changed since
    sys.exit(code)


if __name__ == "__main__":
    main()
