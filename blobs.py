"""blobs: what a fetch hands the sos-server, and how its bytes are read.

Cluster.fetch finds a blob and returns a Blob: its size, ETag (the id), X-*
metadata and read(offset, count), an iterator of its bytes, verified where
they can be.  sos-server turns it into a reply and knows nothing else of
it: a StoredBlob is one blob-server's copy of a whole blob, a ChunkedBlob an
object stored as chunks under a manifest (README: Large objects).  Both
read through the Cluster that found them (its pool, its executor, its other
members), and neither knows any HTTP of the sos-server's own.
"""

import collections
import hashlib
import mmap
import queue
import threading
from http import HTTPStatus

from rules import CHUNK, Corrupt, content_hash, content_id, hash_update

BIG_CHUNK = 1 << 20       # a large verified fetch is relayed in these...
PIPELINE = 4              # ...with this many received ahead of the sending
CHUNKS_AHEAD = 3          # chunks of an object sent or fetched at once


class Blob:
    """A blob found in the cluster, as sos-server serves it: its size, its
    ETag (the id), its X-* metadata, and read() for its bytes.  A chunked
    object will be a second kind of Blob; sos-server knows only this one.
    Always close a Blob (or use it in a with block)."""

    def __init__(self, blob_id, size, meta):
        self.id, self.etag, self.size, self.meta = blob_id, blob_id, size, meta

    def read(self, offset=0, count=None):
        """An iterator of the bytes from offset, count of them (None: to the
        end).  What may fail before the first byte (asking a blob-server)
        fails here, not in the iteration.  Bytes that don't hash to the id
        raise Corrupt in the iteration before the last of them is given."""
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StoredBlob(Blob):
    """A blob stored whole on a blob-server: `data` when it was read and
    verified in fetch(), else the member's open `reply`.

    A content id's whole body is always verified: in memory, or as it
    streams, its last chunk held back until the hash is right.  A range of
    a small blob is cut from its verified bytes; a range of a larger one is
    asked of the member and passed through unverified: only the whole can
    be hashed (chunked objects will verify ranges chunk by chunk)."""

    def __init__(self, cluster, blob_id, size, meta, member, reply):
        super().__init__(blob_id, size, meta)
        self.cluster, self.member, self.reply = cluster, member, reply
        self.data = None        # the whole body, read and verified
        self.first = b""        # the start of a body still being received

    def read(self, offset=0, count=None):
        if self.data is not None:
            end = len(self.data) if count is None else offset + count
            return iter((self.data[offset:end],))
        if offset == 0 and count in (None, self.size) and self.reply:
            hasher = content_hash(self.id)
            if not hasher:
                return self._relay(self.reply, self.first)
            return self._verified(self.reply, self.first, hasher())
        return self._range(offset, count)

    def _range(self, offset, count):
        self.close()            # the whole body's reply, if any: not needed
        self.reply = self.cluster.pool.request(
            self.member, "GET", "/blob/" + self.id,
            headers={"Range": "bytes=%d-%d" % (offset, offset + count - 1)})
        if self.reply.status != HTTPStatus.PARTIAL_CONTENT or \
                self.reply.left != count:
            raise Unavailable("range of %s on %s: status %d" % (
                self.id, self.member, self.reply.status))
        return self._relay(self.reply)

    @staticmethod
    def _relay(reply, first=b""):
        if first:
            yield first
        while chunk := reply.read(CHUNK):
            yield chunk

    def _verified(self, reply, first, hasher):
        """The whole body, hashed as it streams; its last chunk is held back
        until the hash is right, so a client never gets a complete wrong
        body.  Receiving and hashing run in threads of their own while this
        one sends (all three let go of the GIL), so a large fetch uses two
        cores, not one after the other."""
        # Buffers go round: a fresh 1 MiB buffer per chunk cost more than the
        # hashing (copying into new pages: 57% of a fetch's CPU).
        free, received, chunks = queue.Queue(), queue.Queue(), queue.Queue()
        for _ in range(PIPELINE + 2):
            free.put(bytearray(BIG_CHUNK))
        stop = threading.Event()

        def stage(work, source, sink):
            try:
                while not stop.is_set():
                    try:
                        item = source.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    item = work(item)
                    sink.put(item)
                    if not item[1]:
                        return
            except BaseException as e:        # handed to the sending side
                chunks.put((None, e))

        def receive(buffer):
            return buffer, memoryview(buffer)[:reply.readinto(buffer)]

        def digest(item):
            hash_update(hasher, item[1])
            return item
        threads = [threading.Thread(target=stage, args=args, daemon=True) for args
                   in ((receive, free, received), (digest, received, chunks))]
        for t in threads:
            t.start()
        hash_update(hasher, first)
        held, held_buffer = first, None
        try:
            while True:
                buffer, chunk = chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if not chunk:
                    break
                if held:
                    yield held         # sent once we are resumed
                if held_buffer:
                    free.put(held_buffer)
                held, held_buffer = chunk, buffer
        finally:
            stop.set()
            for t in threads:
                t.join()
        if hasher.hexdigest() != content_id(self.id):
            self.cluster.corrupt("CORRUPT copy of %s on %s found while streaming",
                                 self.id, self.member)
            raise Corrupt("CORRUPT copy of %s on %s" % (self.id, self.member))
        if held:
            yield held

    def close(self):
        if self.reply:
            self.reply.close()
            self.reply = None


def chunk_buffer(size, populate=False):
    """A writable buffer of size zero bytes (a memoryview), given back to
    the system as soon as the last view of it is dropped: an anonymous map,
    not the heap.  A bytearray of a chunk cost a memset holding the GIL
    (60% of a chunked fetch's GIL-holding samples), and freed ones stayed
    in the allocator's per-thread arenas (sos-server grew to 184 MiB).

    With populate its pages are mapped at once (MAP_POPULATE), without the
    GIL: faulted in one by one they cost 0.32 s of CPU per GiB, populated
    0.18 s.  Only for bytes already on their way (a chunk read from a
    blob-server): an upload's buffer is filled at the client's pace, and a
    populated one let 100 clients that sent 7 bytes of a 10 MiB body hold
    800 MiB (fault row 14)."""
    if not size:
        return memoryview(bytearray())
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, size, flags=flags))


class ChunkedBlob(Blob):
    """An object stored as chunks under a manifest (see README: Large
    objects).  Its chunks are read in order, CHUNKS_AHEAD of them at once
    from their groups, each whole and verified against its id before any of
    its bytes is given (a bad copy falls over to another member, unseen);
    a range reads only the chunks it covers.  The whole object is also
    hashed against its id, its last bytes held back until that is right."""

    def __init__(self, cluster, blob_id, size, meta, manifest):
        super().__init__(blob_id, size, meta)
        self.cluster, self.manifest = cluster, manifest
        self.pending = collections.deque()

    def read(self, offset=0, count=None):
        if self.manifest is None:              # found by a HEAD
            with self.cluster.fetch(self.id) as blob:
                self.manifest = blob.manifest
        count = self.size - offset if count is None else count
        size = self.manifest.chunk_size
        first = offset // size
        wanted = iter(self.manifest.chunks[first:(offset + count - 1) // size + 1])
        self._ahead(wanted)
        data = self.pending.popleft().result()   # fails before the reply does
        whole = hashlib.sha1() if count == self.size else None
        return self._stream(data, wanted, offset - first * size, count, whole)

    def _ahead(self, wanted):
        while len(self.pending) < CHUNKS_AHEAD:
            chunk = next(wanted, None)
            if chunk is None:
                return
            self.pending.append(self.cluster.executor.submit(
                self.cluster.read_chunk, chunk[0]))

    def _stream(self, data, wanted, skip, count, whole):
        held, hashed = None, None
        while True:
            self._ahead(wanted)
            piece = memoryview(data)[skip:skip + count]
            skip, count = 0, count - len(piece)
            if whole:
                # Hashed in another thread while `held` goes out, one piece
                # after the other: in this thread the whole's hash and the
                # sending took turns on one core.
                if hashed:
                    hashed.result()
                hashed = self.cluster.executor.submit(whole.update, piece)
            if held is not None:
                yield held
            held = piece
            if not self.pending:
                break
            data = self.pending.popleft().result()
        if hashed:
            hashed.result()
        if whole is not None and whole.hexdigest() != self.id:
            self.cluster.corrupt("CORRUPT object %s: its chunks are right, but "
                                 "not its whole", self.id)
            raise Corrupt("%s: the chunks' bytes don't hash to the id" % self.id)
        yield held

    def close(self):
        while self.pending:
            self.pending.pop().cancel()


class Unavailable(Exception):
    """Not enough blob-servers could be reached to answer."""
