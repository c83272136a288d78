#!/usr/bin/env python3
"""mkstore: write a blob-server store of N small blobs straight to disk.

The bench's rows blob_list and replicate need a store of a million blobs,
and its random-id GET rows a store of a few thousand 4 KiB blobs (--size
4096).  Uploading them through a blob-server (or calling BlobStore.put)
fsyncs every blob and its directory, which takes hours; here each blob is
one os.open/os.write/os.close into the directory rules.shard() names,
with no fsync, and one sync(2) at the end.  The result is exactly the layout a blob-server writes (a blob-server
started on it lists, digests and serves it like any other store):

    <store>/<id[0:2]>/<id[2:4]>/<id>

Blob i holds b"sos bench blob <i>\\n" (with --size, padded with "." to that
many bytes) and its id is the SHA-1 of those bytes, so ids are real content
ids: replicate's copies of them pass the receiving blob-server's hash check.  The same N always gives the same ids, so a test
can recompute any id (blob_id(i, size)) instead of listing the store.

Run as root, the writers drop to --user (default nobody) first, so the store
belongs to the user the blob-server will run as and its start-up has nothing
to chown.  Two writer processes (this machine has two cores).

    python3 bench/mkstore.py --blobs 1000000 /var/tmp/store
    python3 bench/mkstore.py --blobs 2048 --size 4096 --ids ids.txt /var/tmp/s4k
"""

import argparse
import hashlib
import os
import pwd
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rules import shard  # noqa: E402  (the layout is the blob-server's)

BATCH = 20000


def blob_body(i, size=None):
    body = b"sos bench blob %d\n" % i
    return body.ljust(size, b".") if size else body


def blob_id(i, size=None):
    return hashlib.sha1(blob_body(i, size)).hexdigest()


def _become(uid, gid):
    if os.getuid() == 0 and uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def _write_range(root, start, stop, size=None):
    """Write blobs start..stop-1 under root; returns how many were written."""
    made = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(start, stop):
        body = blob_body(i, size)
        name = hashlib.sha1(body).hexdigest()
        leaf = "%s/%s/%s" % ((root,) + shard(name))
        if leaf not in made:
            os.makedirs(leaf, exist_ok=True)
            made.add(leaf)
        fd = os.open("%s/%s" % (leaf, name), flags, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
    return stop - start


def make_store(root, count, user="nobody", workers=2, size=None):
    """Create root (which must not exist) holding blobs 0..count-1 (of size
    bytes, if given); returns the seconds it took."""
    start = time.monotonic()
    os.makedirs(root)
    uid = gid = None
    if os.getuid() == 0:
        pw = pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
        os.chown(root, uid, gid)
    ranges = [(root, a, min(a + BATCH, count), size)
              for a in range(0, count, BATCH)]
    with ProcessPoolExecutor(workers, initializer=_become,
                             initargs=(uid, gid)) as pool:
        written = sum(pool.map(_write_range, *zip(*ranges))) if ranges else 0
    assert written == count, (written, count)
    os.sync()       # later timings should not pay for this store's writeback
    return time.monotonic() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", help="directory to create (must not exist)")
    parser.add_argument("--blobs", type=int, default=1000000)
    parser.add_argument("--size", type=int, default=None,
                        help="pad every blob to this many bytes")
    parser.add_argument("--ids", metavar="FILE",
                        help="also write the ids, one a line, to FILE")
    parser.add_argument("--user", default="nobody",
                        help="owner of the store when run as root")
    args = parser.parse_args(argv)
    seconds = make_store(args.store, args.blobs, args.user, size=args.size)
    if args.ids:
        with open(args.ids, "w") as f:
            f.writelines(blob_id(i, args.size) + "\n" for i in range(args.blobs))
    print("wrote %d blobs to %s in %.1f s" % (args.blobs, args.store, seconds))


if __name__ == "__main__":
    main()
