"""cluster: SOS's groups of blob-servers, and blobs stored across them.

The cluster model (configuration files, groups, rendezvous placement) and
Cluster, which uploads (whole, or as chunks under a manifest), fetches and
deletes blobs on the blob-servers and keeps their health: what sos-server
serves over HTTP and replicate walks.  A fetch hands back a blobs.Blob.
Knows nothing of the sos-server's own HTTP; talks to blob-servers through
upstream.Pool.
"""

import collections
import hashlib
import http.client
import json
import logging
import math
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor, FIRST_COMPLETED, wait
from http import HTTPStatus
from urllib.parse import urlsplit

from blobs import CHUNKS_AHEAD, ChunkedBlob, StoredBlob, Unavailable, chunk_buffer
from rules import (BYTES, CHUNK, VERSION, BadManifest, FilePart, InvalidId,
                   Manifest, Missing, blob_metadata, content_hash, content_id,
                   hash_update, number, valid_id)
from upstream import Pool

CONFIG_FILES = ("/etc/sos.conf", "~/.sos.conf")
DEFAULT_GROUP = "default"
HEALTH_EVERY = 5.0        # seconds between /stats polls of each blob-server
# An upload this small is sent to its members from the handler's own thread:
# with its head it fits a new connection's send buffer (tcp_wmem's default,
# 16 KiB), so sending to a member that doesn't read never holds up the next.
INLINE_UPLOAD = 8 * 1024
ORDER_CACHE = 65536       # ids whose placement order is remembered
MANIFEST = "X-Sos-Manifest"   # a blob-server's reply: the body is a manifest

log = logging.getLogger("cluster")


# --- Cluster model: configuration, groups, placement ------------------------

class ConfigError(Exception):
    """A configuration problem; the message names the file and line."""


class Group:
    """A set of blob-servers that each hold every blob of the group."""

    def __init__(self, name, members=(), weight=1.0):
        self.name = name
        self.members = list(members)
        self.weight = weight

    def __repr__(self):
        return "Group(%r, %r, weight=%r)" % (self.name, self.members, self.weight)


def check_url(url):
    """Return url without a trailing slash if it names an HTTP(S) server."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        parts = None
    if not parts or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query:
        raise ValueError("not a blob-server URL: %r" % url)
    return url.rstrip("/")


def parse_config(text, filename="<config>"):
    """Parse a configuration file into a list of Groups.

    Two formats, as in the Go original: a plain list of URLs (one group,
    "default"), or INI-style sections `[name]` whose `key: URL` lines are the
    members (the documents write the key as `-`).  Ours adds an optional
    `weight = N` line to a section.  `#` starts a comment.
    """
    groups = {}
    sectioned = "[" in text
    current = None if sectioned else DEFAULT_GROUP
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = "%s:%d" % (filename, lineno)
        if sectioned and line.startswith("["):
            if not line.endswith("]") or not line[1:-1].strip():
                raise ConfigError("%s: bad section header %r" % (where, line))
            current = line[1:-1].strip()
            groups.setdefault(current, Group(current))
            continue
        if current is None:
            raise ConfigError("%s: %r before the first [group]" % (where, line))
        group = groups.setdefault(current, Group(current))
        key, eq, value = line.partition("=")
        try:
            if sectioned and eq and key.strip().lower() == "weight":
                group.weight = float(value)
                if not (group.weight >= 0 and math.isfinite(group.weight)):
                    raise ValueError("weight must be a number, 0 or more "
                                     "(0: draining)")
                continue
            url = line
            if sectioned and not line.startswith(("http://", "https://")):
                key, colon, url = line.partition(":")
                if not colon:
                    raise ValueError("expected '-: http://host:port' or 'weight = N'")
            group.members.append(check_url(url.strip()))
        except ValueError as e:
            raise ConfigError("%s: %s" % (where, e)) from None
    return list(groups.values())


def merge_groups(*lists):
    """Add groups together by name, keeping first-seen order, as the original
    does with /etc/sos.conf and ~/.sos.conf."""
    merged = {}
    for groups in lists:
        for g in groups:
            into = merged.setdefault(g.name, Group(g.name, weight=g.weight))
            into.members += [m for m in g.members if m not in into.members]
            if g.weight != 1.0:
                into.weight = g.weight
    return [g for g in merged.values() if g.members]


def load_groups(blob_servers=None, config=None):
    """Groups from -blob-server URLs, a --config file, or the default files.

    Raises ConfigError (naming the file and line) or if no server is found."""
    if blob_servers:
        try:
            groups = [Group(DEFAULT_GROUP, [check_url(u.strip()) for u in
                                            blob_servers.split(",") if u.strip()])]
        except ValueError as e:
            raise ConfigError("-blob-server: %s" % e) from None
    else:
        paths = [config] if config else [os.path.expanduser(p) for p in CONFIG_FILES]
        lists = []
        for path in paths:
            try:
                with open(path, encoding="utf-8") as f:
                    lists.append(parse_config(f.read(), path))
            except FileNotFoundError:
                if config:
                    raise ConfigError("%s: no such file" % path) from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError("%s: %s" % (path, e)) from None
        groups = merge_groups(*lists)
    if not any(g.members for g in groups):
        raise ConfigError("no blob-servers configured: give -blob-server URL,URL "
                          "or list them in /etc/sos.conf or ~/.sos.conf")
    if not any(g.weight > 0 for g in groups):
        raise ConfigError("every group has weight 0 (draining): blobs would "
                          "have nowhere to go")
    return groups


def rank(key, items, name=lambda x: x, weight=lambda x: 1.0):
    """Order items by weighted rendezvous (highest-random-weight) hashing.

    Each item scores weight / -ln(u), u uniform in (0, 1) from SHA-1 of
    (item name, key); the highest score comes first.  The order depends only
    on the key and the items, never on live state, so every sos-server and
    replicate agree, and adding a group moves only the blobs it wins.
    """
    def score(item):
        h = hashlib.sha1(("%s\0%s" % (name(item), key)).encode()).digest()
        u = (int.from_bytes(h[:8], "big") + 0.5) / 2.0 ** 64
        return weight(item) / -math.log(u)
    return sorted(items, key=score, reverse=True)


def placement(blob_id, groups):
    """The groups in the order blob_id should be stored in and fetched from;
    the first is its placement group.  Draining groups (weight 0) come last."""
    return rank(blob_id, groups, lambda g: g.name, lambda g: g.weight)


# --- The cluster ----------------------------------------------------------------

class Cluster:
    """Stores and fetches blobs across groups of blob-servers.

    Knows nothing of the sos-server's own HTTP: uploads come in as a spooled
    body, fetches go out as (status, headers, chunks).  The only state is a
    cache of each blob-server's health, refreshed in the background; it
    orders retries but never decides placement.
    """

    def __init__(self, groups, copies=2, strict=False, verify_limit=1 << 20,
                 pool=None):
        self.groups = groups
        self.copies = copies
        self.strict = strict
        self.verify_limit = verify_limit
        self.pool = pool or Pool()
        self.health = {m: {"up": True, "full": False} for g in groups
                       for m in g.members}
        self.counters = dict.fromkeys(("copies_made", "copies_failed", "corrupt",
                                       "failovers", "partial", "deletes",
                                       "deletes_pending"), 0)
        # Senders of large bodies (sendfile) may run on every CPU, even in a
        # worker kept to one (process.serve_workers).
        cpus = os.sched_getaffinity(0)
        self.executor = ThreadPoolExecutor(
            max_workers=64, thread_name_prefix="upstream",
            initializer=lambda: os.sched_setaffinity(0, cpus))
        # Chunks are stored from threads of their own: their senders, on
        # the executor, must never wait behind them.
        self.chunk_senders = ThreadPoolExecutor(max_workers=16,
                                                thread_name_prefix="chunks")
        self._checked = False
        self._count_lock = threading.Lock()
        self._orders = {}
        self._stop = threading.Event()

    def close(self):
        """Stop the health checks and the upload senders (without waiting)."""
        self._stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.chunk_senders.shutdown(wait=False, cancel_futures=True)

    def count(self, name):
        with self._count_lock:
            self.counters[name] += 1

    # Health.

    def check(self, member):
        """Poll one blob-server's /stats (or /alive, for the original)."""
        state = {"up": False, "full": False, "checked": time.time()}
        start = time.monotonic()
        try:
            reply = self.pool.request(member, "GET", "/stats")
            if reply.status == HTTPStatus.OK:
                state.update(reply.json())
                state["up"] = True
            else:
                reply.close()
                reply = self.pool.request(member, "GET", "/alive")
                reply.read()
                reply.close()
                state["up"] = reply.status == HTTPStatus.OK
        except (OSError, http.client.HTTPException, ValueError) as e:
            state["error"] = str(e) or type(e).__name__
        state["latency_ms"] = round((time.monotonic() - start) * 1000, 1)
        was = self.health.get(member, {})
        if was.get("up", True) != state["up"]:
            log.warning("blob-server %s is %s", member, "up" if state["up"] else
                        "DOWN (%s)" % state.get("error", "bad reply"))
        self.health[member] = state
        return state

    def check_all(self):
        members = [m for g in self.groups for m in g.members]
        list(self.executor.map(self.check, members))
        self._checked = True

    def watch_health(self, every=HEALTH_EVERY):
        def loop():
            while not self._stop.is_set():
                self.check_all()
                self._stop.wait(every)
        threading.Thread(target=loop, daemon=True, name="health").start()

    def report(self):
        """Fresh health of every group and member: (every group writable, dict)."""
        self.check_all()
        groups = []
        for g in self.groups:
            usable = sum(map(self.usable, g.members))
            groups.append({"name": g.name, "weight": g.weight,
                           "writable": usable >= min(self.copies, len(g.members)),
                           "members": [dict(self.health[m], url=m)
                                       for m in g.members]})
        ok = all(g["writable"] for g in groups)
        return ok, {"ok": ok, "groups": groups}

    def usable(self, member):
        h = self.health.get(member, {})
        return h.get("up", True) and not h.get("full")

    def unreachable(self, member, what, blob_id, error):
        log.warning("%s of %s on %s failed: %s", what, blob_id, member, error)
        self.health[member] = dict(self.health.get(member, {}), up=False,
                                   error=str(error))

    def order(self, blob_id):
        """placement() of blob_id, each group with its members ranked.  It
        depends on the id and the configuration only, so it is remembered
        (for ORDER_CACHE ids): the hashing cost a fetch more than its reply."""
        order = self._orders.get(blob_id)
        if order is None:
            order = [(g, rank(blob_id, g.members))
                     for g in placement(blob_id, self.groups)]
            if len(self._orders) >= ORDER_CACHE:
                self._orders.clear()
            self._orders[blob_id] = order
        return order

    def members(self, blob_id, group):
        """A group's members to ask for blob_id: healthy ones first."""
        ranked = next(members for g, members in self.order(blob_id) if g is group)
        return sorted(ranked, key=lambda m: not self.usable(m))

    # Upload.

    def store(self, body, size, blob_id, meta):
        """Store a spooled body under blob_id; returns the number of copies.

        body is bytes or a file (read with pread, never moved).  Raises
        Unavailable when nothing could be stored (or, with strict, fewer
        than the required copies)."""
        best = 0
        # One time for every copy: each member orders this upload and any
        # delete of the id by it (last writer wins).
        meta = dict(meta, **{"X-Sos-Timestamp": str(time.time_ns())})
        # A draining group (weight 0) takes no new uploads.
        order = [g for g, _ in self.order(blob_id) if g.weight > 0]
        # Groups known to be full or down go last, but are still tried:
        # health may be stale, and a late copy beats no copy.
        order.sort(key=lambda g: sum(map(self.usable, g.members)) <
                   min(self.copies, len(g.members)))
        for i, group in enumerate(order):
            need = min(self.copies, len(group.members))
            made = self._store_in_group(group, body, size, blob_id, meta, need)
            if made >= need:
                if i:
                    self.count("failovers")
                    log.info("%s: stored in group %s after %d group(s) could not "
                             "take it", blob_id, group.name, i)
                return made
            best = max(best, made)
        if best and not self.strict:
            self.count("partial")
            log.warning("%s: stored with only %d copy(ies); replicate will "
                        "complete it", blob_id, best)
            return best
        raise Unavailable("could not store %d copies in any group (best: %d)"
                          % (self.copies, best))

    def store_chunked(self, body, chunk_size, meta):
        """Store an upload (an iterable of bytes) of more than chunk_size
        bytes as chunks under a manifest; one of at most chunk_size is
        stored whole.  Returns (id, size, copies, chunks).

        Each chunk goes to its own placement group as soon as it is
        complete, CHUNKS_AHEAD at once, so memory holds a few chunks, never
        the object.  The manifest is stored (under the SHA-1 of all the
        bytes) only once every chunk has its copies: an upload that fails
        or dies half-way leaves no object, only chunks that replicate
        collects after --gc-grace.  Raises Unavailable."""
        hasher, size = hashlib.sha1(), 0
        buf, n = chunk_buffer(chunk_size), 0    # the chunk being filled
        stored, pending = [], collections.deque()

        def send(piece):
            pending.append(self.chunk_senders.submit(self._store_chunk, piece))
            while len(pending) > CHUNKS_AHEAD:
                stored.append(pending.popleft().result())
        try:
            for data in body:
                hash_update(hasher, data)
                size += len(data)
                view = memoryview(data)
                while view:
                    if n == chunk_size:         # full, and more follows
                        send(buf)
                        buf, n = chunk_buffer(chunk_size), 0
                    take = min(len(view), chunk_size - n)
                    buf[n:n + take] = view[:take]
                    n, view = n + take, view[take:]
            if not (pending or stored):         # at most chunk_size: whole
                blob_id = hasher.hexdigest()
                return blob_id, size, self.store(bytes(buf[:n]), size, blob_id, meta), 0
            send(buf[:n])
            stored += [f.result() for f in pending]
        finally:
            for f in pending:
                f.cancel()
        blob_id = hasher.hexdigest()
        chunks = [(chunk_id, length) for chunk_id, length, _ in stored]
        manifest = Manifest(blob_id, size, chunk_size, chunks).encode()
        copies = self.store(manifest, len(manifest), blob_id,
                            dict(meta, **{MANIFEST: str(size)}))
        return blob_id, size, min([copies] + [c for _, _, c in stored]), len(chunks)

    def _store_chunk(self, piece):
        """Store one chunk (bytes-like, left unchanged): (id, size, copies).
        Hashed here, in a sender's thread, while the next chunk arrives:
        in the receiving thread it was a third pass over each byte there."""
        chunk_id = "c" + hashlib.sha1(piece).hexdigest()
        return chunk_id, len(piece), self.store(piece, len(piece), chunk_id, {})

    def chunkable(self):
        """False once a blob-server of the Go original was seen (it answers
        /alive, not /stats): it would keep a manifest without checking it,
        and couldn't list it for replicate.  Large uploads are then stored
        whole, as before chunking."""
        if not self._checked:
            self.check_all()
        return not any(h.get("up") and "checked" in h and "blobs" not in h
                       for h in self.health.values())

    def _store_in_group(self, group, body, size, blob_id, meta, need):
        """Send the blob to every member of group at once; return as soon
        as `need` have it (the rest finish in the background) or all ended."""
        headers = dict(meta, **{"Content-Length": str(size)})
        members = self.members(blob_id, group)
        if isinstance(body, BYTES) and size <= INLINE_UPLOAD:
            return self._store_inline(members, body, blob_id, headers, need)
        # Each sender gets its own descriptor: stragglers still sending when
        # we return must not read a closed (or reused) one.
        futures = [self.executor.submit(
            self._send, member, body if isinstance(body, BYTES) else
            os.dup(body.fileno()), size, blob_id, headers) for member in members]
        made = 0
        pending = set(futures)
        while pending and made < need:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                made += self.count_copy(f.result())
        return made

    def _store_inline(self, members, body, blob_id, headers, need):
        """_store_in_group for a small body, from this thread: it goes to
        every member, then the answers are read as they come.  The members
        still work at once, and no thread is woken per copy (handing copies
        to the executor's threads was a third of a small upload's CPU)."""
        sent = {}
        for member in members:
            try:
                exchange = self.pool.send(member, "POST", "/blob/" + blob_id,
                                          body, headers)
                sent[exchange.fileno()] = member, exchange
            except (OSError, http.client.HTTPException) as e:
                self.unreachable(member, "upload", blob_id, e)
                self.count_copy(False)
        poller = select.poll()
        for fd in sent:
            poller.register(fd, select.POLLIN)
        made = 0
        while sent and made < need:
            ready = poller.poll(self.pool.timeout * 1000)
            if not ready:
                break               # the stragglers time out in the background
            for fd, _ in ready:
                poller.unregister(fd)
                made += self.count_copy(self._stored(*sent.pop(fd), blob_id))
        for member, exchange in sent.values():
            self.executor.submit(self._stored, member, exchange, blob_id)
        return made

    def count_copy(self, stored):
        self.count("copies_made" if stored else "copies_failed")
        return stored

    def _send(self, member, body, size, blob_id, headers):
        """POST the blob (bytes, or a file descriptor this closes) to one
        member; True if it is now durably there."""
        try:
            exchange = self.pool.send(
                member, "POST", "/blob/" + blob_id,
                body if isinstance(body, BYTES) else FilePart(body, 0, size),
                headers)
            return self._stored(member, exchange, blob_id)
        except (OSError, http.client.HTTPException) as e:
            self.unreachable(member, "upload", blob_id, e)
            return False
        finally:
            if not isinstance(body, BYTES):
                os.close(body)

    def _stored(self, member, exchange, blob_id):
        """Read a member's answer to an upload: True if it durably has it."""
        try:
            reply = exchange.reply()
            answer = reply.read()
            reply.close()
        except (OSError, http.client.HTTPException) as e:
            self.unreachable(member, "upload", blob_id, e)
            return False
        if reply.status == HTTPStatus.INSUFFICIENT_STORAGE:
            self.health[member] = dict(self.health.get(member, {}), full=True)
            log.warning("upload of %s to %s: disk full", blob_id, member)
            return False
        if reply.status != HTTPStatus.OK:
            log.warning("upload of %s to %s: %d %s", blob_id, member,
                        reply.status, answer[:200])
            return False
        log.debug("stored %s on %s", blob_id, member)
        return True

    # Delete.

    def delete(self, blob_id):
        """Delete blob_id on every member of every group (fetch falls back to
        other groups, so a copy anywhere would be served), in parallel, as of
        one timestamp.  Returns (copies removed, members that have not
        recorded it: down, or the Go original's, which has no DELETE).
        Raises InvalidId, or Unavailable if no member recorded it."""
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        headers = {"X-Sos-Timestamp": str(time.time_ns())}
        members = [m for g in self.groups for m in g.members]
        removed = list(self.executor.map(
            lambda m: self._delete(m, blob_id, headers), members))
        pending = [m for m, n in zip(members, removed) if n is None]
        if len(pending) == len(members):
            raise Unavailable("delete of %s recorded nowhere" % blob_id)
        self.count("deletes_pending" if pending else "deletes")
        return sum(n or 0 for n in removed), pending

    def _delete(self, member, blob_id, headers):
        """DELETE on one member: the copies it removed, None if not recorded."""
        try:
            reply = self.pool.request(member, "DELETE", "/blob/" + blob_id,
                                      headers=headers)
            answer = reply.read()
            reply.close()
            if reply.status == HTTPStatus.OK:
                return int(json.loads(answer)["removed"])
        except (OSError, http.client.HTTPException) as e:
            self.unreachable(member, "delete", blob_id, e)
            return None
        except (ValueError, LookupError, TypeError):
            pass
        log.warning("delete of %s on %s: %d %s", blob_id, member, reply.status,
                    answer[:200])
        return None

    # Fetch.

    def fetch(self, blob_id, body=True):
        """Find blob_id: a Blob (its size, metadata and bytes); close it.

        Asks the blob's own group first, healthy members first, then the
        other groups.  With body, the bytes are asked for at once (one hop
        in the common case) and a copy up to verify_limit bytes is read and
        checked here: a bad copy falls over to the next member before
        anything is sent.  Without, only the head is asked for (HEAD, 304,
        412).  A copy no newer than a delete seen on the way (a group asked
        earlier said 404 with X-Sos-Deleted) is not served: an id moved or
        diverted under another configuration must not come back from an
        older group.  Raises Missing (every server said 404, or only older
        copies were left) or Unavailable."""
        for member, reply in self._copies(blob_id, body):
            try:
                found = self._found(blob_id, member, reply, body)
            except (OSError, http.client.HTTPException) as e:
                reply.close()
                self.unreachable(member, "fetch", blob_id, e)
                continue
            if found:
                return found

    def read_chunk(self, chunk_id):
        """A chunk's bytes, whole and verified: a bad copy falls over to the
        next member, unseen by the client.  Unavailable if no good copy is
        left: a chunk missing everywhere is a loss, not a 404 of its object."""
        try:
            return self._read_chunk(chunk_id)
        except Missing:
            log.error("chunk %s is missing from every blob-server", chunk_id)
            raise Unavailable("chunk %s is missing" % chunk_id) from None

    def _read_chunk(self, chunk_id):
        for member, reply in self._copies(chunk_id, True):
            try:
                if reply.left and reply.left > 0:
                    # Straight into one buffer: read() joined 256 KiB pieces
                    # (three copies of each byte, holding the GIL).
                    data = chunk_buffer(reply.left, populate=True)
                    if reply.readinto(data) != len(data):
                        raise http.client.IncompleteRead(b"")
                else:
                    data = reply.read()
            except (OSError, http.client.HTTPException) as e:
                self.unreachable(member, "fetch", chunk_id, e)
                continue
            finally:
                reply.close()
            if hashlib.sha1(data).hexdigest() == content_id(chunk_id):
                return data
            self.corrupt("CORRUPT copy of chunk %s on %s: trying another",
                         chunk_id, member)

    def _copies(self, blob_id, body):
        """Yield (member, reply) for each copy of blob_id, in fetch order,
        until the caller has what it wants; then raise Missing or
        Unavailable.  The caller closes each reply.  A member whose copy the
        caller went past (corrupt, cut short) counts as one that could not
        answer: the end is then Unavailable, never a false Missing."""
        unasked, deleted = [], -1
        groups = [g for g, _ in self.order(blob_id)]
        # After a miss everywhere, the placement group is asked once more: a
        # move copies an id there before it removes it elsewhere, so a move
        # that ran between our asks is found there now.
        for group in groups + groups[:1] * (len(groups) > 1):
            for member in self.members(blob_id, group):
                try:
                    reply = self.pool.request(member, "GET" if body else "HEAD",
                                              "/blob/" + blob_id)
                except (OSError, http.client.HTTPException) as e:
                    self.unreachable(member, "fetch", blob_id, e)
                    unasked.append(member)
                    continue
                log.debug("fetch of %s from %s: %d", blob_id, member, reply.status)
                if reply.status == HTTPStatus.NOT_FOUND:
                    when = number(reply.headers.get("X-Sos-Deleted"))
                    deleted = deleted if when is None else max(deleted, when)
                    reply.read()
                    reply.close()
                    continue
                # A copy of no known time counts as written at time 0.
                if deleted >= 0 and \
                        (number(reply.headers.get("X-Sos-Timestamp")) or 0) <= deleted:
                    log.info("fetch of %s: %s holds a copy older than its delete",
                             blob_id, member)
                    reply.close()
                    continue
                yield member, reply
                unasked.append(member)
        if unasked:
            raise Unavailable("%s: could not ask %s" % (blob_id, ", ".join(unasked)))
        raise Missing(blob_id)

    def _found(self, blob_id, member, reply, body):
        """A blob-server's 200 as a Blob; None for a bad reply or copy.  The
        Go original sends no Content-Length for HEAD, nor for bodies over
        2 KiB (chunked): such a Blob's size is None until it was read."""
        if reply.status != HTTPStatus.OK:
            log.warning("fetch of %s from %s: status %d", blob_id, member,
                        reply.status)
            reply.close()
            return None
        try:
            meta = blob_metadata(reply.headers.items())
        except ValueError:
            meta = {}           # a blob-server sent what it should not have
        manifest = reply.headers.get(MANIFEST)
        if manifest is not None:
            return self._manifest(blob_id, member, reply, body, manifest, meta)
        length = reply.headers.get("Content-Length", "")
        blob = StoredBlob(self, blob_id, number(length), meta, member, reply)
        if not body:
            blob.close()
            return blob
        if blob.size is not None and blob.size > self.verify_limit:
            return blob         # streamed, and verified as it goes
        data, chunk = bytearray(), b""
        while len(data) <= self.verify_limit and (chunk := reply.read(CHUNK)):
            data += chunk
        if chunk:               # over verify_limit, of no stated length
            blob.first = bytes(data)
            return blob
        reply.close()
        hasher = content_hash(blob_id)
        if hasher:
            h = hasher()
            hash_update(h, data)
            if h.hexdigest() != content_id(blob_id):
                self.corrupt("CORRUPT copy of %s on %s (%d bytes): trying "
                             "another", blob_id, member, len(data))
                return None
        blob.data, blob.size, blob.reply = bytes(data), len(data), None
        return blob

    def _manifest(self, blob_id, member, reply, body, size, meta):
        """A chunked object's manifest, checked before anything follows it;
        None (another member is asked) if it fails its rules."""
        try:
            data = reply.read() if body else None
        finally:
            reply.close()
        try:
            manifest = data and Manifest.decode(data, blob_id)
            if number(size) is None or manifest and manifest.size != number(size):
                raise BadManifest("X-Sos-Manifest %r" % size)
        except BadManifest as e:
            self.corrupt("CORRUPT manifest of %s on %s: %s; trying another",
                         blob_id, member, e)
            return None
        return ChunkedBlob(self, blob_id, number(size), meta, manifest)

    def corrupt(self, *message):
        """A copy whose bytes don't hash to its id: counted and logged."""
        self.count("corrupt")
        log.error(*message)


def add_cluster_args(parser):
    """The flags that say where the blob-servers are (shared with replicate)."""
    parser.add_argument("--blob-server", metavar="URL,URL",
                        help="blob-servers, all in one group (else read "
                        "/etc/sos.conf and ~/.sos.conf)")
    parser.add_argument("--config", metavar="FILE",
                        help="read groups from FILE instead of the default files")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + VERSION)
