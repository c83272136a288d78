"""blobstore: a blob-server's blobs on local disk; knows nothing of HTTP.

Storage is one plain file per blob, holding exactly its bytes, in directories
sharded by id prefix (``ab/cd/abcd...``), plus an ``<id>.json`` sidecar when
X-* headers were sent.  cp, rsync and backup tools just work.  Every write
streams into ``.tmp/``, is fsynced, renamed into place and its directory
fsynced before the reply, so a crash at any instant leaves the whole blob or
nothing.  Ids of 40 or 64 hex digits (and chunk ids, ``c`` and 40) commit to
the SHA-1 / SHA-256 of the bytes, hashed as they stream in: a mismatch is
refused, so no corrupt copy is ever stored under a content id (a manifest is
checked by its own rules).  A flat store written by the Go original is moved
into the sharded layout at start-up.

A delete leaves a tombstone, an empty ``<id>.deleted``, so replicate can tell
"deleted" from "never had it".  Every write's time (X-Sos-Timestamp, ns since
the epoch; else this server's clock) is its file's mtime, and the newest write
of an id wins (last writer wins, as Swift's X-Timestamp).  A sweep removes
tombstones older than --reclaim-age.

Reads never wait on a writer: uploads, deletes and reclaim decide under a
flock of the id's leaf directory.  blob.py serves a BlobStore over HTTP; the
rules it shares with the other programs are in rules.py, its file I/O
(O_DIRECT writes of DIRECT_MIN bytes and up, cached leaf fds) in diskio.py.
"""

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import stat
import threading
import time
import types

from diskio import (SUMMARIES, DirectWriter, LeafCache, NoSpace, load_summaries,
                    no_space, save_summaries, write_all)
from rules import (CHUNK, MAX_MANIFEST, MAX_META_BYTES, BadManifest, Corrupt, InvalidId,
                   Manifest, Missing, blob_metadata, compatible, content_hash,
                   content_id, hash_update, number, shard, valid_id)

TMP_DIR = ".tmp"
QUARANTINE_DIR = ".quarantine"
SPACE_CHECK_EVERY = 16 * 1024 * 1024
DIRECT_MIN = 8 * 1024 * 1024    # bodies this large are written with O_DIRECT
RACY_SECONDS = 2.0        # a leaf changed this recently may change again unseen
LEAF_FDS = 4096           # leaf directories kept open for reads
META_CACHE = 8192         # blobs whose metadata (or its absence) is remembered
NO_META = types.MappingProxyType({})   # no metadata, shared, read-only
TOMBSTONE = ".deleted"    # <id>.deleted: the id was deleted at the file's mtime
MANIFEST = "X-Sos-Manifest"   # in a sidecar: the blob is a manifest of this size

log = logging.getLogger("blobstore")


class TooLarge(Exception):
    """Larger than --max-size."""


class Tampered(Exception):
    """A shard directory of the store is not a directory (a planted link)."""


class BlobStore:
    """Blobs as plain files under a root directory; knows nothing of HTTP.

    Every path is resolved from a directory file descriptor opened once, one
    validated component at a time with O_NOFOLLOW, so neither an id nor a
    planted symlink can reach outside the store, and the store keeps working
    after the process chroots into it.
    """

    def __init__(self, root, reserve=0, max_size=None, reclaim_age=None):
        """reclaim_age: seconds a tombstone is kept (None: for ever); a delete
        older than that leaves none (see delete)."""
        os.makedirs(root, exist_ok=True)
        self.root = os.path.abspath(root)
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.reserve = reserve
        self.max_size = max_size
        self.reclaim_age = reclaim_age
        for name in (TMP_DIR, QUARANTINE_DIR):
            try:
                os.mkdir(name, 0o755, dir_fd=self.root_fd)
            except FileExistsError:
                pass
        self.tmp_fd = self._open_dir(self.root_fd, TMP_DIR)
        self.quarantine_fd = self._open_dir(self.root_fd, QUARANTINE_DIR)
        self._leaves = {}          # (d1, d2) -> (mtime_ns,) + _leaf_summary()
        self._leaves_lock = threading.Lock()
        self._warming = threading.Event()     # set: no warm() in progress
        self._warming.set()
        self._leaf_fds = LeafCache(LEAF_FDS)
        # A blob's metadata never changes while its file lives: remembered
        # by (inode, ctime), which a new file under the same name never shares.
        self._meta = {}
        self._tmp_prefix = os.urandom(8).hex()
        self._tmp_count = itertools.count()
        self.direct = True        # until the filesystem refuses O_DIRECT

    def close(self):
        self._leaf_fds.close()
        os.close(self.quarantine_fd)
        os.close(self.tmp_fd)
        os.close(self.root_fd)

    # Layout: ab/cd/abcd... (rules.shard).

    @staticmethod
    def _open_dir(dir_fd, name):
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC, dir_fd=dir_fd)

    @contextlib.contextmanager
    def _leaf(self, blob_id, create=False, lock=False):
        """blob_id's leaf directory as an fd, closed on leaving the block.

        With lock, the block holds the leaf's flock: writes that compare
        timestamps before they change the leaf (upload, delete, reclaim) take
        turns, across threads and worker processes, so no decision is made on
        a state that another one is changing.  Reads never wait."""
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        fd = self._leaf_fd(blob_id, create)
        try:
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX)     # released by the close
            yield fd
        finally:
            os.close(fd)

    def _leaf_fd(self, blob_id, create=False):
        """An fd of blob_id's leaf directory (caller closes); Missing if absent."""
        fd = self.root_fd
        try:
            for name in shard(blob_id):
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
                    # A planted symlink: to a reader the blob is not here; a
                    # writer can't put it there, which is the store's fault.
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        if not create:
                            raise Missing(blob_id) from None
                        log.error("store tampered with: %s is not a directory",
                                  name)
                        raise Tampered("store damaged, see the server's log") \
                            from None
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
            f, st = self._open_in(leaf, blob_id)
            return f, st.st_size

    def metadata(self, blob_id):
        """The X-* headers stored with blob_id ({} if none)."""
        with self._leaf(blob_id) as leaf:
            return self._metadata_in(leaf, blob_id)

    def get(self, blob_id):
        """The request path's open: (fd, size, metadata, timestamp).  The
        caller closes the fd (os.close).

        The leaf directory's fd comes from a cache (LEAF_FDS of them), so a
        read costs one openat, not three.  A cached directory that was removed
        meanwhile (a wiped store) is found on a miss and opened afresh.  What
        a blob's file implies (its metadata, no newer tombstone beside it) is
        remembered by (inode, ctime), which a new file never shares."""
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        key = shard(blob_id)
        for retry in (False, True):
            entry = self._leaf_fds.get(key, lambda: self._leaf_fd(blob_id))
            try:
                return self._get_in(entry[0], blob_id)
            except Missing:
                if retry or os.fstat(entry[0]).st_nlink:
                    raise
                self._leaf_fds.drop(key, entry)
            finally:
                self._leaf_fds.put(entry)

    def _get_in(self, leaf, blob_id):
        fd, st = self._open_fd(leaf, blob_id)
        try:
            key = (st.st_ino, st.st_ctime_ns)
            meta = self._meta.get(key)
            if meta is None:
                if self._tombstoned(leaf, blob_id, st):
                    raise Missing(blob_id)
                # Most blobs have no metadata: they share one empty mapping.
                meta = self._metadata_in(leaf, blob_id) or NO_META
                if len(self._meta) >= META_CACHE:
                    self._meta.clear()
                self._meta[key] = meta
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size, meta, st.st_mtime_ns

    def _open_in(self, leaf, blob_id):
        fd, st = self._open_fd(leaf, blob_id)
        if self._tombstoned(leaf, blob_id, st):
            os.close(fd)
            raise Missing(blob_id)
        return os.fdopen(fd, "rb"), st

    def _tombstoned(self, leaf, blob_id, st):
        """A tombstone beside the blob (a crash cut a delete short) wins if
        it is as new: the newest write is the id's state, as in listings."""
        tomb = self._stat_in(leaf, blob_id + TOMBSTONE)
        return bool(tomb and tomb.st_mtime_ns >= st.st_mtime_ns)

    @staticmethod
    def _open_fd(leaf, blob_id):
        """Open blob_id in its leaf: (fd, stat).  Missing unless a regular
        file (a symlink is never followed)."""
        try:
            fd = os.open(blob_id, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=leaf)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                raise Missing(blob_id) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Missing(blob_id)
        return fd, st

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
                manifest = meta.get(MANIFEST)
                meta = blob_metadata(meta.items())
            except (ValueError, AttributeError):
                log.warning("ignoring unreadable metadata of %s", blob_id)
                return {}
        # Ours, not an uploader's: blob_metadata leaves X-Sos-* out.
        if number(manifest) is not None:
            meta[MANIFEST] = manifest
        return meta

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
        """Create a fresh temp file in .tmp/: returns (name, fd).

        Names are a random prefix and a counter: no syscall to make one.
        Forked workers start with the same prefix; the first name one of
        them finds taken draws that worker a new prefix."""
        while True:
            name = "%s.%d.tmp" % (self._tmp_prefix, next(self._tmp_count))
            try:
                return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                                     dir_fd=self.tmp_fd)
            except FileExistsError:
                self._tmp_prefix = os.urandom(8).hex()

    def _write_temp(self, chunks, hasher=None, mtime=None, length=None):
        """Stream chunks into a new fsynced temp file, its mtime set to
        `mtime` (ns) if given: returns (name, size).  A body declared
        DIRECT_MIN or larger is written past the page cache (DirectWriter)."""
        name, fd = self._temp()
        size = 0
        next_check = SPACE_CHECK_EVERY
        out = None
        try:
            if (length or 0) >= DIRECT_MIN and self.direct:
                out = DirectWriter(fd)
                self.direct = out.direct
            for chunk in chunks:
                if out:
                    out.write(chunk)
                else:
                    write_all(fd, chunk)
                if hasher:
                    hash_update(hasher, chunk)
                size += len(chunk)
                if self.max_size is not None and size > self.max_size:
                    raise TooLarge("larger than %d bytes" % self.max_size)
                if size >= next_check:
                    self.check_space()
                    next_check += SPACE_CHECK_EVERY
            if out:
                out.finish()
            if mtime is not None:
                os.utime(fd, ns=(mtime, mtime))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=self.tmp_fd)
            raise
        finally:
            if out:
                out.close()
        os.close(fd)
        return name, size

    def put(self, blob_id, chunks, meta=None, length=None, timestamp=None,
            manifest=None):
        """Store the bytes of `chunks` under blob_id, durably, as written at
        `timestamp` (ns since the epoch; default now).  Returns (size, stored).

        With manifest (the object's size), the bytes are a manifest of the
        object blob_id (checked by the caller: Manifest.decode), stored
        without the content check, which can't apply; the id's existing
        copy, a manifest or the whole bytes, stays (both are the object).
        A verified upload of the whole bytes keeps an existing manifest too.

        Raises InvalidId, Corrupt (bytes don't hash to a content id), NoSpace,
        TooLarge.  Nothing is visible until everything is on disk.  A content
        id replaces an existing copy (same bytes, verified, which also heals a
        rotten one); any other id keeps the first upload's bytes.  Metadata is
        always the first upload's.  The blob keeps the newer of its timestamp
        and the upload's.  A tombstone as new as the upload supersedes it:
        stored is False and nothing changes (last writer wins).
        """
        if not valid_id(blob_id):
            raise InvalidId(blob_id)
        if self.max_size is not None and (length or 0) > self.max_size:
            raise TooLarge("larger than %d bytes" % self.max_size)
        self.check_space(length or 0)
        ts = time.time_ns() if timestamp is None else timestamp
        ctor = content_hash(blob_id)
        hasher = ctor() if ctor and manifest is None else None
        if manifest is not None:
            meta = dict(meta or {}, **{MANIFEST: str(manifest)})
        with no_space():
            tmp, size = self._write_temp(chunks, hasher, ts, length)
        try:
            if hasher and hasher.hexdigest() != content_id(blob_id):
                raise Corrupt("body does not hash to %s" % blob_id)
            with no_space(), self._leaf(blob_id, create=True, lock=True) as leaf:
                old, tomb = self._settle(leaf, blob_id)
                if tomb and tomb.st_mtime_ns >= ts:
                    return size, False
                if meta and not old:
                    # The sidecar lands before the blob, so a visible blob has
                    # its metadata.  A crash in between leaves an orphan sidecar
                    # that the next upload of this id adopts: still one writer's.
                    mtmp, _ = self._write_temp([json.dumps(meta).encode()])
                    self._link(mtmp, leaf, blob_id + ".json")
                keep = old and (not hasher or self._metadata_in(leaf, blob_id)
                                .get(MANIFEST))
                if not keep:
                    if old and old.st_mtime_ns > ts:
                        self._touch(self.tmp_fd, tmp, old.st_mtime_ns)
                    # The leaf is locked: nothing else may change blob_id.
                    os.rename(tmp, blob_id, src_dir_fd=self.tmp_fd, dst_dir_fd=leaf)
                    tmp = None
                elif old.st_mtime_ns < ts:
                    self._touch(leaf, blob_id, ts)
                try:
                    os.fsync(leaf)
                except OSError:
                    if not old:
                        self._take_back(leaf, blob_id)
                    raise
                if tomb:
                    # Only once the blob is durable: a crash before this
                    # leaves the older tombstone beside it, and the newer wins.
                    os.unlink(blob_id + TOMBSTONE, dir_fd=leaf)
                    os.fsync(leaf)
        finally:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=self.tmp_fd)
        return size, True

    def delete(self, blob_id, timestamp=None):
        """Delete blob_id as of `timestamp` (ns since the epoch; default now):
        record a tombstone, then remove the blob and its sidecar, durably.

        Returns (deleted, removed, timestamp); removed is 1 if a blob went.
        If the id's blob or tombstone is newer, nothing changes: deleted is
        False, timestamp that state's.  A tie deletes a blob (the tombstone
        wins ties).  The tombstone is on disk before the blob goes, so a
        crash leaves the blob whole or deleted.  A delete older than
        reclaim_age removes an older blob but leaves no tombstone: it would
        be reclaimed at once, and a member that reclaimed it would get it
        back from replicate (sent by a member that had not yet), and so on
        for ever.  Then deleted is None.  Raises InvalidId, NoSpace."""
        ts = time.time_ns() if timestamp is None else timestamp
        expired = self.reclaim_age is not None and \
            ts < time.time_ns() - self.reclaim_age * 1e9
        with no_space(), self._leaf(blob_id, create=True, lock=True) as leaf:
            old, tomb = self._settle(leaf, blob_id)
            now = old or tomb
            if now and now.st_mtime_ns > ts:
                return False, 0, now.st_mtime_ns
            if tomb and tomb.st_mtime_ns == ts:
                return True, 0, ts
            if expired:
                removed = self._remove_blob(leaf, blob_id)
                os.fsync(leaf)
                return None, removed, ts
            tmp, _ = self._write_temp([], mtime=ts)
            os.rename(tmp, blob_id + TOMBSTONE, src_dir_fd=self.tmp_fd,
                      dst_dir_fd=leaf)
            removed = self._remove_blob(leaf, blob_id)
            os.fsync(leaf)
            return True, removed, ts

    def remove_moved(self, blob_id, timestamp):
        """Remove blob_id's blob or tombstone if written at `timestamp`,
        leaving no tombstone: a move's removal in the group the id left (or a
        collection's).  A newer write (an upload or a delete since) stays.
        Returns (removed, the timestamp of what is there now or None)."""
        try:
            with self._leaf(blob_id, lock=True) as leaf:
                old, tomb = self._settle(leaf, blob_id)
                now = old or tomb
                if not now or now.st_mtime_ns != timestamp:
                    return False, now and now.st_mtime_ns
                if old:
                    self._remove_blob(leaf, blob_id)
                else:
                    os.unlink(blob_id + TOMBSTONE, dir_fd=leaf)
                os.fsync(leaf)
                return True, None
        except Missing:           # not even its leaf directory
            return False, None

    def deleted_at(self, blob_id):
        """The timestamp of blob_id's tombstone, None if it has none."""
        with contextlib.suppress(Missing), self._leaf(blob_id) as leaf:
            tomb = self._stat_in(leaf, blob_id + TOMBSTONE)
            return tomb and tomb.st_mtime_ns
        return None

    def _settle(self, leaf, blob_id):
        """blob_id's (blob stat, tombstone stat), at most one of them set:
        a crash between the steps of a delete or of an upload over a
        tombstone leaves both, and then the older goes (the blob on a tie).
        Call with the leaf locked."""
        blob, tomb = self._stat_in(leaf, blob_id), \
            self._stat_in(leaf, blob_id + TOMBSTONE)
        if blob and tomb:
            if tomb.st_mtime_ns >= blob.st_mtime_ns:
                self._remove_blob(leaf, blob_id)
                blob = None
            else:
                os.unlink(blob_id + TOMBSTONE, dir_fd=leaf)
                tomb = None
            os.fsync(leaf)
        return blob, tomb

    @staticmethod
    def _remove_blob(leaf, blob_id):
        """Unlink a blob, then its sidecar; returns 1 if the blob was there."""
        removed = 0
        for name in (blob_id, blob_id + ".json"):
            try:
                os.unlink(name, dir_fd=leaf)
                removed += name == blob_id
            except FileNotFoundError:
                pass
        return removed

    @staticmethod
    def _touch(dir_fd, name, ts):
        """Set a file's mtime (its write's timestamp) to ts, durably."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.utime(fd, ns=(ts, ts))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _link(self, tmp, leaf, name):
        """Hard-link a temp file into place unless the name exists: first wins."""
        try:
            os.link(tmp, name, src_dir_fd=self.tmp_fd, dst_dir_fd=leaf)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp, dir_fd=self.tmp_fd)

    @staticmethod
    def _take_back(leaf, name):
        """Unlink the file this upload put at name (the leaf is locked, so
        it is still this upload's): when its directory fails to fsync, the
        upload fails (5xx), and a failed upload must leave nothing behind."""
        try:
            os.unlink(name, dir_fd=leaf)
        except OSError as e:
            log.error("cannot take back %s after a failed fsync: %s", name, e)

    @staticmethod
    def _stat_in(leaf, name):
        """The stat of a regular file in leaf, else None."""
        try:
            st = os.stat(name, dir_fd=leaf, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    # Verification.

    def verify(self, blob_id):
        """Re-hash a blob (a manifest: check it by its own rules).  Returns
        True (good), False (quarantined), None (not a content id, nothing to
        check).  Raises Missing."""
        f, _ = self.open(blob_id)
        with f:
            ctor = content_hash(blob_id)
            if not ctor:
                return None
            if self.metadata(blob_id).get(MANIFEST):
                try:
                    Manifest.decode(f.read(MAX_MANIFEST + 1), blob_id)
                    return True
                except BadManifest:
                    self.quarantine(blob_id)
                    return False
            h = ctor()
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() == content_id(blob_id):
            return True
        self.quarantine(blob_id)
        return False

    def quarantine(self, blob_id):
        """Move a blob (and its sidecar) into .quarantine/; never deletes."""
        stamp = "%d" % time.time_ns()
        with self._leaf(blob_id, lock=True) as leaf:
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

    def _leaf_entries(self, d1, d2, detail=False):
        """A leaf's ids in sorted order: [(id, kind, size, timestamp, both,
        sidecar)].

        kind is "blob" or "tombstone", size a blob's bytes, both True for an
        id with a blob and a tombstone (a crash cut a write short), whose
        newer counts (the tombstone on a tie), sidecar True if the id has an
        <id>.json.  Sizes and timestamps cost a stat per file: read if asked
        (detail), else only for such ids."""
        try:
            fd1 = self._open_dir(self.root_fd, d1)
            try:
                fd = self._open_dir(fd1, d2)
            finally:
                os.close(fd1)
        except OSError:
            return []
        files, out, sidecars = {}, [], set()
        try:
            with os.scandir(fd) as it:
                for e in it:
                    blob_id, kind = e.name, "blob"
                    if blob_id.endswith(".json"):
                        sidecars.add(blob_id[:-5])
                        continue
                    if blob_id.endswith(TOMBSTONE):
                        blob_id, kind = blob_id[:-len(TOMBSTONE)], "tombstone"
                    if valid_id(blob_id) and e.is_file(follow_symlinks=False):
                        files.setdefault(blob_id, []).append((kind, e))
            for blob_id, found in sorted(files.items()):
                both = len(found) > 1
                states = []
                for kind, e in found:
                    try:
                        st = e.stat(follow_symlinks=False) if detail or both else None
                    except FileNotFoundError:
                        continue                  # removed since the scan
                    states.append((st.st_mtime_ns if st else 0, kind == "tombstone",
                                   kind, st.st_size if st and kind == "blob" else 0))
                if states:
                    ts, _, kind, size = max(states)
                    out.append((blob_id, kind, size, ts, both, blob_id in sidecars))
        finally:
            os.close(fd)
        return out

    def entries(self, after=None, prefix="", limit=None, tombstones=False):
        """Yield (id, timestamp, kind) in ascending id order, > after,
        starting with prefix (or any of a tuple of prefixes): the blobs, and
        with tombstones the tombstones too (kind "blob" or "tombstone");
        timestamps only with tombstones."""
        if limit is not None and limit <= 0:
            return
        prefixes = prefix if isinstance(prefix, tuple) else (prefix,)
        start = shard(after) if after else None
        if all(len(p) >= 4 for p in prefixes):
            # Each names its leaf: no need to walk the tree to find them.
            leaves = sorted({shard(p) for p in prefixes})
        else:
            leaves = self.leaves(lambda d1: (not start or d1 >= start[0]) and
                                 any(compatible(d1, p) for p in prefixes))
        for d1, d2 in leaves:
            if start and (d1, d2) < start or \
                    not any(compatible(d1 + d2, p) for p in prefixes):
                continue
            for blob_id, kind, _, ts, _, _ in self._leaf_entries(d1, d2, tombstones):
                if (after and blob_id <= after) or not blob_id.startswith(prefixes) \
                        or kind == "tombstone" and not tombstones:
                    continue
                yield blob_id, ts, kind
                if limit is not None:
                    limit -= 1
                    if limit <= 0:
                        return

    def manifests(self, after=None, limit=None):
        """Yield (id, timestamp) of the live manifests, in id order, > after;
        only leaves whose (cached) summary counts a sidecar are read."""
        start = shard(after) if after else None
        for d1, d2 in self.leaves(lambda d1: not start or d1 >= start[0]):
            if start and (d1, d2) < start or not self._leaf_summary(d1, d2)[5]:
                continue
            for blob_id, kind, _, ts, _, sidecar in self._leaf_entries(d1, d2, True):
                if kind == "blob" and sidecar and (not after or blob_id > after) \
                        and self.metadata(blob_id).get(MANIFEST):
                    yield blob_id, ts
                    if limit is not None:
                        limit -= 1
                        if limit <= 0:
                            return

    def ids(self, after=None, prefix="", limit=None):
        """Yield the ids of blobs in ascending order, > after, with prefix."""
        return (blob_id for blob_id, _, _ in self.entries(after, prefix, limit))

    # Summaries: counts, bytes and id digests per leaf, cached against the
    # leaf's mtime.  Deriving them from the directories rather than counting
    # writes keeps them right with several worker processes, after a crash,
    # and when files are copied in by hand.

    def _leaf_summary(self, d1, d2):
        """(ids, bytes, xor, tombstones, oldest, sidecars): ids counts blobs
        and tombstones, xor folds SHA-1s of "<id>" and "<id>.deleted" (so a
        member with a tombstone differs from one with the blob, or with
        nothing), oldest is the earliest tombstone's timestamp (0 if a crash
        left an id with both files), None without either; sidecars counts
        the blobs with metadata (a manifest among them)."""
        try:
            st = os.stat("%s/%s" % (d1, d2), dir_fd=self.root_fd,
                         follow_symlinks=False)
        except OSError:
            return (0, 0, 0, 0, None, 0)
        with self._leaves_lock:
            cached = self._leaves.get((d1, d2))
        if cached and cached[0] == st.st_mtime_ns:
            return cached[1:]
        count = size = xor = tombs = sidecars = 0
        oldest = None
        for blob_id, kind, n, ts, both, sidecar in self._leaf_entries(d1, d2, True):
            count += 1
            size += n
            name = blob_id + TOMBSTONE if kind == "tombstone" else blob_id
            xor ^= int.from_bytes(hashlib.sha1(name.encode()).digest(), "big")
            sidecars += kind == "blob" and sidecar
            if kind == "tombstone" or both:
                tombs += kind == "tombstone"
                oldest = min(0 if both else ts, ts if oldest is None else oldest)
        summary = (count, size, xor, tombs, oldest, sidecars)
        # A leaf written within the clock's granularity may change again
        # without its mtime moving: don't trust the cache for it yet.
        if time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            with self._leaves_lock:
                self._leaves[(d1, d2)] = (st.st_mtime_ns,) + summary
        return summary

    def _buckets(self):
        """{d1: (ids, bytes, xor, tombstones)}: the leaf summaries per
        first-level directory.  Waits for a start-up warm() rather than redo
        its work."""
        self._warming.wait()
        acc = {}
        for d1, d2 in self.leaves():
            count, size, xor, tombs = self._leaf_summary(d1, d2)[:4]
            c, n, x, t = acc.get(d1, (0, 0, 0, 0))
            acc[d1] = (c + count, n + size, x ^ xor, t + tombs)
        return acc

    def digests(self, bucket=None):
        """{bucket: "count-xorhex"} per first-level directory (two chars);
        with bucket, per leaf under it: {"<d1><d2>": "count-xorhex"}.

        Equal digests mean equal sets of ids and tombstones, with
        overwhelming probability."""
        if bucket is None:
            return {d1: "%d-%040x" % (count, xor)
                    for d1, (count, _, xor, _) in self._buckets().items() if count}
        self._warming.wait()
        out = {}
        for d1, d2 in self.leaves(lambda d1: d1 == bucket):
            count, _, xor = self._leaf_summary(d1, d2)[:3]
            if count:
                out[d1 + d2] = "%d-%040x" % (count, xor)
        return out

    def stats(self):
        """Blob and tombstone counts, bytes stored, disk free/total in bytes."""
        buckets = self._buckets().values()
        tombs = sum(b[3] for b in buckets)
        st = os.statvfs(self.root_fd)
        return {"blobs": sum(b[0] for b in buckets) - tombs,
                "bytes": sum(b[1] for b in buckets), "tombstones": tombs,
                "disk_free": st.f_bavail * st.f_frsize,
                "disk_total": st.f_blocks * st.f_frsize,
                "reserve": self.reserve,
                "full": st.f_bavail * st.f_frsize < self.reserve}

    # Reclaiming tombstones.

    def reclaim(self, age):
        """Remove tombstones older than `age` seconds; returns how many.

        Visits only leaves whose summary holds an old tombstone (or an id a
        crash left with both files, settled on the way), so a sweep costs
        a stat per leaf."""
        cutoff = time.time_ns() - int(age * 1e9)
        removed = 0
        for d1, d2 in self.leaves():
            oldest = self._leaf_summary(d1, d2)[4]
            if oldest is None or oldest >= cutoff:
                continue
            for blob_id, kind, _, ts, both, _ in self._leaf_entries(d1, d2, True):
                if not both and (kind == "blob" or ts >= cutoff):
                    continue
                try:
                    with self._leaf(blob_id, lock=True) as leaf:
                        _, tomb = self._settle(leaf, blob_id)
                        if tomb and tomb.st_mtime_ns < cutoff:
                            os.unlink(blob_id + TOMBSTONE, dir_fd=leaf)
                            os.fsync(leaf)
                            removed += 1
                except Missing:
                    continue
        return removed

    def reclaim_forever(self, age):
        """reclaim() every age/10 seconds (at most an hour, at least a
        second apart), for a thread of its own."""
        while True:
            time.sleep(min(3600.0, max(1.0, age / 10)))
            try:
                n = self.reclaim(age)
                log.log(logging.INFO if n else logging.DEBUG,
                        "reclaimed %d tombstone(s) older than %gs", n, age)
            except OSError as e:
                log.error("reclaiming tombstones: %s", e)

    # Start-up.

    def recover(self):
        """Remove temp files a crash left behind and adopt a flat Go store.

        Returns (temp files removed, blobs migrated)."""
        removed = 0
        for name in os.listdir(self.tmp_fd):
            os.unlink(name, dir_fd=self.tmp_fd)
            removed += 1
        for name in os.listdir(self.root_fd):
            if name.startswith(SUMMARIES + ".") and name.endswith(".tmp"):
                os.unlink(name, dir_fd=self.root_fd)    # a save cut short
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
        """Compute every leaf's summary once, so /digests answers fast, and
        save them (save_summaries).  Summaries asked for meanwhile wait for
        it rather than redo its work.  Those saved by the last run are
        taken first: only leaves changed since are read."""
        self._warming.clear()
        try:
            self.load_summaries()
            for d1, d2 in self.leaves():
                self._leaf_summary(d1, d2)
        finally:
            self._warming.set()
        self.save_summaries()

    def save_summaries(self):
        """Write the leaf summaries known now (diskio.save_summaries)."""
        with self._leaves_lock:
            leaves = sorted(self._leaves.items())
        try:
            save_summaries(self.root_fd, leaves)
        except OSError as e:
            log.warning("cannot save the leaf summaries: %s", e)

    def load_summaries(self):
        """Take the saved summaries of leaves not summarised yet: how many."""
        loaded = load_summaries(self.root_fd)
        with self._leaves_lock:
            for key, value in loaded.items():
                self._leaves.setdefault(key, value)
        return len(loaded)
