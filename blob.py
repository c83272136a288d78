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
                              507 disk full
    GET  /blob/<id>           the bytes (sendfile), with ETag, Range, 304,
                              and the X-* headers sent with the upload;
                              404 if missing.  HEAD: the same headers only.
    GET  /blobs               JSON array of every id, streamed; sorted, with
                              ?after=ID&limit=N paging and ?prefix=P
    GET  /stats               JSON: blobs, bytes, disk free and total
    GET  /digests             JSON {bucket: digest} of the ids per two-letter
                              bucket, so replicate lists only what differs
    POST /verify/<id>         re-hash a stored blob; a copy whose bytes no
                              longer match its id is moved to .quarantine/

Storage is one plain file per blob, holding exactly its bytes, in directories
sharded by id prefix (``ab/cd/abcd...``), plus an ``<id>.json`` sidecar when
X-* headers were sent.  cp, rsync and backup tools just work.  Every write
streams into ``.tmp/``, is fsynced, renamed into place and its directory
fsynced before the reply, so a crash at any instant leaves the whole blob or
nothing.  Ids of 40 or 64 hex digits are SHA-1 / SHA-256 content ids: the body
is hashed as it streams in and a mismatch is refused, so no corrupt copy is
ever stored under a content id.  A flat store written by the Go original
(``<store>/<id>``) is moved into the sharded layout at start-up.

Started as root, the server binds, chroots into its store and drops to
``--user`` (default nobody).  Run it as:

    blob-server -store data1 -port 4001

This module also holds the small HTTP layer sos.py builds on (request parsing
with hard limits, deadlines, JSON errors, graceful SIGTERM), so it exists once.
"""

import argparse
import collections
import contextlib
import ctypes
import email.utils
import errno
import grp
import hashlib
import hmac
import http.server
import json
import logging
import os
import pwd
import re
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from http import HTTPStatus
from urllib.parse import parse_qs

VERSION = "1.0.0"

DEFAULT_PORT = 3001
ID_RE = re.compile(r"[a-z0-9]{1,128}")
HEX_RE = re.compile(r"[0-9a-f]+")
CONTENT_HASHES = {40: hashlib.sha1, 64: hashlib.sha256}
PAD = "-"                 # sorts before every id character: see BlobStore.shard
TMP_DIR = ".tmp"
QUARANTINE_DIR = ".quarantine"
CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024    # replies up to this size go out in a single write
SPACE_CHECK_EVERY = 16 * 1024 * 1024
RACY_SECONDS = 2.0        # a leaf changed this recently may change again unseen

# Metadata: X-* headers stored with a blob.  Proxy and our own headers are not.
META_EXCLUDED = ("X-Forwarded-", "X-Real-Ip", "X-Sos-", "X-Cluster-")
MAX_META_BYTES = 8192
MAX_META_HEADERS = 32

# HTTP limits (shared with sos.py).
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16384
MAX_CHUNK_LINE = 1024
IDLE_TIMEOUT = 10.0       # seconds a socket may sit silent mid-request
HEAD_TIMEOUT = 10.0       # seconds to wait for, and read, a request head
MIN_RATE = 64 * 1024      # bytes/s a body or response must average, after
RATE_GRACE = 10.0         # ...this many seconds of slack
DRAIN_TIMEOUT = 30.0      # SIGTERM: how long in-flight requests may finish
DIGITS = re.compile(rb"[0-9]{1,19}")
HEXDIGITS = re.compile(rb"[0-9a-fA-F]{1,16}")
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

log = logging.getLogger("blob")
access_log = logging.getLogger("access")


def parse_size(text):
    """Parse '512M', '2G', '1048576' into bytes; raise ValueError otherwise."""
    m = re.fullmatch(r"([0-9]+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError("bad size %r (use e.g. 512M, 2G)" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def valid_id(blob_id):
    """True for ids the original accepted: lowercase letters and digits."""
    return isinstance(blob_id, str) and ID_RE.fullmatch(blob_id) is not None


def content_hash(blob_id):
    """The hash constructor an id commits to (SHA-1, SHA-256), else None."""
    ctor = CONTENT_HASHES.get(len(blob_id))
    return ctor if ctor and HEX_RE.fullmatch(blob_id) else None


def canonical_header(name):
    """Go's CanonicalMIMEHeaderKey: 'x-mime-type' -> 'X-Mime-Type'."""
    return "-".join(part.capitalize() for part in name.split("-"))


def blob_metadata(pairs):
    """The X-* headers of an upload that are stored with the blob.

    Takes (name, value) pairs; returns {Canonical-Name: value}.  Raises
    BadMetadata for values that could inject CR/LF or are too large.
    """
    meta = {}
    for name, value in pairs:
        key = canonical_header(name)
        if not key.startswith("X-") or key.startswith(META_EXCLUDED):
            continue
        # A hand-edited sidecar may hold numbers or lists: refused, not sent.
        if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
            raise BadMetadata("header %s: printable ASCII only" % key)
        meta[key] = value
    if len(meta) > MAX_META_HEADERS or sum(
            len(k) + len(v) for k, v in meta.items()) > MAX_META_BYTES:
        raise BadMetadata("too much X-* metadata (max %d headers, %d bytes)"
                          % (MAX_META_HEADERS, MAX_META_BYTES))
    return meta


def compatible(shard_path, prefix):
    """Can ids starting with prefix live under shard_path ("ab", "abcd")?"""
    stem = shard_path.rstrip(PAD)
    return stem.startswith(prefix) or prefix.startswith(stem)


# --- Storage ---------------------------------------------------------------

class StoreError(Exception):
    """Base of the errors BlobStore raises; the handler maps each to a status."""


class InvalidId(StoreError):
    pass


class Missing(StoreError):
    pass


class Corrupt(StoreError):
    pass


class NoSpace(StoreError):
    pass


class TooLarge(StoreError):
    pass


class BadMetadata(StoreError):
    pass


class BlobStore:
    """Blobs as plain files under a root directory; knows nothing of HTTP.

    Every path is resolved from a directory file descriptor opened once, one
    validated component at a time with O_NOFOLLOW, so neither an id nor a
    planted symlink can reach outside the store, and the store keeps working
    after the process chroots into it.
    """

    def __init__(self, root, reserve=0, max_size=None):
        os.makedirs(root, exist_ok=True)
        self.root = os.path.abspath(root)
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.reserve = reserve
        self.max_size = max_size
        for name in (TMP_DIR, QUARANTINE_DIR):
            try:
                os.mkdir(name, 0o755, dir_fd=self.root_fd)
            except FileExistsError:
                pass
        self.tmp_fd = self._open_dir(self.root_fd, TMP_DIR)
        self.quarantine_fd = self._open_dir(self.root_fd, QUARANTINE_DIR)
        self._leaves = {}          # (d1, d2) -> (mtime_ns, count, bytes, xor)
        self._leaves_lock = threading.Lock()
        self._warming = threading.Event()     # set: no warm() in progress
        self._warming.set()

    def close(self):
        os.close(self.quarantine_fd)
        os.close(self.tmp_fd)
        os.close(self.root_fd)

    # Layout.  Ids shard as ab/cd/abcd...; short ids pad with "-", which sorts
    # before every id character, so walking the tree in name order yields ids
    # in sorted order ("a" < "a0..." and its leaf "a-" < "a0").

    @staticmethod
    def shard(blob_id):
        """(d1, d2): the two directory names under which blob_id lives."""
        padded = blob_id[:4].ljust(4, PAD)
        return padded[:2], padded[2:]

    @staticmethod
    def _open_dir(dir_fd, name):
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC, dir_fd=dir_fd)

    @contextlib.contextmanager
    def _leaf(self, blob_id, create=False):
        """blob_id's leaf directory as an fd, closed on leaving the block."""
        fd = self._leaf_fd(blob_id, create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _leaf_fd(self, blob_id, create=False):
        """An fd of blob_id's leaf directory (caller closes); Missing if absent."""
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        fd = self.root_fd
        try:
            for name in self.shard(blob_id):
                try:
                    next_fd = self._open_dir(fd, name)
                except FileNotFoundError:
                    if not create:
                        raise Missing(blob_id) from None
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    os.fsync(fd)       # the new directory entry is durable
                    next_fd = self._open_dir(fd, name)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise Missing(blob_id) from None   # planted symlink
                    raise
                if fd != self.root_fd:
                    os.close(fd)
                fd = next_fd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        return fd

    # Reading.

    def open(self, blob_id):
        """Open a blob: returns (file, size).  The caller closes the file.

        Raises InvalidId or Missing.  A symlink is never followed.
        """
        with self._leaf(blob_id) as leaf:
            return self._open_in(leaf, blob_id)

    def metadata(self, blob_id):
        """The X-* headers stored with blob_id ({} if none)."""
        with self._leaf(blob_id) as leaf:
            return self._metadata_in(leaf, blob_id)

    def get(self, blob_id):
        """open() and metadata() at once: (file, size, metadata)."""
        with self._leaf(blob_id) as leaf:
            f, size = self._open_in(leaf, blob_id)
            return f, size, self._metadata_in(leaf, blob_id)

    @staticmethod
    def _open_in(leaf, blob_id):
        try:
            fd = os.open(blob_id, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=leaf)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                raise Missing(blob_id) from None
            raise
        f = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise Missing(blob_id)
        return f, st.st_size

    @staticmethod
    def _metadata_in(leaf, blob_id):
        try:
            fd = os.open(blob_id + ".json", os.O_RDONLY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=leaf)
        except OSError:
            return {}
        with os.fdopen(fd, "rb") as f:
            try:
                meta = json.loads(f.read(MAX_META_BYTES * 2))
                return blob_metadata(meta.items())
            except (ValueError, AttributeError, StoreError):
                log.warning("ignoring unreadable metadata of %s", blob_id)
                return {}

    def exists(self, blob_id):
        try:
            f, _ = self.open(blob_id)
        except Missing:
            return False
        f.close()
        return True

    # Writing.

    def check_space(self, incoming=0):
        """Raise NoSpace if writing `incoming` bytes would eat into the reserve."""
        st = os.statvfs(self.root_fd)
        if st.f_bavail * st.f_frsize - incoming < self.reserve or (
                st.f_files and st.f_favail < 2):
            raise NoSpace("disk full")

    def _temp(self):
        """Create a fresh temp file in .tmp/: returns (name, fd)."""
        while True:
            name = "%d.%s.tmp" % (os.getpid(), os.urandom(8).hex())
            try:
                return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                                     dir_fd=self.tmp_fd)
            except FileExistsError:
                continue

    def _write_temp(self, chunks, hasher=None):
        """Stream chunks into a new fsynced temp file: returns (name, size)."""
        name, fd = self._temp()
        size = 0
        next_check = SPACE_CHECK_EVERY
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                if hasher:
                    hasher.update(chunk)
                size += len(chunk)
                if self.max_size is not None and size > self.max_size:
                    raise TooLarge("larger than %d bytes" % self.max_size)
                if size >= next_check:
                    self.check_space()
                    next_check += SPACE_CHECK_EVERY
            os.fsync(fd)
        except BaseException as e:
            os.close(fd)
            os.unlink(name, dir_fd=self.tmp_fd)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("disk full") from None
            raise
        os.close(fd)
        return name, size

    def put(self, blob_id, chunks, meta=None, length=None):
        """Store the bytes of `chunks` under blob_id, durably; returns the size.

        Raises InvalidId, Corrupt (bytes don't hash to a content id), NoSpace,
        TooLarge.  Nothing is visible until everything is on disk.  A content
        id replaces an existing copy (same bytes, verified, which also heals a
        rotten one); any other id keeps the first upload's bytes.  Metadata is
        always the first upload's.
        """
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        if self.max_size is not None and (length or 0) > self.max_size:
            raise TooLarge("larger than %d bytes" % self.max_size)
        self.check_space(length or 0)
        ctor = content_hash(blob_id)
        hasher = ctor() if ctor else None
        tmp, size = self._write_temp(chunks, hasher)
        try:
            if hasher and hasher.hexdigest() != blob_id:
                raise Corrupt("body does not hash to %s" % blob_id)
            with self._leaf(blob_id, create=True) as leaf:
                exists = self._exists_in(leaf, blob_id)
                if meta and not exists:
                    # The sidecar lands before the blob, so a visible blob has
                    # its metadata.  A crash in between leaves an orphan sidecar
                    # that the next upload of this id adopts: still one writer's.
                    mtmp, _ = self._write_temp([json.dumps(meta).encode()])
                    self._link(mtmp, leaf, blob_id + ".json")
                ino = os.stat(tmp, dir_fd=self.tmp_fd).st_ino
                if hasher:
                    os.rename(tmp, blob_id, src_dir_fd=self.tmp_fd, dst_dir_fd=leaf)
                elif not exists:
                    self._link(tmp, leaf, blob_id)
                try:
                    os.fsync(leaf)
                except OSError:
                    if not exists:
                        self._take_back(leaf, blob_id, ino)
                    raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("disk full") from None
            raise
        finally:
            try:
                os.unlink(tmp, dir_fd=self.tmp_fd)
            except FileNotFoundError:
                pass
        return size

    def _link(self, tmp, leaf, name):
        """Hard-link a temp file into place unless the name exists: first wins."""
        try:
            os.link(tmp, name, src_dir_fd=self.tmp_fd, dst_dir_fd=leaf)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp, dir_fd=self.tmp_fd)

    @staticmethod
    def _take_back(leaf, name, ino):
        """Unlink name if it is still the file this upload put there: when
        its directory fails to fsync, the upload fails (5xx), and a failed
        upload must leave nothing behind.  A concurrent writer's file stays."""
        try:
            if os.stat(name, dir_fd=leaf, follow_symlinks=False).st_ino == ino:
                os.unlink(name, dir_fd=leaf)
        except OSError as e:
            log.error("cannot take back %s after a failed fsync: %s", name, e)

    @staticmethod
    def _exists_in(leaf, name):
        try:
            os.stat(name, dir_fd=leaf, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    # Verification.

    def verify(self, blob_id):
        """Re-hash a blob.  Returns True (good), False (quarantined), None
        (not a content id, nothing to check).  Raises Missing."""
        f, _ = self.open(blob_id)
        with f:
            ctor = content_hash(blob_id)
            if not ctor:
                return None
            h = ctor()
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() == blob_id:
            return True
        self.quarantine(blob_id)
        return False

    def quarantine(self, blob_id):
        """Move a blob (and its sidecar) into .quarantine/; never deletes."""
        stamp = "%d" % time.time_ns()
        with self._leaf(blob_id) as leaf:
            for name in (blob_id, blob_id + ".json"):
                try:
                    os.rename(name, "%s.%s" % (name, stamp), src_dir_fd=leaf,
                              dst_dir_fd=self.quarantine_fd)
                except FileNotFoundError:
                    pass
            os.fsync(leaf)
        log.warning("quarantined %s: bytes do not match id", blob_id)

    # Listing.

    def _subdirs(self, fd):
        """Sorted names of the real (non-symlink) subdirectories of fd."""
        # Descriptors dup'ed from one fd share its read position, so two
        # threads scanning root_fd at once (a listing, /stats, warm()) would
        # skip and repeat each other's entries: scan a private open of it.
        own = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            with os.scandir(own) as it:
                return sorted(e.name for e in it if len(e.name) == 2
                              and e.is_dir(follow_symlinks=False))
        finally:
            os.close(own)

    def leaves(self, want=None):
        """Yield (d1, d2) for every leaf directory, in sorted order; with
        want, only under the first-level directories it accepts."""
        for d1 in self._subdirs(self.root_fd):
            if want and not want(d1):
                continue
            try:
                fd1 = self._open_dir(self.root_fd, d1)
            except OSError:
                continue
            try:
                for d2 in self._subdirs(fd1):
                    yield d1, d2
            finally:
                os.close(fd1)

    def _leaf_entries(self, d1, d2, with_size=False):
        """Sorted ids in a leaf, with sizes if asked: [(id, size)]."""
        try:
            fd1 = self._open_dir(self.root_fd, d1)
            try:
                fd = self._open_dir(fd1, d2)
            finally:
                os.close(fd1)
        except OSError:
            return []
        try:
            out = []
            with os.scandir(fd) as it:
                for e in it:
                    if valid_id(e.name) and e.is_file(follow_symlinks=False):
                        out.append((e.name, e.stat(follow_symlinks=False).st_size
                                    if with_size else 0))
            out.sort()
            return out
        finally:
            os.close(fd)

    def ids(self, after=None, prefix="", limit=None):
        """Yield ids in ascending order, > after, starting with prefix."""
        if limit is not None and limit <= 0:
            return
        start = self.shard(after) if after else None
        for d1, d2 in self.leaves(lambda d1: (not start or d1 >= start[0]) and
                                  compatible(d1, prefix)):
            if start and (d1, d2) < start or not compatible(d1 + d2, prefix):
                continue
            for blob_id, _ in self._leaf_entries(d1, d2):
                if (after and blob_id <= after) or not blob_id.startswith(prefix):
                    continue
                yield blob_id
                if limit is not None:
                    limit -= 1
                    if limit <= 0:
                        return

    # Summaries: counts, bytes and id digests per leaf, cached against the
    # leaf's mtime.  Deriving them from the directories rather than counting
    # writes keeps them right with several worker processes, after a crash,
    # and when files are copied in by hand.

    def _leaf_summary(self, d1, d2):
        try:
            st = os.stat("%s/%s" % (d1, d2), dir_fd=self.root_fd,
                         follow_symlinks=False)
        except OSError:
            return (0, 0, 0)
        with self._leaves_lock:
            cached = self._leaves.get((d1, d2))
        if cached and cached[0] == st.st_mtime_ns:
            return cached[1:]
        count = size = xor = 0
        for blob_id, n in self._leaf_entries(d1, d2, with_size=True):
            count += 1
            size += n
            xor ^= int.from_bytes(hashlib.sha1(blob_id.encode()).digest(), "big")
        # A leaf written within the clock's granularity may change again
        # without its mtime moving: don't trust the cache for it yet.
        if time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            with self._leaves_lock:
                self._leaves[(d1, d2)] = (st.st_mtime_ns, count, size, xor)
        return count, size, xor

    def _buckets(self):
        """{d1: (count, bytes, xor)}: the leaf summaries per first-level
        directory.  Waits for a start-up warm() rather than redo its work."""
        self._warming.wait()
        acc = {}
        for d1, d2 in self.leaves():
            count, size, xor = self._leaf_summary(d1, d2)
            c, n, x = acc.get(d1, (0, 0, 0))
            acc[d1] = (c + count, n + size, x ^ xor)
        return acc

    def digests(self):
        """{bucket: "count-xorhex"} per first-level directory (two chars).

        Equal digests mean equal id sets, with overwhelming probability."""
        return {d1: "%d-%040x" % (count, xor)
                for d1, (count, _, xor) in self._buckets().items() if count}

    def stats(self):
        """Blob count, bytes stored, and disk free/total in bytes."""
        buckets = self._buckets().values()
        count = sum(b[0] for b in buckets)
        size = sum(b[1] for b in buckets)
        st = os.statvfs(self.root_fd)
        return {"blobs": count, "bytes": size,
                "disk_free": st.f_bavail * st.f_frsize,
                "disk_total": st.f_blocks * st.f_frsize,
                "reserve": self.reserve,
                "full": st.f_bavail * st.f_frsize < self.reserve}

    # Start-up.

    def recover(self):
        """Remove temp files a crash left behind and adopt a flat Go store.

        Returns (temp files removed, blobs migrated)."""
        removed = 0
        for name in os.listdir(self.tmp_fd):
            os.unlink(name, dir_fd=self.tmp_fd)
            removed += 1
        migrated = 0
        with os.scandir(self.root_fd) as it:
            flat = [e.name for e in it if e.is_file(follow_symlinks=False)]
        for i, name in enumerate(flat):
            if len(name) == 2 and valid_id(name):
                # A two-letter flat id collides with its own shard directory.
                os.rename(name, ".flat-" + name, src_dir_fd=self.root_fd,
                          dst_dir_fd=self.root_fd)
                flat[i] = ".flat-" + name
        # Sidecars first, so a migrated blob always has its metadata.
        for src in sorted(flat, key=lambda n: not n.endswith(".json")):
            name = src[6:] if src.startswith(".flat-") else src
            blob_id = name[:-5] if name.endswith(".json") else name
            if not valid_id(blob_id):
                continue
            with self._leaf(blob_id, create=True) as leaf:
                os.rename(src, name, src_dir_fd=self.root_fd, dst_dir_fd=leaf)
                os.fsync(leaf)
            migrated += name == blob_id
        os.fsync(self.root_fd)
        return removed, migrated

    def warm(self):
        """Compute every leaf's summary once, so /digests answers fast.
        Summaries asked for meanwhile wait for it rather than redo its work."""
        self._warming.clear()
        try:
            for d1, d2 in self.leaves():
                self._leaf_summary(d1, d2)
        finally:
            self._warming.set()


# --- HTTP layer, shared with sos.py -----------------------------------------

class HTTPError(Exception):
    """An error reply: status plus message, sent as {"error": message}."""

    def __init__(self, status, message=None, headers=()):
        self.status = HTTPStatus(status)
        self.message = message or self.status.phrase
        self.headers = headers
        super().__init__(self.message)


class Metrics:
    """Request counters and latency histograms in Prometheus text format.

    Hand-written (stdlib only): counters by route and status, bytes in and
    out, and a latency histogram per route.  Programs add their own gauges
    and counters at render time."""

    BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

    def __init__(self, prefix):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.requests = {}        # (route, status) -> count
        self.latency = {}         # route -> [count per bucket..., +Inf, sum]
        self.bytes = {"in": 0, "out": 0}

    def observe(self, route, status, seconds, bytes_in, bytes_out):
        with self.lock:
            key = (route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.setdefault(route, [0] * (len(self.BUCKETS) + 2))
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += 1
            hist[-1] += seconds
            self.bytes["in"] += bytes_in
            self.bytes["out"] += bytes_out

    def render(self, extra=()):
        """The exposition text; extra is [(name, type, help, [(labels, value)])]."""
        p = self.prefix
        with self.lock:
            families = [
                ("%s_requests_total" % p, "counter", "HTTP requests by route and status",
                 [({"route": r, "status": str(st)}, n)
                  for (r, st), n in sorted(self.requests.items())]),
                ("%s_http_bytes_total" % p, "counter", "HTTP body bytes by direction",
                 [({"direction": d}, n) for d, n in sorted(self.bytes.items())])]
            hist_lines = []
            for route, hist in sorted(self.latency.items()):
                for bound, n in zip(self.BUCKETS + ("+Inf",), hist):
                    hist_lines.append('%s_request_seconds_bucket{route="%s",le="%s"} %d'
                                      % (p, route, bound, n))
                hist_lines.append('%s_request_seconds_sum{route="%s"} %.6f'
                                  % (p, route, hist[-1]))
                hist_lines.append('%s_request_seconds_count{route="%s"} %d'
                                  % (p, route, hist[-2]))
        out = []
        for name, kind, text, samples in families + list(extra):
            out.append("# HELP %s %s\n# TYPE %s %s" % (name, text, name, kind))
            for labels, value in samples:
                lab = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\")
                                            .replace('"', '\\"')) for k, v in
                               sorted(labels.items()))
                out.append("%s%s %s" % (name, "{%s}" % lab if lab else "", value))
        out.append("# HELP %s_request_seconds Request latency by route\n"
                   "# TYPE %s_request_seconds histogram" % (p, p))
        out.extend(hist_lines)
        return "\n".join(out) + "\n"


class Handler(http.server.BaseHTTPRequestHandler):
    """A lean HTTP/1.1 handler with hard limits.

    It parses the request head itself (BaseHTTPRequestHandler's parser has no
    limits on header count or block size and goes through the email package),
    reads bodies with Content-Length or chunked encoding, answers Expect:
    100-continue only once the request was accepted, and turns HTTPError and
    unexpected exceptions into JSON replies.  Subclasses map (method, first
    path segment) to a method in `routes`.
    """

    protocol_version = "HTTP/1.1"
    routes = {}
    open_routes = ()          # routes that need no token
    # The domain's exceptions and the replies they become, in one place.
    errors = {InvalidId: (HTTPStatus.BAD_REQUEST,
                          "invalid id: lowercase letters and digits only"),
              Missing: (HTTPStatus.NOT_FOUND, "not found"),
              Corrupt: (HTTPStatus.UNPROCESSABLE_ENTITY, None),
              NoSpace: (HTTPStatus.INSUFFICIENT_STORAGE, None),
              TooLarge: (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, None),
              BadMetadata: (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, None)}
    tls_failed = False        # the TLS handshake failed: nothing to handle
    linger = False            # unread request bytes: half-close gently

    def setup(self):
        self.timeout = self.server.idle_timeout
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.watch(self)
        if self.server.tls:
            # The handshake runs here, in the connection's own thread and under
            # its deadline, so a silent client can't stall the accept loop.
            self.request.settimeout(self.timeout)
            self.server.set_deadline(self, HEAD_TIMEOUT)
            try:
                self.request = self.server.tls.wrap_socket(self.request,
                                                           server_side=True)
            except OSError as e:
                # wrap_socket has closed the connection: nothing more to set up.
                log.info("TLS handshake with %s failed: %s", self.client_address[0], e)
                self.tls_failed = True
                return
        super().setup()

    def handle(self):
        if not self.tls_failed:
            super().handle()

    def finish(self):
        if self.tls_failed:
            self.server.unwatch(self)
            return
        try:
            if self.linger:
                # Closing with unread request bytes makes the kernel send a
                # reset, which can destroy our reply before the client reads
                # it: half-close and swallow what is still coming, briefly.
                self.server.set_deadline(self, 2.0)
                self.connection.shutdown(socket.SHUT_WR)
                while self.connection.recv(CHUNK):
                    pass
        except OSError:
            pass
        self.server.unwatch(self)
        try:
            super().finish()
        except OSError:
            pass

    def handle_one_request(self):
        self.close_connection = True
        self.head_sent = False
        self.body_pending = False
        self.body_left = 0
        self.requestline = self.command = ""
        self.request_version = "HTTP/1.1"
        self.route = "unknown"
        self.status = 0
        self.sent = self.received = 0
        self.server.set_deadline(self, HEAD_TIMEOUT)
        started = time.monotonic()
        try:
            if not self.read_head():
                return
            self.close_connection = not self.keep_alive()
            # The head is in: the client is no longer late.  Our own work
            # (a cold /digests of a million blobs takes over 10 s) must not
            # be cut off; body reads and replies set deadlines of their own.
            self.server.set_deadline(self, None)
            self.server.set_busy(self, True)
            self.dispatch()
        except HTTPError as e:
            self.fail(e)
        except (OSError, ValueError) as e:
            # The client went away, timed out, or the deadline closed it.
            if not isinstance(e, (ConnectionError, TimeoutError)) and not \
                    self.server.expired(self):
                log.exception("error on %s %s", self.command, self.path)
                self.fail(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR))
            self.close_connection = True
        except Exception:
            log.exception("error on %s %s", self.command, self.path)
            self.fail(HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            self.server.set_busy(self, False)
            if self.status:
                self.server.metrics.observe(self.route, int(self.status),
                                            time.monotonic() - started,
                                            self.received, self.sent)
        if self.body_pending:
            # An unread body: the next request can't be found after it.
            self.close_connection = True
            self.linger = True

    def fail(self, err):
        """Send an error reply, or cut the connection if a reply has begun."""
        self.close_connection = True
        if self.head_sent:
            return
        try:
            self.send_json(err.status, {"error": err.message}, err.headers)
        except OSError:
            pass

    # Request parsing.

    def _readline(self, limit, status):
        line = self.rfile.readline(limit + 1)
        if len(line) > limit:
            raise HTTPError(status)
        return line

    def read_head(self):
        """Read the request line and headers; False on a clean EOF."""
        line = self._readline(MAX_REQUEST_LINE, HTTPStatus.REQUEST_URI_TOO_LONG)
        if line in (b"\r\n", b"\n"):       # tolerated before a request (RFC 9112)
            line = self._readline(MAX_REQUEST_LINE, HTTPStatus.REQUEST_URI_TOO_LONG)
        if not line:
            return False
        self.requestline = line.rstrip(b"\r\n").decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not line.endswith(b"\n"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
        self.request_version = version.decode()
        self.command = method.decode("latin-1")
        self.path = target.decode("latin-1")
        self.headers = headers = {}
        self.header_list = []
        total = 0
        while True:
            line = self._readline(MAX_HEADER_BYTES,
                                  HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            total += len(line)
            if total > MAX_HEADER_BYTES or len(self.header_list) >= MAX_HEADERS:
                raise HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "truncated header")
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.fullmatch(name):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed header")
            name = name.decode().lower()
            value = value.strip(b" \t\r\n").decode("latin-1")
            if "\r" in value or "\n" in value or "\0" in value:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed header")
            if name in headers:
                if name in ("content-length", "transfer-encoding", "host"):
                    raise HTTPError(HTTPStatus.BAD_REQUEST, "duplicate " + name)
                headers[name] += ", " + value
            else:
                headers[name] = value
            self.header_list.append((name, value))
        self.body_pending = "transfer-encoding" in headers or \
            headers.get("content-length", "0") != "0"
        return True

    def keep_alive(self):
        conn = self.headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"

    def dispatch(self):
        path, _, self.query = self.path.partition("?")
        if not path.startswith("/"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad request target")
        first, _, self.rest = path[1:].partition("/")
        method = self.routes.get((self.command, first))
        if method is None:
            allowed = sorted(m for m, p in self.routes if p == first)
            if allowed:
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, headers=[
                    ("Allow", ", ".join(allowed))])
            raise HTTPError(HTTPStatus.NOT_FOUND, "Invalid method or location.")
        self.route = first
        token = self.server.token
        if token and first not in self.open_routes:
            given = self.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, b"Bearer " + token.encode()):
                raise HTTPError(HTTPStatus.UNAUTHORIZED, "missing or wrong token",
                                [("WWW-Authenticate", "Bearer")])
        try:
            getattr(self, method)()
        except Exception as e:
            mapped = self.errors.get(type(e))
            if mapped is None:
                raise
            raise HTTPError(mapped[0], mapped[1] or str(e)) from None

    def params(self):
        """Query parameters as {name: last value}."""
        return {k: v[-1] for k, v in parse_qs(self.query).items()}

    # Request bodies.

    def body_length(self):
        """The declared body length, None for chunked; HTTPError otherwise."""
        te = self.headers.get("transfer-encoding")
        cl = self.headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise HTTPError(HTTPStatus.BAD_REQUEST,
                                "Content-Length with Transfer-Encoding")
            if te.lower() != "chunked":
                raise HTTPError(HTTPStatus.NOT_IMPLEMENTED,
                                "unsupported Transfer-Encoding")
            return None
        if cl is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED)
        if not DIGITS.fullmatch(cl.encode("latin-1")):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        return int(cl)

    def body(self, length):
        """Yield the request body in chunks (length None: chunked encoding).

        Sends 100 Continue first if the client asked, so a refused request
        never has its body sent.  The client must keep up MIN_RATE on average
        after RATE_GRACE seconds, or the connection is cut."""
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.body_left = 1 if length is None else length
        start = time.monotonic()
        received = 0
        chunks = self._chunked() if length is None else self._sized(length)
        for chunk in chunks:
            received += len(chunk)
            self.received = received
            self.server.set_deadline(self, RATE_GRACE + received / MIN_RATE
                                     - (time.monotonic() - start))
            yield chunk
        self.body_pending = False
        # The deadline paces the client's sending.  Once all is in, our own
        # work (fsync, or the sos-server's upstream calls, bounded by their
        # own timeouts) must not be cut short: the client would see a dropped
        # connection for an upload that may well have been stored.
        self.server.set_deadline(self, None)

    def _sized(self, length):
        while self.body_left:
            chunk = self.rfile.read1(min(CHUNK, self.body_left))
            if not chunk:
                raise ConnectionError("body ended early")
            self.body_left -= len(chunk)
            if not self.body_left:
                # All read, even if the consumer fails on this last chunk:
                # drain() must not wait for bytes that will never come.
                self.body_pending = False
            yield chunk

    def _chunked(self):
        while True:
            line = self._readline(MAX_CHUNK_LINE, HTTPStatus.BAD_REQUEST)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not HEXDIGITS.fullmatch(size):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunked body")
            left = int(size, 16)
            if left == 0:
                break
            while left:
                chunk = self.rfile.read1(min(CHUNK, left))
                if not chunk:
                    raise ConnectionError("body ended early")
                left -= len(chunk)
                yield chunk
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunked body")
        for _ in range(MAX_HEADERS):       # trailers, ignored
            line = self._readline(MAX_HEADER_BYTES, HTTPStatus.BAD_REQUEST)
            if line in (b"\r\n", b"\n"):
                return
            if not line:
                raise ConnectionError("body ended early")
        raise HTTPError(HTTPStatus.BAD_REQUEST, "too many trailers")

    def drain(self, limit=64 * 1024):
        """Discard a small unread body so the connection can be reused."""
        try:
            length = self.body_length()
        except HTTPError:
            return
        if self.body_pending and length is not None and length <= limit and \
                self.body_left in (0, length):
            self.body_left = length
            for _ in self._sized(length):
                pass
            self.body_pending = False

    # Replies.

    def send_head(self, status, headers=(), length=None, body=b""):
        """Send the status line and headers, and body if given (one write for
        a small reply); the caller sends the rest of `length` bytes."""
        status = HTTPStatus(status)
        out = ["HTTP/1.1 %d %s\r\n" % (status, status.phrase)]
        out.append("Server: %s\r\nDate: %s\r\n" % (self.server.version,
                                                   self.server.date()))
        for name, value in headers:
            out.append("%s: %s\r\n" % (name, value))
        if length is not None:
            out.append("Content-Length: %d\r\n" % length)
        if self.close_connection:
            out.append("Connection: close\r\n")
        out.append("\r\n")
        # Logged before it is sent: once a client has the reply, the log
        # has the line.
        self.log_request(status.value, length if length is not None else "-")
        self.wfile.write("".join(out).encode("latin-1") + body)
        self.head_sent = True
        self.status = status
        self.sent = length or 0
        if length:
            self.server.set_deadline(self, RATE_GRACE + length / MIN_RATE)

    def send(self, status, body=b"", headers=(), content_type="text/plain"):
        if self.body_pending and "100-continue" not in self.headers.get("expect", ""):
            self.drain()
        if self.body_pending:
            self.close_connection = True
        headers = list(headers)
        if body or content_type:
            headers.append(("Content-Type", content_type))
        self.send_head(status, headers, len(body),
                       body if self.command != "HEAD" else b"")

    def send_json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj).encode() + b"\n", headers,
                  "application/json")

    def send_file(self, f, offset, count):
        """Send count bytes of f from offset; cut the connection if the file
        turns out shorter than promised.  Does not close f."""
        if count and self.command != "HEAD":
            sent = self.connection.sendfile(f, offset, count)
            if sent != count:
                log.error("%s: sent %d of %d bytes: file changed?", self.path,
                          sent, count)
                self.close_connection = True

    def log_request(self, code="-", size="-"):
        access_log.info('%s - - [%s] "%s" %s %s', self.client_address[0],
                        self.server.date(clf=True), self.requestline, code, size)

    def log_message(self, format, *args):
        log.info("%s " + format, self.client_address[0], *args)


class Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server that cuts off clients past their deadline and
    can drain in-flight requests on shutdown."""

    daemon_threads = True
    request_queue_size = 1024
    idle_timeout = IDLE_TIMEOUT
    version = "sos/" + VERSION
    token = None              # bearer token every request must carry
    tls = None                # an ssl.SSLContext to serve HTTPS

    def __init__(self, address, handler, reuse_port=False):
        self.reuse_port = reuse_port
        self._watched = {}       # handler -> [deadline, busy]
        self._watch_lock = threading.Lock()
        self._date = (0, "", "")
        self.metrics = Metrics("sos")
        super().__init__(address, handler)

    def serve_forever(self, poll_interval=0.5):
        # Threads start here, not in __init__, so a bound server can be forked.
        threading.Thread(target=self._reaper, daemon=True).start()
        super().serve_forever(poll_interval)

    def server_bind(self):
        # HTTPServer.server_bind calls getfqdn(), which may hang on DNS and
        # fails after a chroot.  We need neither.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = self.server_address[:2]

    def date(self, clf=False):
        """The Date header value (or the access log's), formatted once a second."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, email.utils.formatdate(now, usegmt=True),
                          time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now)))
        return self._date[2 if clf else 1]

    def watch(self, handler):
        with self._watch_lock:
            self._watched[handler] = [None, False]

    def unwatch(self, handler):
        with self._watch_lock:
            self._watched.pop(handler, None)

    def set_deadline(self, handler, seconds):
        """Cut handler's connection `seconds` from now (None: no deadline)."""
        entry = self._watched.get(handler)
        if entry:
            entry[0] = None if seconds is None else time.monotonic() + seconds

    def set_busy(self, handler, busy):
        entry = self._watched.get(handler)
        if entry:
            entry[1] = busy

    def expired(self, handler):
        entry = self._watched.get(handler)
        return bool(entry and entry[0] and entry[0] < time.monotonic())

    def busy(self):
        return sum(1 for _, busy in list(self._watched.values()) if busy)

    def _reaper(self):
        # One thread enforces every connection's deadline, rather than a
        # timer per socket: a slow client is shut down, which wakes its
        # handler thread out of recv/send with an error.
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._watch_lock:
                late = [h for h, (d, _) in self._watched.items() if d and d < now]
            for h in late:
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drain(self, timeout=DRAIN_TIMEOUT):
        """Stop accepting and wait for in-flight requests; True if all ended."""
        self.shutdown()
        self.socket.close()
        end = time.monotonic() + timeout
        while self.busy() and time.monotonic() < end:
            time.sleep(0.05)
        return not self.busy()


SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve(servers, on_stop=None):
    """Run servers until SIGTERM or SIGINT, then drain them; returns exit code.

    Signals are blocked and taken with sigwait rather than handled: a handler
    runs between two bytecodes of the main thread, and one that set an Event
    while the main thread was inside Event.wait() deadlocked on its lock.
    Threads inherit the mask, so it must be set before any thread starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.stack_size(512 * 1024)    # thousands of idle clients stay cheap
    for srv in servers:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    while signal.sigwait(SIGNALS) == signal.SIGHUP:
        reopen_logs()
    log.info("shutting down: draining in-flight requests")
    ok = all([srv.drain() for srv in servers])
    if on_stop:
        on_stop()
    for handler in access_log.handlers:
        handler.flush()
    if not ok:
        log.warning("some requests did not finish within %ds", DRAIN_TIMEOUT)
    return 0


def serve_workers(workers, on_start=None):
    """Serve each worker's servers in a process of its own.

    workers is a list of lists of servers; the workers' servers are bound to
    the same ports with SO_REUSEPORT, and the kernel spreads connections
    across them.  This process serves the first worker and, on SIGTERM,
    stops the others and waits for them.  on_start runs in every process
    once forked (threads don't survive a fork, so none may start before)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)     # see serve()
    children = []
    for servers in workers[1:]:
        pid = os.fork()
        if pid == 0:
            for other in workers:
                if other is not servers:
                    for srv in other:
                        srv.socket.close()
            if on_start:
                on_start()
            os._exit(serve(servers))
        children.append(pid)
        for srv in servers:
            srv.socket.close()
    if on_start:
        on_start()
    code = serve(workers[0])
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = code or (os.waitstatus_to_exitcode(status) != 0)
    return int(code)


def setup_logging(verbose, access_log_file=None, serving=True):
    """Log to stderr; a server's access log (Common Log Format) there too, or
    to a file."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if serving:
        access_log.propagate = False
        access_log.addHandler(AccessLogWriter(access_log_file))


class AccessLogWriter(logging.Handler):
    """The access log's output.  Request threads only append a line; a
    background thread writes them out every 0.2 s, so no request waits on a
    slow disk or pipe (with a plain handler, one thread's write held a lock
    that every other request queued behind).

    A file is reopened on SIGHUP through a descriptor of its directory, so
    even a blob-server that chrooted into its store can follow logrotate
    (once privileges are dropped, that directory must be writable by --user).
    """

    def __init__(self, path=None):
        super().__init__()
        self.path = path and os.path.abspath(path)
        self.dir_fd = self.path and os.open(os.path.dirname(self.path),
                                            os.O_RDONLY | os.O_DIRECTORY)
        self.lines = collections.deque()
        self.stream = None
        self.reopen = True
        self.writer_pid = None
        self.write_lock = threading.Lock()
        if self.path:
            self.flush()               # a bad path fails now, not later

    def emit(self, record):
        self.lines.append(record.getMessage())
        if self.writer_pid != os.getpid():     # first line, or a forked worker
            self.writer_pid = os.getpid()
            threading.Thread(target=self._write_forever, daemon=True).start()

    def _write_forever(self):
        while True:
            time.sleep(0.2)
            try:
                self.flush()
            except OSError:
                # A full or failing log disk costs the lines of this round,
                # not the writer: without it they would pile up in memory.
                continue

    def flush(self):
        with self.write_lock:
            lines = []
            while self.lines:
                lines.append(self.lines.popleft())
            if self.path and self.reopen:
                self.reopen = False
                name = os.path.basename(self.path)
                try:
                    stream = open(name, "a", encoding="utf-8", opener=lambda _, f:
                                  os.open(name, f | os.O_NOFOLLOW, 0o644,
                                          dir_fd=self.dir_fd))
                except OSError as e:
                    if not self.stream:
                        raise               # at start-up: a bad path is fatal
                    log.error("cannot reopen %s, still writing the old file: %s",
                              self.path, e)
                else:
                    if self.stream:
                        self.stream.close()
                    self.stream = stream
            if lines:
                out = self.stream or sys.stderr
                out.write("\n".join(lines) + "\n")
                out.flush()


def reopen_logs():
    """SIGHUP: reopen the access log file, so logrotate can move it away."""
    for handler in access_log.handlers:
        if isinstance(handler, AccessLogWriter) and handler.path:
            handler.reopen = True
            handler.flush()


def read_token(path):
    """The secret in a token file, stripped; exits with a message if unusable."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit("cannot read token file %s: %s" % (path, e))
    if not token or not all(" " < c <= "~" for c in token):
        sys.exit("token file %s: expected one printable ASCII word" % path)
    return token


def tls_context(cert, key):
    """A server-side SSL context, or None without a certificate."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def add_server_args(parser):
    """Flags every server shares: logging, tokens and TLS."""
    parser.add_argument("--access-log", metavar="FILE",
                        help="write the access log here (reopened on SIGHUP) "
                        "instead of stderr")
    parser.add_argument("--cluster-token", metavar="FILE",
                        help="shared secret of sos-server, replicate and "
                        "blob-servers")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with "
                        "this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="its private key")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that also takes Go-style single-dash long flags (-port 4001)."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        longs = {s for a in self._actions for s in a.option_strings
                 if s.startswith("--")}
        fixed = []
        for arg in args:
            name = arg.split("=", 1)[0]
            if name.startswith("-") and not name.startswith("--") and \
                    "-" + name in longs:
                arg = "-" + arg
            fixed.append(arg)
        return super().parse_args(fixed, namespace)


# --- blob-server ------------------------------------------------------------

class BlobHandler(Handler):
    """Routes the blob-server API onto a BlobStore (self.server.store)."""

    routes = {
        ("GET", "alive"): "do_alive",
        ("GET", "blob"): "do_get", ("HEAD", "blob"): "do_get",
        ("POST", "blob"): "do_post",
        ("GET", "blobs"): "do_list",
        ("GET", "stats"): "do_stats",
        ("GET", "digests"): "do_digests",
        ("POST", "verify"): "do_verify",
        ("GET", "metrics"): "do_metrics",
    }
    open_routes = ("alive",)

    def do_alive(self):
        self.send(HTTPStatus.OK, b"alive")

    def do_get(self):
        store = self.server.store
        blob_id = self.rest
        f, size, meta = store.get(blob_id)
        with f:
            headers = [("ETag", '"%s"' % blob_id), ("Accept-Ranges", "bytes"),
                       ("Cache-Control", "public, max-age=31536000, immutable")]
            headers.append(("Content-Type", meta.get("X-Mime-Type",
                                                     "application/octet-stream")))
            headers.extend(sorted(meta.items()))
            status, offset, count, extra = http_range(
                self.headers, blob_id, size)
            if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
                raise HTTPError(status, headers=extra)
            if status == HTTPStatus.NOT_MODIFIED:
                self.send_head(status, headers)
            elif count <= SMALL_BODY and self.command == "GET":
                # A small blob goes out with its head in one write: cheaper
                # than sendfile's setup, and a file that shrank under us is
                # found before anything is sent.
                data = os.pread(f.fileno(), count, offset)
                if len(data) != count:
                    log.error("%s: %d of %d bytes: file changed?", blob_id,
                              len(data), count)
                    raise HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                    "blob changed while being read")
                self.send_head(status, headers + extra, count, data)
            else:
                self.send_head(status, headers + extra, count)
                self.send_file(f, offset, count)

    def do_post(self):
        length = self.body_length()
        meta = blob_metadata(self.header_list)
        size = self.server.store.put(self.rest, self.body(length), meta, length)
        self.send_json(HTTPStatus.OK, {"id": self.rest, "status": "OK", "size": size})

    def do_list(self):
        p = self.params()
        after = p.get("after") or None
        prefix = p.get("prefix", "")
        try:
            limit = int(p["limit"]) if "limit" in p else None
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad limit") from None
        if (after and not valid_id(after)) or (prefix and not valid_id(prefix)):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "bad after or prefix")
        ids = self.server.store.ids(after, prefix, limit)
        # Chunked: the listing streams whatever the store holds, in constant
        # memory, and is still one JSON array for the Go original's replicate.
        self.send_head(HTTPStatus.OK, [("Content-Type", "application/json"),
                                       ("Transfer-Encoding", "chunked")])
        if self.command == "HEAD":
            return
        batch, sep = ["["], ""
        for blob_id in ids:
            batch.append('%s"%s"' % (sep, blob_id))
            sep = ","
            if len(batch) >= 2000:
                self._chunk("".join(batch))
                batch = []
        batch.append("]\n")
        self._chunk("".join(batch))
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, text):
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def do_stats(self):
        self.send_json(HTTPStatus.OK, self.server.store.stats())

    def do_digests(self):
        self.send_json(HTTPStatus.OK, self.server.store.digests())

    def do_metrics(self):
        st = self.server.store.stats()
        gauges = [("sos_blob_%s" % k, "gauge", "blob-server %s" % k.replace("_", " "),
                   [({}, int(v))]) for k, v in sorted(st.items())]
        self.send(HTTPStatus.OK, self.server.metrics.render(gauges).encode(),
                  content_type="text/plain; version=0.0.4")

    def do_verify(self):
        result = self.server.store.verify(self.rest)
        self.send_json(HTTPStatus.OK, {"id": self.rest, "ok": result is not False,
                                       "verified": result is not None,
                                       "quarantined": result is False})


def not_modified(headers, etag):
    """True if the request's If-None-Match names etag (or *)."""
    tags = [t.strip() for t in headers.get("if-none-match", "").split(",")]
    return "*" in tags or '"%s"' % etag in tags or 'W/"%s"' % etag in tags


def http_range(headers, etag, size):
    """Apply If-None-Match and Range to a resource of `size` bytes.

    Returns (status, offset, count, extra headers): 200 whole, 206 partial,
    304 not modified, 416 unsatisfiable.  One range only; anything else
    (multiple ranges, other units) is ignored and the whole body sent, as RFC
    9110 allows."""
    if not_modified(headers, etag):
        return HTTPStatus.NOT_MODIFIED, 0, 0, []
    rng = headers.get("range", "")
    m = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)", rng.strip())
    if not m or (not m.group(1) and not m.group(2)) or (
            headers.get("if-range") and headers["if-range"] != '"%s"' % etag):
        return HTTPStatus.OK, 0, size, []
    first, last = m.groups()
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return HTTPStatus.OK, 0, size, []
    else:
        start, end = max(0, size - int(last)), size - 1
    if start >= size or (not first and int(last) == 0):
        return (HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, 0, 0,
                [("Content-Range", "bytes */%d" % size)])
    return (HTTPStatus.PARTIAL_CONTENT, start, end - start + 1,
            [("Content-Range", "bytes %d-%d/%d" % (start, end, size))])


def make_server(address, store, handler=BlobHandler, token=None, tls=None,
                reuse_port=False):
    """A blob-server for `store` bound to `address`; not yet serving."""
    srv = Server(address, handler, reuse_port)
    srv.store = store
    srv.version = "blob-server/" + VERSION
    srv.metrics.prefix = "sos_blob"
    srv.token = token
    srv.tls = tls
    return srv


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


def drop_privileges(store_dir, uid, gid):
    """chroot into the store and become uid:gid; exits if that fails.

    Everything the process will ever need is loaded before this: after the
    chroot nothing outside the store can be opened, imported or resolved."""
    st = os.stat(store_dir)
    if (st.st_uid, st.st_gid) != (uid, gid):
        for top, dirs, files in os.walk(store_dir):
            for name in [top] + [os.path.join(top, n) for n in dirs + files]:
                os.chown(name, uid, gid, follow_symlinks=False)
    # BlobStore made these as root a moment ago, also in a store that already
    # belongs to uid (made with `install -d -o nobody`): every write needs them.
    for name in (TMP_DIR, QUARANTINE_DIR):
        os.chown(os.path.join(store_dir, name), uid, gid, follow_symlinks=False)
    try:
        # glibc dlopens libgcc_s when a thread exits (for unwinding); after the
        # chroot it couldn't, and the process would abort on its first exit.
        ctypes.CDLL("libgcc_s.so.1")
    except OSError:
        pass
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
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port (default 1)")
    parser.add_argument("--max-size", type=parse_size, default=None,
                        help="largest blob accepted (default: no limit)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--version", action="version",
                        version="blob-server " + VERSION)
    add_server_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.access_log)

    store = BlobStore(args.store, max_size=args.max_size)
    if args.reserve is None:
        st = os.statvfs(store.root_fd)
        args.reserve = min(256 << 20, st.f_blocks * st.f_frsize // 20)
    store.reserve = args.reserve
    removed, migrated = store.recover()
    if removed or migrated:
        log.info("start-up: removed %d temp files, adopted %d flat blobs",
                 removed, migrated)
    try:
        token = read_token(args.cluster_token)
        tls = tls_context(args.tls_cert, args.tls_key)
        workers = [make_server((args.host, args.port), store, token=token, tls=tls,
                               reuse_port=args.workers > 1)]
        while len(workers) < args.workers:
            workers.append(make_server((args.host, workers[0].server_port), store,
                                       token=token, tls=tls, reuse_port=True))
        srv = workers[0]
    except OSError as e:
        parser.exit(1, "blob-server: cannot listen on %s:%d: %s\n"
                    % (args.host, args.port, e.strerror))
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
    sys.exit(serve_workers([[w] for w in workers], lambda: threading.Thread(
        target=store.warm, daemon=True).start()))


if __name__ == "__main__":
    main()
