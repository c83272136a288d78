"""Row 7: full disks, real ones: a 4 MiB tmpfs, a tmpfs of 64 inodes and a
16 MiB ext4 image on a loop device.

A blob-server on a full disk answers 507 (not 500, not a dropped
connection), keeps running, leaves no temp file, loses nothing it
acknowledged, and takes uploads again as soon as space is freed.  The
sos-server stores elsewhere when a group is full.
"""

import os
import time

import pytest

from support import sha1, wait_for

from .kit import mount_ext4, mount_tmpfs, scaled, umount

import blobstore
from cluster import Group, placement

FILESYSTEMS = {
    # name: (mount, body sizes that fill it, ballast files freed afterwards)
    "tmpfs 4 MiB": (lambda path, tmp: mount_tmpfs(path, "size=4m,mode=0755"),
                    (100000, 300000), (1 << 20,)),
    "tmpfs 64 inodes": (lambda path, tmp: mount_tmpfs(path, "size=64m,nr_inodes=64,mode=0755"),
                        (10, 100), (0,) * 12),
    "ext4 16 MiB": (lambda path, tmp: mount_ext4(path, tmp / "ext4.img", 16),
                    (200000, 700000), (2 << 20,)),
    # Bodies written with O_DIRECT (blobstore.DirectWriter).
    "ext4 64 MiB, large bodies": (lambda path, tmp: mount_ext4(path, tmp / "ext4.img", 64),
                                  (blobstore.DIRECT_MIN, blobstore.DIRECT_MIN + (3 << 20)),
                                  (20 << 20,)),
}


@pytest.fixture
def small_fs(tmp_path, request):
    """A small filesystem mounted under tmp_path; returns its mount point."""
    path = tmp_path / "fs"
    mount, sizes, ballast = FILESYSTEMS[request.param]
    mount(path, tmp_path)
    yield path, sizes, ballast
    umount(path)


def fill(srv, rng, sizes, acknowledged, limit=2000):
    """Upload random bodies until the first 507; returns the other statuses
    seen before it (there should be none but 200)."""
    odd = []
    for _ in range(limit):
        body = rng.randbytes(rng.randrange(*sizes))
        status = srv.post(sha1(body), body)[0]
        if status == 507:
            return odd
        if status == 200:
            acknowledged[sha1(body)] = body
        else:
            odd.append(status)
    raise AssertionError("%d uploads and the disk is not full" % limit)


@pytest.mark.parametrize("small_fs", list(FILESYSTEMS), indirect=True)
def test_a_full_disk_is_507_the_server_lives_and_takes_uploads_once_space_is_freed(
        procs, figures, rng, small_fs):
    path, sizes, ballast = small_fs
    ballast_files = []
    for i, size in enumerate(ballast):
        name = path / ("ballast%d" % i)
        with open(name, "wb") as f:
            f.write(os.urandom(size))
        ballast_files.append(name)
    srv = procs.blob("store", store=path / "store")
    acknowledged = {}
    bad = ["before full: %d" % s for s in fill(srv, rng, sizes, acknowledged)]
    top_up(path, inodes=not sizes[0] > 1000)   # what a smaller body could use
    trials = scaled(20)
    for _ in range(trials):
        body = rng.randbytes(rng.randrange(*sizes))
        status, _, reply = srv.post(sha1(body), body)
        if status != 507:
            st = os.statvfs(path)
            bad.append("full: answered %d %r (%d blocks, %d inodes free)" % (
                status, reply[:100], st.f_bavail, st.f_favail))
    if not srv.alive():
        bad.append("the server died")
    if srv.tmp_files():
        bad.append("temp files left: %s" % srv.tmp_files())
    for blob_id, body in acknowledged.items():
        if srv.get(blob_id)[2] != body:
            bad.append("acknowledged %s lost or changed" % blob_id)
    listed = srv.ids()
    bad += ["%s listed but not acknowledged" % i for i in listed if i not in acknowledged]

    for name in ballast_files:
        os.unlink(name)
    freed = time.monotonic()
    body = rng.randbytes(sizes[0])

    def stored():
        return srv.post(sha1(body), body)[0] == 200
    try:
        wait_for(stored, 1.0, 0.05, "an upload to succeed after space was freed")
    except AssertionError as e:
        bad.append(str(e))
    after = time.monotonic() - freed
    figures.add(7, trials + 1, len(bad), seed=rng.seed_value,
                note="%s: full after %d blobs, 200 again %.2fs after freeing"
                % (small_fs_name(path), len(acknowledged), after))
    assert not bad


def top_up(path, inodes=False):
    """Use up every block (or every inode) left, as root, outside the store.

    Many files of shrinking sizes, not one: one large file stops short of
    full once ext4 can't extend its extent tree."""
    os.sync()       # ext4 frees a deleted file's blocks when its journal commits
    n = 0
    for size in ((0,) if inodes else (1 << 20, 64 << 10, 4 << 10, 1 << 10)):
        while n < 100000:
            n += 1
            try:
                fd = os.open(path / ("top-up%d" % n), os.O_WRONLY | os.O_CREAT)
            except OSError:
                break
            try:
                full = size and os.write(fd, bytes(size)) < size
                os.fsync(fd)
            except OSError:
                full = True
            finally:
                os.close(fd)
            if full:
                break


def small_fs_name(path):
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, kind, opts = line.split()[:4]
            if mnt == str(path):
                return kind + ("" if "nr_inodes" not in opts else " inodes")
    return "?"


def test_sos_server_stores_in_another_group_when_the_first_choice_is_full(
        procs, figures, rng, tmp_path):
    path = tmp_path / "fs"
    mount_tmpfs(path, "size=4m,mode=0755")
    try:
        full = procs.blob("full", store=path / "store")
        roomy = procs.blob("roomy")
        top_up(path)
        assert full.post(sha1(b"x"), b"x")[0] == 507
        c = procs.sos([("g1", [full]), ("g2", [roomy])], "--copies", "1")
        groups = [Group("g1", [full.url]), Group("g2", [roomy.url])]
        trials = scaled(100)
        bad = []
        done = 0
        while done < trials:
            body = rng.randbytes(rng.randrange(1, 50000))
            blob_id = sha1(body)
            if placement(blob_id, groups)[0].name != "g1":
                continue                  # only blobs whose first choice is full
            done += 1
            status, reply = c.upload(body)
            if status != 200 or not os.path.exists(roomy.path(blob_id)):
                bad.append("%s: %d %s" % (blob_id, status, reply))
            elif c.fetch(blob_id)[2] != body:
                bad.append("%s: fetched wrong" % blob_id)
        figures.add(7, trials, len(bad), seed=rng.seed_value,
                    note="sos failover %d/%d" % (trials - len(bad), trials))
        assert not bad
    finally:
        for p in procs.started:
            p.kill()
        umount(path)
