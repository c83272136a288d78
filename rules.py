"""rules: the API's rules, which every SOS program and the store share.

Which ids are valid, which hash a content id commits to, which X-* headers
are a blob's metadata, the shard rule (``ab/cd/<id>``, whose first half is
the bucket of /digests), the headers every blob reply carries, conditional
requests and ranges (the ETag is the id), and the two body forms that both
the server (httpd) and the upstream client (upstream) send: a FilePart and
chunked framing.  Nothing here does I/O.
"""

import hashlib
import json
import mimetypes
import os
import re
from http import HTTPStatus

VERSION = "1.0.0"

ID_RE = re.compile(r"[a-z0-9]{1,128}")
HEX_RE = re.compile(r"[0-9a-f]+")
NUMBER = re.compile(r"[0-9]{1,19}")
RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
CONTENT_HASHES = {40: hashlib.sha1, 64: hashlib.sha256}
# A chunk of a large object: "c" and the SHA-1 of the chunk's bytes.
CHUNK_ID = re.compile(r"c[0-9a-f]{40}")
MANIFEST_VERSION = 1
MAX_MANIFEST = 1 << 20    # bytes: some 16,000 chunks
PAD = "-"                 # pads short ids in shard names; sorts before [a-z0-9]
CHUNK = 256 * 1024
BYTES = (bytes, bytearray, memoryview)   # a body held in memory
HASH_KEEPS_GIL = 16 * 1024   # hash_update: hashed in 2 KiB pieces up to this

# Metadata: X-* headers stored with a blob.  Proxy and our own headers are not.
META_EXCLUDED = ("X-Forwarded-", "X-Real-Ip", "X-Sos-", "X-Cluster-",
                 "X-Content-Type-Options")
MAX_META_BYTES = 8192
MAX_META_HEADERS = 32
# HTTP message limits, which the server (httpd) and the client (upstream)
# both apply to what they read.
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16384
MAX_CHUNK_LINE = 1024
DIGITS = re.compile(rb"[0-9]{1,19}")
HEXDIGITS = re.compile(rb"[0-9a-fA-F]{1,16}")
# Objects never change, so a year of freshness.
IMMUTABLE = "max-age=31536000, immutable"
# A compressed file is served as what it is, never with a Content-Encoding
# that would make a browser unpack it.
ENCODED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                 "xz": "application/x-xz", "compress": "application/x-compress",
                 "br": "application/x-brotli"}

# --- The API's rules ----------------------------------------------------------

class InvalidId(ValueError):
    """Not an id: ids are 1-128 lowercase letters and digits."""


class BadMetadata(ValueError):
    """An X-* header value that can't be stored or sent back."""


class TooMuchMetadata(BadMetadata):
    """More X-* metadata than a blob may carry."""


class Missing(LookupError):
    """No such blob."""


class Corrupt(ValueError):
    """Bytes that do not hash to the content id they were sent under."""




def valid_id(blob_id):
    """True for ids the original accepted: lowercase letters and digits."""
    return isinstance(blob_id, str) and ID_RE.fullmatch(blob_id) is not None


def content_hash(blob_id):
    """The hash constructor an id commits to (SHA-1, SHA-256; a chunk id
    commits to the SHA-1 of the chunk), else None."""
    if CHUNK_ID.fullmatch(blob_id):
        return hashlib.sha1
    ctor = CONTENT_HASHES.get(len(blob_id))
    return ctor if ctor and HEX_RE.fullmatch(blob_id) else None


def number(text):
    """The count in text, as our headers and query values carry sizes and
    timestamps (ASCII digits, below 2**63), else None.  str.isdigit alone
    takes "²", which int() then refuses."""
    if isinstance(text, str) and NUMBER.fullmatch(text) and int(text) < 1 << 63:
        return int(text)
    return None


def content_id(blob_id):
    """The hex digest blob_id commits to (itself, or a chunk id's digest)."""
    return blob_id[1:] if CHUNK_ID.fullmatch(blob_id) else blob_id


def hash_update(h, data):
    """h.update(data), keeping the GIL for small data: hashlib lets go of it
    for 2 KiB or more, and under load taking it back cost a small fetch
    more than hashing (9% of a 4 KiB fetch's GIL-holding samples)."""
    if len(data) > HASH_KEEPS_GIL:
        h.update(data)
        return
    view = memoryview(data)
    for i in range(0, len(view), 2047):
        h.update(view[i:i + 2047])


def shard(blob_id):
    """(d1, d2): the directories blob_id lives under (``ab/cd/abcd...``).

    d1 is also the id's bucket in /digests.  Short ids pad with "-", which
    sorts before every id character, so walking the tree in name order yields
    ids in sorted order ("a" < "a0..." and its leaf "a-" < "a0")."""
    padded = blob_id[:4].ljust(4, PAD)
    return padded[:2], padded[2:]


def compatible(shard_path, prefix):
    """Can ids starting with prefix live under shard_path ("ab", "abcd")?"""
    stem = shard_path.rstrip(PAD)
    return stem.startswith(prefix) or prefix.startswith(stem)


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
        if name[:2] not in ("X-", "x-"):
            continue              # most headers: skip before canonicalizing
        key = canonical_header(name)
        if key.startswith(META_EXCLUDED):
            continue
        # A hand-edited sidecar may hold numbers or lists: refused, not sent.
        if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
            raise BadMetadata("header %s: printable ASCII only" % key)
        meta[key] = value
    if len(meta) > MAX_META_HEADERS or sum(
            len(k) + len(v) for k, v in meta.items()) > MAX_META_BYTES:
        raise TooMuchMetadata("too much X-* metadata (max %d headers, %d bytes)"
                          % (MAX_META_HEADERS, MAX_META_BYTES))
    return meta


def blob_headers(blob_id, meta, ext="", private=False):
    """The headers of every reply that shows a blob (200, 206, 304): its ETag,
    caching (private: only the client may keep it, for a reply that needed
    a token), type (X-Mime-Type, else guessed from the name's .ext) and its
    stored X-* metadata.  send() adds the sandbox to every reply."""
    mime = meta.get("X-Mime-Type")
    if not mime and ext:
        mime, encoding = mimetypes.guess_type("x." + ext)
        mime = ENCODED_TYPES.get(encoding, mime)
    return [("ETag", '"%s"' % blob_id), ("Accept-Ranges", "bytes"),
            ("Cache-Control", "private, " + IMMUTABLE if private else IMMUTABLE),
            ("Content-Type", mime or "application/octet-stream")] + \
        sorted(meta.items())


def _names(header, etag, weak):
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or '"%s"' % etag in tags or (weak and 'W/"%s"' % etag in tags)


def precondition(headers, etag):
    """Evaluate If-Match and If-None-Match for an existing resource (RFC 9110
    13.2.2): 412, 304, or None to go on."""
    if "if-match" in headers and not _names(headers["if-match"], etag, False):
        return HTTPStatus.PRECONDITION_FAILED
    if "if-none-match" in headers and _names(headers["if-none-match"], etag, True):
        return HTTPStatus.NOT_MODIFIED
    return None


def http_range(headers, etag, size, method="GET"):
    """Apply the preconditions and Range to a resource of `size` bytes.

    Returns (status, offset, count, extra headers): 200 whole, 206 partial,
    304 not modified, 412 precondition failed, 416 unsatisfiable.  One range
    only; anything else (multiple ranges, other units), and any Range on HEAD,
    is ignored and the whole body sent, as RFC 9110 14.2 allows; so is Range
    when size is None (a body of unknown length: count None)."""
    status = precondition(headers, etag)
    if status:
        return status, 0, 0, []
    if size is None:            # not known before it is sent: whole, chunked
        return HTTPStatus.OK, 0, None, []
    rng = headers.get("range") if method == "GET" else None
    m = rng and RANGE.fullmatch(rng.strip())
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


def chunked(chunks):
    """Frame an iterable of byte strings as a chunked body (RFC 9112 7.1)."""
    for chunk in chunks:
        if chunk:
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


# --- Manifests: a large object's chunks ----------------------------------------

class BadManifest(ValueError):
    """Not a manifest of the object it is stored under."""


class Manifest:
    """A chunked object: its id (the SHA-1 of all its bytes), size, the size
    of every chunk but the last, and its chunks, [(chunk id, size)] in order."""

    def __init__(self, blob_id, size, chunk_size, chunks):
        self.id, self.size, self.chunk_size, self.chunks = \
            blob_id, size, chunk_size, chunks

    def encode(self):
        """The manifest file: JSON, one chunk a line, ending with the SHA-1
        of the rest (so a flipped bit is found before a chunk is followed)."""
        doc = self._doc()
        doc["check"] = _digest(doc)
        lines = ['{"sos-manifest": %d, "id": "%s", "size": %d, "chunk-size": %d,'
                 % (MANIFEST_VERSION, self.id, self.size, self.chunk_size),
                 ' "chunks": [']
        lines += ['  ["%s", %d]%s' % (c, n, "," if i < len(self.chunks) - 1 else "")
                  for i, (c, n) in enumerate(self.chunks)]
        lines.append(' ], "check": "%s"}' % doc["check"])
        return ("\n".join(lines) + "\n").encode()

    def _doc(self):
        return {"sos-manifest": MANIFEST_VERSION, "id": self.id, "size": self.size,
                "chunk-size": self.chunk_size,
                "chunks": [[c, n] for c, n in self.chunks]}

    @classmethod
    def decode(cls, data, blob_id):
        """The Manifest in data, stored under blob_id; BadManifest unless
        every rule holds: its own check, the id, chunk ids, and sizes that
        add up with every chunk but the last exactly chunk-size."""
        try:
            doc = json.loads(data)
            check = doc.pop("check")
            size, chunk_size, chunks = doc["size"], doc["chunk-size"], doc["chunks"]
            m = cls(doc["id"], size, chunk_size, [tuple(c) for c in chunks])
            same = doc == m._doc()
        except (ValueError, TypeError, KeyError, AttributeError):
            raise BadManifest("%s: not a manifest (JSON with sos-manifest, id, "
                              "size, chunk-size, chunks, check)" % blob_id) from None
        if check != _digest(doc) or not same:
            raise BadManifest("%s: manifest fails its check" % blob_id)
        if m.id != blob_id or not HEX_RE.fullmatch(blob_id) or len(blob_id) != 40:
            raise BadManifest("manifest of %r stored under %s" % (m.id, blob_id))
        if not (isinstance(size, int) and isinstance(chunk_size, int) and
                0 < chunk_size < size and len(chunks) == -(-size // chunk_size)):
            raise BadManifest("%s: manifest sizes don't add up" % blob_id)
        for i, (c, n) in enumerate(m.chunks):
            last = size - chunk_size * (len(chunks) - 1)
            if not (isinstance(c, str) and CHUNK_ID.fullmatch(c)) or \
                    n != (chunk_size if i < len(chunks) - 1 else last):
                raise BadManifest("%s: manifest chunk %d is wrong" % (blob_id, i))
        return m


def _digest(doc):
    return hashlib.sha1(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                        .encode()).hexdigest()


# --- Bodies that both the server and the upstream client send ----------------

class FilePart:
    """A reply body read from an open file descriptor: count bytes from
    offset.  The caller closes the fd."""

    def __init__(self, fd, offset, count):
        self.fd, self.offset, self.count = fd, offset, count

    def chunks(self):
        """The bytes by pread: no file position, which dup'ed fds share."""
        end = self.offset + self.count
        for offset in range(self.offset, end, CHUNK):
            yield os.pread(self.fd, min(CHUNK, end - offset), offset)
