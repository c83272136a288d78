"""diskio: the file I/O the store is built on, kept apart so blobstore.py
reads as the store's rules: a full disk as one exception, a cache of open
leaf directories, a writer that sends large bodies past the page cache with
O_DIRECT, and the leaf summaries kept across restarts.
"""

import contextlib
import errno
import fcntl
import mmap
import os
import threading

DIRECT_BLOCK = 1024 * 1024      # O_DIRECT writes go in blocks of this size
SUMMARIES = ".summaries"  # the leaf summaries, kept across restarts (a cache)
SUMMARIES_HEAD = b"sos leaf summaries 1\n"
SUMMARIES_MAX = 64 << 20  # bytes: 65,536 leaves take about 5 MiB


class NoSpace(Exception):
    """The disk is full, or writing would eat into the reserve."""


@contextlib.contextmanager
def no_space():
    """A full disk (or quota) in the block raises NoSpace."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace("disk full") from None
        raise


class LeafCache:
    """Open directory fds by key, at most `size`, shared by request threads.

    An fd is closed only once no thread uses it: get() counts a user in,
    put() out, and an entry pushed out while in use is closed by its last
    user.  Two short lock holds per use, nothing done under the lock."""

    def __init__(self, size):
        self.size = size
        self.lock = threading.Lock()
        self.entries = {}         # key -> [fd, users, evicted]

    def get(self, key, opener):
        """The entry [fd, ...] for key, opening it with opener() if needed;
        hand it back with put()."""
        with self.lock:
            entry = self.entries.get(key)
            if entry:
                entry[1] += 1
                return entry
        fd = opener()
        with self.lock:
            entry = self.entries.get(key)
            if entry:             # another thread opened it meanwhile
                entry[1] += 1
            else:
                entry = self.entries[key] = [fd, 1, False]
                fd = None
                if len(self.entries) > self.size:
                    old = self.entries.pop(next(iter(self.entries)))
                    old[2] = True
                    fd = old[0] if old[1] == 0 else None
        if fd is not None:
            os.close(fd)
        return entry

    def put(self, entry):
        with self.lock:
            entry[1] -= 1
            last = entry[1] == 0 and entry[2]
        if last:
            os.close(entry[0])

    def drop(self, key, entry):
        """Forget key's entry (its fd is closed once its users put it back)."""
        with self.lock:
            if self.entries.get(key) is entry:
                del self.entries[key]
                entry[2] = True

    def close(self):
        with self.lock:
            entries, self.entries = list(self.entries.values()), {}
        for fd, users, _ in entries:
            os.close(fd)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class DirectWriter:
    """Writes a file through a page-aligned buffer, whole blocks with
    O_DIRECT: a large body goes to the disk without first filling the page
    cache.  Taking fresh page-cache pages cost more than anything else in a
    large upload (copy_folio_from_iter_atomic: 60% of the CPU of a 1 GiB
    upload); O_DIRECT wrote 1 GiB in a third of the time and CPU.  The tail,
    less than a block, is written through the page cache.  On a filesystem
    without O_DIRECT, every write goes through the page cache."""

    def __init__(self, fd):
        self.fd = fd
        self.buffer = mmap.mmap(-1, DIRECT_BLOCK)      # page-aligned
        self.view = memoryview(self.buffer)
        self.filled = 0
        self.direct = self._direct(True)

    def _direct(self, on):
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT if on
                        else flags & ~os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False
        return on

    def write(self, data):
        data = memoryview(data)
        while data:
            n = min(len(data), DIRECT_BLOCK - self.filled)
            self.view[self.filled:self.filled + n] = data[:n]
            self.filled += n
            data = data[n:]
            if self.filled == DIRECT_BLOCK:
                # A short write would leave the next one unaligned (EINVAL);
                # a regular file takes less than asked only when it is full.
                if os.write(self.fd, self.view) != DIRECT_BLOCK:
                    raise OSError(errno.ENOSPC, "disk full")
                self.filled = 0

    def finish(self):
        """Write the tail (the file offset is block-aligned, the length not)."""
        if self.direct:
            self._direct(False)
        write_all(self.fd, self.view[:self.filled])
        self.filled = 0

    def close(self):
        self.view.release()
        self.buffer.close()


# --- The leaf summaries, kept across restarts (a cache) ------------------------

# A restart used to read every file of the store again (a stat and a SHA-1
# per id: 8 s for a million blobs, in each worker) before it could answer
# /digests.  The summaries are saved instead, and an entry is trusted on the
# same terms as in memory: only while its leaf's mtime is the one it was
# computed at (every create, rename and unlink in a leaf moves it), and never
# for a leaf changed within RACY_SECONDS of the computation.  So a stale, lost
# or torn file costs time, never a wrong digest, and it needs no fsync.

def save_summaries(root_fd, leaves):
    """Write [((d1, d2), (mtime, count, size, xor, tombstones, oldest,
    sidecars))] to SUMMARIES in the store, replacing it atomically.  Not in
    .tmp/, which holds uploads alone; one temp name per worker, as every
    worker saves; a crash's leftover goes at the next start."""
    lines = [SUMMARIES_HEAD] + [
        ("%s%s %d %d %d %x %d %s %d\n" % (
            d1, d2, mtime, count, size, xor, tombs,
            "-" if oldest is None else oldest, sidecars)).encode()
        for (d1, d2), (mtime, count, size, xor, tombs, oldest, sidecars) in leaves]
    name = "%s.%d.tmp" % (SUMMARIES, os.getpid())
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(lines)
        os.rename(name, SUMMARIES, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=root_fd)
        raise


def load_summaries(root_fd):
    """{(d1, d2): summary} from SUMMARIES; a missing or unreadable file
    counts as empty, a torn line as absent (that leaf is read again)."""
    try:
        fd = os.open(SUMMARIES, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=root_fd)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        data = f.read(SUMMARIES_MAX + 1)
    if not data.startswith(SUMMARIES_HEAD) or len(data) > SUMMARIES_MAX:
        return {}
    loaded = {}
    for line in data[len(SUMMARIES_HEAD):].splitlines():
        try:
            leaf, mtime, count, size, xor, tombs, oldest, sidecars = \
                line.decode().split()
            loaded[(leaf[:2], leaf[2:])] = (
                int(mtime), int(count), int(size), int(xor, 16), int(tombs),
                None if oldest == "-" else int(oldest), int(sidecars))
        except ValueError:
            continue
    return loaded
