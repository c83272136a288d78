#!/usr/bin/env python3
"""sos-server: the public face of SOS (Simple Object Storage).

Clients upload to one port and download from another, so a firewall can
allow the world to read and only some hosts to write:

    POST /upload             (upload port, 9991) store the body; the id is
                             its SHA-1.  200 {"id", "size", "status": "OK",
                             "copies": N} once N blob-servers hold it on disk;
                             411 no length, 413 too large, 503 nowhere to
                             store it.
    DELETE /fetch/<id>       (upload port, with --delete-token) delete it
                             from every member of every group: 200
                             {"id", "status": "deleted", "removed"} once all
                             recorded it, 202 {"pending": [urls]} if some
                             could not, 503 if none; 401/403 without the token.
    GET|HEAD /fetch/<id>[.ext] (download port, 9992) the bytes, with
                             Content-Type (X-Mime-Type, else from .ext),
                             ETag, Range (206/416), 304, the blob's X-*
                             headers; 404 when every blob-server asked said
                             "not here", 503 when some could not be asked.

sos-server keeps no state: blobs live on blob-servers (blob.py), which are
arranged in groups.  Each blob belongs to one group, picked by rendezvous
hashing of its id over the groups' weights, and every member of that group
should hold a copy.  An upload goes to the members of its group in parallel
and is acknowledged once --copies of them have it durably (one larger than
--chunk-size goes as chunks, each placed like a blob, under a manifest:
README, Large objects); if the group
can't take it (members down or full), the next group in the blob's placement
order does.  A fetch asks the blob's own group first, so it costs one hop in
the common case, and falls back to the other groups only on a miss.
A whole blob served under a content id is checked against the id before
its last byte goes out (see cluster.StoredBlob); ranges of blobs over
--verify-limit, and blobs under names that are not content ids, can't be.

The cluster model (configuration, groups, placement) and Cluster, which
stores, fetches and deletes across it, are in cluster.py, which replicate.py
imports too: they exist once.  Run it as:

    sos-server -blob-server http://localhost:4001,http://localhost:4002
"""

import base64
import collections
import hashlib
import html
import http.client
import logging
import sys
import tempfile
from http import HTTPStatus

from blobs import Unavailable
from cluster import ConfigError, Cluster, add_cluster_args, load_groups
from rules import (VERSION, Corrupt, InvalidId, blob_headers, blob_metadata,
                   hash_update, http_range, precondition, valid_id)
from metrics import Metrics
from httpd import HTTPError, Handler, Server
from upstream import READ_TIMEOUT, Pool
from process import (ArgumentParser, add_server_args, parse_size, read_token,
                     serve_workers, setup_logging, tls_context)

SPOOL_IN_MEMORY = 1 << 20
# The status page's one style sheet, allowed by its hash: nothing else on
# the page may load or run.
STATUS_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:1em}td,th{padding:4px 12px;text-align:left}
tr.member{border-top:1px solid #ddd}.up{color:#080}.down{color:#c00;font-weight:bold}
.full{color:#b60;font-weight:bold}progress{width:120px;vertical-align:middle}
"""
STATUS_PAGE_POLICY = "default-src 'none'; style-src 'sha256-%s'" % base64.b64encode(
    hashlib.sha256(STATUS_STYLE.encode()).digest()).decode()
DEFAULT_MAX_UPLOAD = "5G"
DEFAULT_VERIFY_LIMIT = "1M"
# Chosen by measurement (BENCHMARKS.md, chunk_1g rows of 4M-32M): throughput
# alike; a range and peak RSS grow with it, 4M costs the blob-servers more.
DEFAULT_CHUNK_SIZE = "8M"

log = logging.getLogger("sos")


def spool(chunks, spool_dir=None, in_memory=SPOOL_IN_MEMORY):
    """Take a body while hashing it: returns (bytes or file, size, sha1 hex).

    We need the id (the SHA-1) before the blob-servers may receive the body,
    and we want to send it to several members at once and to another group
    if one fails.  So the body is spooled: small ones in memory, larger ones
    to an anonymous temp file (unlinked, so a crash leaves nothing behind)
    that the senders read with pread.  Memory stays flat at any size; the
    cost is one extra local write, mostly absorbed by the page cache.
    """
    h = hashlib.sha1()
    buf = bytearray()
    f = None
    size = 0
    try:
        for chunk in chunks:
            hash_update(h, chunk)
            size += len(chunk)
            if f is None:
                buf += chunk
                if len(buf) > in_memory:
                    f = tempfile.TemporaryFile(dir=spool_dir)
                    f.write(buf)
                    buf = None
            else:
                f.write(chunk)
        if f is None:
            return bytes(buf), size, h.hexdigest()
        f.flush()
        return f, size, h.hexdigest()
    except BaseException:
        if f:
            f.close()
        raise


# --- HTTP front ------------------------------------------------------------------

class FrontHandler(Handler):
    """The upload and download ports' common ground: the cluster's errors."""

    exceptions = {**Handler.exceptions,
                  Unavailable: (HTTPStatus.SERVICE_UNAVAILABLE, None)}


class UploadHandler(FrontHandler):
    routes = {("POST", "upload"): "do_upload", ("PUT", "upload"): "do_upload",
              ("DELETE", "fetch"): "do_delete"}
    # A delete needs the delete token, which do_delete checks, and not the
    # upload token: upload access alone must not be enough to delete.
    open_routes = ("fetch",)

    def do_upload(self):
        srv = self.server
        length = self.body_length()
        if length is not None and length > srv.max_upload:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            "larger than %d bytes" % srv.max_upload)
        meta = blob_metadata(self.header_list)

        def limited():
            total = 0
            for chunk in self.body(length):
                total += len(chunk)
                if total > srv.max_upload:
                    raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                    "larger than %d bytes" % srv.max_upload)
                yield chunk
        if srv.chunk_size and (length is None or length > srv.chunk_size) \
                and srv.cluster.chunkable():
            self.store_chunked(limited(), meta)
            return
        try:
            body, size, blob_id = spool(limited(), srv.spool_dir)
        except OSError as e:
            if isinstance(e, (ConnectionError, TimeoutError)) or srv.expired(self):
                raise
            log.error("cannot spool upload: %s", e)
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "cannot spool upload")
        try:
            copies = srv.cluster.store(body, size, blob_id, meta)
        except Unavailable as e:
            log.error("upload of %s (%d bytes) failed: %s", blob_id, size, e)
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "upload failed: %s" % e)
        finally:
            if not isinstance(body, bytes):
                body.close()
        self.send_json(HTTPStatus.OK, {"id": blob_id, "size": size,
                                       "status": "OK", "copies": copies})

    def store_chunked(self, body, meta):
        """A large upload, as chunks sent while it arrives (no spool)."""
        try:
            blob_id, size, copies, chunks = self.server.cluster.store_chunked(
                body, self.server.chunk_size, meta)
        except Unavailable as e:
            log.error("chunked upload failed: %s", e)
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "upload failed: %s" % e)
        reply = {"id": blob_id, "size": size, "status": "OK", "copies": copies}
        self.send_json(HTTPStatus.OK, dict(reply, chunks=chunks) if chunks else reply)

    def do_delete(self):
        token = self.server.delete_token
        if not token:
            raise HTTPError(HTTPStatus.FORBIDDEN, "deletes are off: start "
                            "sos-server with --delete-token FILE to enable them")
        if "authorization" not in self.headers:
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "deletes need the delete "
                            "token", [("WWW-Authenticate", "Bearer")])
        if not self.authorized(token):
            raise HTTPError(HTTPStatus.FORBIDDEN, "wrong delete token")
        removed, pending = self.server.cluster.delete(self.rest)
        self.send_json(HTTPStatus.ACCEPTED if pending else HTTPStatus.OK, dict(
            {"id": self.rest}, **{"status": "pending", "pending": pending}
            if pending else {"status": "deleted", "removed": removed}))


class DownloadHandler(FrontHandler):
    routes = {("GET", "fetch"): "do_fetch"}

    def do_fetch(self):
        blob_id, _, ext = self.rest.partition(".")
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        # The ETag is the id: preconditions are decided before asking, and a
        # 304 or 412 needs only the blob's head.
        decided = precondition(self.headers, blob_id)
        get = self.command == "GET"
        with self.server.cluster.fetch(blob_id, body=get and not decided) as blob:
            headers = blob_headers(blob.etag, blob.meta, ext, bool(self.server.token))
            if decided == HTTPStatus.NOT_MODIFIED:
                self.send(decided, headers)
                return
            if decided:
                raise HTTPError(decided)
            status, offset, count, extra = http_range(self.headers, blob.etag,
                                                      blob.size, self.command)
            if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
                raise HTTPError(status, headers=extra)
            body = blob.read(offset, count) if get else ()
            try:
                self.send(status, headers + extra, body, count)
            except (Corrupt, Unavailable, http.client.HTTPException) as e:
                log.error("fetch of %s cut short: %s", blob_id, e)
                if self.head_sent:
                    # The reply has begun: all we can do is cut it short.
                    self.close_connection = True
                    return
                if isinstance(e, Unavailable):
                    raise
                raise HTTPError(HTTPStatus.BAD_GATEWAY, "could not read "
                                "%s from its blob-server" % blob_id) from None


class AdminHandler(Handler):
    """Health, metrics and the status page, on a port of their own."""

    routes = {("GET", "health"): "do_health", ("GET", "metrics"): "do_metrics",
              ("GET", "status"): "do_status", ("GET", ""): "do_status"}

    def do_health(self):
        ok, report = self.server.cluster.report()
        self.send_json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                       report)

    def do_metrics(self):
        cluster = self.server.cluster
        members = [(g.name, m, cluster.health.get(m, {})) for g in cluster.groups
                   for m in g.members]
        extra = [("sos_upstream_events_total", "counter",
                  "uploads' copies made and failed, failovers, corrupt copies, "
                  "deletes (pending: not recorded everywhere)",
                  [({"event": k}, v) for k, v in sorted(cluster.counters.items())]),
                 ("sos_member_up", "gauge", "blob-server reachable (1) or not",
                  [({"group": g, "member": m}, int(bool(h.get("up"))))
                   for g, m, h in members])]
        for key in ("blobs", "bytes", "tombstones", "disk_free", "disk_total"):
            extra.append(("sos_member_%s" % key, "gauge", "blob-server %s" % key,
                          [({"group": g, "member": m}, int(h[key]))
                           for g, m, h in members if key in h]))
        self.send_text(HTTPStatus.OK, self.server.metrics.render(extra),
                       "text/plain; version=0.0.4")

    def do_status(self):
        ok, report = self.server.cluster.report()
        # Our own page: its inline style may apply, nothing else (no script).
        self.send(HTTPStatus.OK, [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Security-Policy", STATUS_PAGE_POLICY)],
                  status_page(report, self.server.recent_errors).encode())


def status_page(report, errors):
    """One self-contained HTML page: groups, members, disks, recent errors."""
    e = html.escape
    rows = [shape_table(report["groups"])]
    for g in report["groups"]:
        rows.append('<h2>Group %s <span class="%s">%s</span></h2><table><tr><th>'
                    'blob-server</th><th>state</th><th>disk</th><th>blobs</th>'
                    '<th>tombstones</th><th>latency</th></tr>' % (
                        e(g["name"]), "up" if g["writable"] else "down",
                        "writable" if g["writable"] else "NOT WRITABLE"))
        for m in g["members"]:
            state = "down" if not m.get("up") else "full" if m.get("full") else "up"
            total, free = m.get("disk_total") or 0, m.get("disk_free") or 0
            used = 100 * (total - free) / total if total else 0
            disk = ('<progress max="100" value="%.0f"></progress> '
                    '%.1f of %.1f GiB free' % (used, free / 2**30, total / 2**30)
                    if total else "-")
            rows.append('<tr class="member %s" data-state="%s"><td>%s</td><td>%s%s</td>'
                        '<td>%s</td><td>%s</td><td>%s</td><td>%s ms</td></tr>' % (
                            state, state, e(m["url"]), state.upper(),
                            " (%s)" % e(m["error"]) if m.get("error") else "",
                            disk, m.get("blobs", "-"), m.get("tombstones", "-"),
                            m.get("latency_ms", "-")))
        rows.append("</table>")
    recent = "".join("<li>%s</li>" % e(line) for line in reversed(errors)) or \
        "<li>none</li>"
    return """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>SOS status</title><style>%s</style></head><body><h1>SOS status: <span class="%s">%s</span></h1>%s
<h2>Recent errors</h2><ul id="errors">%s</ul>
<p>sos-server %s &middot; refreshes every 5 s</p></body></html>
""" % (STATUS_STYLE, "up" if report["ok"] else "down",
       "OK" if report["ok"] else "DEGRADED", "".join(rows), recent, VERSION)


def shape_table(groups):
    """Each group's share of the blobs and bytes (its fullest member's
    figures) beside its share of the weights: after a group is added, the
    two converge as replicate --rebalance moves blobs; a draining group
    (weight 0) is marked and should reach 0."""
    def held(g, key):
        return max((m.get(key) or 0 for m in g["members"]), default=0)
    totals = {key: sum(held(g, key) for g in groups) or 1
              for key in ("blobs", "bytes")}
    weights = sum(g["weight"] for g in groups) or 1
    out = ['<h2>Shape</h2><table id="shape"><tr><th>group</th><th>weight</th>'
           '<th>share of weight</th><th>share of blobs</th><th>share of bytes</th>'
           '</tr>']
    for g in groups:
        draining = g["weight"] == 0
        out.append('<tr class="group" data-group="%s" data-draining="%s"><td>%s%s</td>'
                   '<td>%g</td><td>%.1f%%</td><td>%.1f%%</td><td>%.1f%%</td></tr>' % (
                       html.escape(g["name"]), "yes" if draining else "no",
                       html.escape(g["name"]),
                       ' <span class="full">DRAINING</span>' if draining else "",
                       g["weight"], 100 * g["weight"] / weights,
                       100 * held(g, "blobs") / totals["blobs"],
                       100 * held(g, "bytes") / totals["bytes"]))
    return "".join(out) + "</table>"


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors for the status page."""

    def __init__(self, size=20):
        super().__init__(logging.WARNING)
        self.lines = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))


def watch_errors():
    """RecentErrors on the root logger: every module's warnings and errors,
    the HTTP server's 500s among them, reach the status page."""
    errors = RecentErrors()
    logging.getLogger().addHandler(errors)
    return errors


class FrontServer(Server):
    """The upload or the download port: handler serves it, over cluster."""

    def __init__(self, address, handler, cluster, metrics, *,
                 max_upload=parse_size(DEFAULT_MAX_UPLOAD), spool_dir=None,
                 delete_token=None, chunk_size=parse_size(DEFAULT_CHUNK_SIZE),
                 **options):
        """options: token, tls, reuse_port (see httpd.Server)."""
        self.cluster = cluster
        self.chunk_size = chunk_size
        self.max_upload = max_upload
        self.spool_dir = spool_dir
        self.delete_token = delete_token
        super().__init__(address, handler, "sos-server", metrics, **options)


class AdminServer(Server):
    """/health, /metrics and /status; recent_errors are log lines to show."""

    def __init__(self, address, cluster, metrics, recent_errors=()):
        self.cluster = cluster
        self.recent_errors = recent_errors
        super().__init__(address, AdminHandler, "sos-server", metrics)


def make_servers(cluster, *, host="0.0.0.0", upload_port=9991,
                 download_port=9992, upload_token=None, download_token=None,
                 **options):
    """The upload and download servers, bound but not yet serving; they
    share one set of figures.  options: max_upload, spool_dir, delete_token
    (FrontServer), tls, reuse_port (httpd.Server)."""
    metrics = Metrics("sos")
    return [FrontServer((host, port), handler, cluster, metrics, token=token,
                        **options)
            for port, handler, token in ((upload_port, UploadHandler, upload_token),
                                         (download_port, DownloadHandler,
                                          download_token))]


def make_admin_server(cluster, address, metrics=None, recent_errors=()):
    """The admin server (/health, /metrics, /status), bound, not serving."""
    return AdminServer(address, cluster, metrics or Metrics("sos"), recent_errors)

def dump(groups):
    for g in groups:
        print("Group %s%s" % (g.name, "" if g.weight == 1 else " (weight %g)" % g.weight))
        for m in g.members:
            print("\t%s" % m)


def parser():
    """sos-server's flags: the Go original's, and ours beside them."""
    parser = ArgumentParser(prog="sos-server",
                            description="SOS upload/download service.")
    add_cluster_args(parser)
    parser.add_argument("--api-host", default="0.0.0.0")
    parser.add_argument("--upload-port", type=int, default=9991)
    parser.add_argument("--download-port", type=int, default=9992)
    parser.add_argument("--dump", action="store_true",
                        help="print the groups and servers, then exit")
    parser.add_argument("--copies", type=int, default=2,
                        help="copies made before an upload is acknowledged "
                        "(default 2, capped by the group's size)")
    parser.add_argument("--strict-copies", action="store_true",
                        help="refuse (503) rather than keep fewer copies")
    parser.add_argument("--max-upload", type=parse_size,
                        default=parse_size(DEFAULT_MAX_UPLOAD),
                        help="largest upload (default %s)" % DEFAULT_MAX_UPLOAD)
    parser.add_argument("--verify-limit", type=parse_size,
                        default=parse_size(DEFAULT_VERIFY_LIMIT),
                        help="blobs up to this size are verified before they "
                        "are sent (default %s)" % DEFAULT_VERIFY_LIMIT)
    parser.add_argument("--timeout", type=float, default=READ_TIMEOUT,
                        help="seconds to wait on a blob-server (default %(default)s)")
    parser.add_argument("--spool-dir", help="where uploads are spooled "
                        "(default: the system temp directory)")
    parser.add_argument("--chunk-size", type=parse_size,
                        default=parse_size(DEFAULT_CHUNK_SIZE),
                        help="larger uploads are stored as chunks of this size "
                        "(default %s; 0: never)" % DEFAULT_CHUNK_SIZE)
    parser.add_argument("--admin-host", default="127.0.0.1",
                        help="address of the admin port (default %(default)s)")
    parser.add_argument("--admin-port", type=int, default=9993,
                        help="/health, /metrics, /status (default %(default)s)")
    parser.add_argument("--upload-token", metavar="FILE",
                        help="uploads need 'Authorization: Bearer <token>'")
    parser.add_argument("--download-token", metavar="FILE",
                        help="fetches need 'Authorization: Bearer <token>'")
    parser.add_argument("--delete-token", metavar="FILE", help="enable DELETE "
                        "/fetch/<id> on the upload port, with this token")
    add_server_args(parser)
    return parser


def main(argv=None):
    flags = parser()
    args = flags.parse_args(argv)
    setup_logging(args.verbose, args.access_log)
    try:
        groups = load_groups(args.blob_server, args.config)
    except ConfigError as e:
        flags.exit(2, "sos-server: %s\n" % e)
    if args.dump:
        dump(groups)
        return 0
    if args.copies < 1:
        flags.error("--copies must be at least 1")
    cluster = Cluster(groups, copies=args.copies, strict=args.strict_copies,
                      verify_limit=args.verify_limit,
                      pool=Pool(timeout=args.timeout,
                                token=read_token(args.cluster_token)))
    errors = watch_errors()
    options = dict(host=args.api_host, max_upload=args.max_upload,
                   spool_dir=args.spool_dir, chunk_size=args.chunk_size,
                   upload_token=read_token(args.upload_token),
                   download_token=read_token(args.download_token),
                   delete_token=read_token(args.delete_token),
                   tls=tls_context(args.tls_cert, args.tls_key),
                   reuse_port=args.workers > 1)
    try:
        servers = make_servers(cluster, upload_port=args.upload_port,
                               download_port=args.download_port, **options)
        servers.append(make_admin_server(cluster, (args.admin_host, args.admin_port),
                                         servers[0].metrics, errors.lines))
        workers = [servers]
        while len(workers) < args.workers:
            workers.append(make_servers(cluster, upload_port=servers[0].server_port,
                                        download_port=servers[1].server_port,
                                        **options))
    except OSError as e:
        flags.exit(1, "sos-server: %s\n" % e.strerror)
    scheme = "https" if servers[0].tls else "http"
    print("Launching API-server")
    print("upload service   %s://%s:%d/upload" % (scheme, args.api_host,
                                                  servers[0].server_port))
    print("download service %s://%s:%d/fetch/<id>" % (scheme, args.api_host,
                                                      servers[1].server_port))
    print("admin service    http://%s:%d/status" % (args.admin_host,
                                                   servers[2].server_port))
    dump(groups)
    sys.stdout.flush()
    # The admin port, and so /metrics, shows the first process's figures.
    sys.exit(serve_workers(workers, cluster.watch_health, args.pin))


if __name__ == "__main__":
    main()
