"""Rows 4, 5, 6: crashes and I/O errors in the middle of uploads.

A blob-server may die at any instant (kill -9, or killed by strace at the
k-th call of a syscall) or see fsync/write fail; after a restart every blob
it lists or serves must be whole and hash to its id (I1), every upload it
acknowledged must still be there (I2), and no temp file may survive (I6).
"""

import os
import random
import threading
import time

import pytest

import blobstore

from support import sha1, wait_for

from .kit import (Tracer, Uploader, check_store, kill_at_every_call, scaled, strike,
                  upload_bytes)


# --- Row 4: kill -9 at a random moment of concurrent uploads -----------------------

def test_kill_9_mid_upload_loses_no_acknowledged_blob_and_leaves_no_partial_one(
        procs, figures, rng):
    srv = procs.blob()
    attempted, acknowledged = {}, {}
    lock = threading.Lock()
    trials = scaled(25)
    violations = 0
    lost = set()              # acknowledged ids ever missing after a restart
    messages = []
    verified = set()
    for trial in range(trials):
        uploaders = [Uploader(srv.url, random.Random(rng.random()), attempted,
                              acknowledged, lock) for _ in range(3)]
        for u in uploaders:
            u.start()
        time.sleep(rng.uniform(0.01, 0.4))      # the fault's random moment
        srv.kill()
        for u in uploaders:
            u.stop.set()
            u.join(30)
        bad = ["refused with %d" % s for u in uploaders for s in u.refused]
        srv.start()
        v, gone, more = check_store(srv, acknowledged, attempted, verified)
        violations += v + len(bad)
        lost |= gone
        messages += ["trial %d: %s" % (trial, b) for b in bad + more]
    v, gone, bad = check_store(srv, acknowledged, attempted)    # all, once more
    violations += v
    lost |= gone
    messages += ["at the end: %s" % b for b in bad]
    figures.add(4, trials, violations, len(lost), rng.seed_value,
                "%d acknowledged, %d begun" % (len(acknowledged), len(attempted)))
    assert acknowledged, "no upload completed before the kills: the test tested nothing"
    assert not messages


def test_kill_9_of_sos_server_mid_upload_leaves_blob_servers_clean(procs, figures, rng):
    c = procs.cluster((("g1", 2),))
    members = c.members
    levels = [m.level() for m in members]
    trials = scaled(4)
    bad = []
    for trial in range(trials):
        attempted, acknowledged = {}, {}
        uploaders = [Uploader(c.sos.up, random.Random(rng.random()), attempted,
                              acknowledged, threading.Lock(), "/upload")
                     for _ in range(3)]
        for u in uploaders:
            u.start()
        time.sleep(rng.uniform(0.05, 0.4))
        c.sos.kill()
        for u in uploaders:
            u.stop.set()
            u.join(30)
            bad += ["trial %d: refused with %d" % (trial, s) for s in u.refused]
        for m, level in zip(members, levels):
            # The sos-server's connections die with it: each blob-server must
            # drop its half-written temp files and handler threads.
            try:
                wait_for(lambda: not m.tmp_files(), 15, what="temp files to go")
            except AssertionError:
                bad.append("trial %d: %s kept temp files %s" % (trial, m.url, m.tmp_files()))
            now = m.settled(level)
            if now[0] > level[0] or now[1] > level[1]:
                bad.append("trial %d: %s threads/fds %s, started at %s"
                           % (trial, m.url, now, level))
        c.sos.start()
        for blob_id, body in acknowledged.items():
            status, _, data = c.sos.fetch(blob_id)
            if status != 200 or data != body:
                bad.append("trial %d: acknowledged %s fetched as %d" % (trial, blob_id, status))
    figures.add(4, trials, len(bad), seed=rng.seed_value, note="%d sos-server kills" % trials)
    assert not bad


# --- Row 5: SIGKILL at the k-th call of each syscall the write path makes --------

SYSCALLS = ("write", "fsync", "openat", "mkdirat", "renameat", "linkat",
            "unlinkat", "sendto", "fcntl")
# The large case is written past the page cache (blobstore.DirectWriter): fcntl
# turns O_DIRECT on and off, and its writes are whole blocks, then the tail.
CASES = {"0 B": (0, "content"), "1 B": (1, "content"), "1 MiB": (1 << 20, "content"),
         "1 B, named": (1, "named"), "8 MiB + 4097 B": (blobstore.DIRECT_MIN + 4097, "content")}


class Sweep:
    """Fresh uploads to one blob-server, each with strace killing it at the
    k-th call of a syscall in the thread that handles the upload (strace
    counts per thread; every connection gets a new thread)."""

    def __init__(self, srv, size, kind, rng):
        self.srv, self.size, self.kind, self.rng = srv, size, kind, rng
        self.attempted, self.acknowledged, self.verified = {}, {}, set()
        self.trials = self.killed = self.unacknowledged_but_stored = 0
        self.bad = []

    def body(self):
        """A body and id never uploaded before (new directories, too, most
        of the time), except for the one empty body."""
        self.trials += 1
        while True:
            body = self.rng.randbytes(self.size)
            blob_id = sha1(body) if self.kind == "content" else \
                "n%016x" % self.rng.getrandbits(64)
            if self.size == 0 or blob_id not in self.attempted:
                break
        path = self.srv.path(blob_id)
        if os.path.exists(path):
            # Only one empty body exists: remove it (and its directories, so
            # they are made again) for a fresh write.  It was checked.
            os.unlink(path)
            for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
                os.rmdir(d)
            self.verified.discard(blob_id)
            self.acknowledged.pop(blob_id, None)
        return blob_id, body

    def trial(self, syscall, k):
        """One upload with a kill at the k-th syscall; False once k is past
        the number of calls (the upload completed and the server lives)."""
        blob_id, body = self.body()
        self.attempted[blob_id] = body
        ok, restarted = strike(self.srv, syscall, k,
                               upload_bytes("/blob/" + blob_id, body), self.bad)
        if ok:
            self.acknowledged[blob_id] = body
        if restarted:
            self.killed += 1
            if blob_id in self.srv.ids() and not ok:
                self.unacknowledged_but_stored += 1
        v, _, bad = check_store(self.srv, self.acknowledged, self.attempted, self.verified)
        self.bad += ["%s k=%d: %s" % (syscall, k, b) for b in bad]
        return restarted


@pytest.mark.parametrize("case", list(CASES))
def test_a_kill_at_every_step_of_an_upload_leaves_the_whole_blob_or_nothing(
        procs, figures, rng, case):
    size, kind = CASES[case]
    sweep = Sweep(procs.blob(), size, kind, rng)
    calls = kill_at_every_call(sweep, SYSCALLS)
    print("calls per upload:", calls)
    figures.add(5, sweep.trials, len(sweep.bad), seed=rng.seed_value,
                note="%s: %d kills" % (case, sweep.killed))
    assert sweep.killed >= 4, "strace never killed the server: %s" % calls
    assert not sweep.bad


# --- Row 6: fsync or write fails with EIO ----------------------------------------------

def fresh_body(srv, rng, size):
    """A random body whose id's directories don't exist yet, so its upload
    makes all four fsyncs: temp file, new d1 in the root, new d2, leaf."""
    while True:
        body = rng.randbytes(size)
        blob_id = sha1(body)
        if not os.path.exists(os.path.join(srv.store, blob_id[:2])):
            return blob_id, body


SMALL_SIZES = (1, 1000, 300000)
# Written with O_DIRECT in 1 MiB blocks, then a tail through the page cache:
# write #1 and #2 are direct blocks; the last is the tail.
LARGE_SIZES = (blobstore.DIRECT_MIN + 4097,)


@pytest.mark.parametrize("syscall,calls,sizes", [
    ("fsync", 4, SMALL_SIZES), ("write", 1, SMALL_SIZES),
    ("write", 2, LARGE_SIZES), ("fsync", 1, LARGE_SIZES)])
def test_an_io_error_is_a_5xx_commits_nothing_is_not_retried_and_the_next_upload_succeeds(
        procs, figures, rng, tmp_path, syscall, calls, sizes):
    """EIO from the k-th fsync (the temp file's, then each new directory's
    and the blob's directory's) or from the first data write; for a large
    body, from its first two O_DIRECT block writes and its file's fsync."""
    srv = procs.blob()
    srv.ignore_tracebacks = True          # a 500 is logged with its traceback
    bad = []
    trials = 0
    for k in range(1, calls + 1):
        for _ in range(scaled(3)):
            trials += 1
            blob_id, body = fresh_body(srv, rng, rng.choice(sizes))
            trace = str(tmp_path / "strace.out")
            tracer = Tracer(srv.pid, "%s:error=EIO:when=%d" % (syscall, k),
                            trace=syscall, log_path=trace)
            status = srv.post(blob_id, body)[0]
            tracer.stop()
            with open(trace) as f:
                failed = sum("(INJECTED)" in line and "write(2," not in line
                             for line in f)   # not the log writer's
            if not 500 <= status < 600:
                bad.append("%s #%d EIO: answered %d" % (syscall, k, status))
            if failed != 1:
                bad.append("%s #%d EIO: %d calls failed, expected 1 (a retry?)"
                           % (syscall, k, failed))
            if blob_id in srv.ids() or os.path.exists(srv.path(blob_id)):
                bad.append("%s #%d EIO: the blob was committed" % (syscall, k))
            if srv.tmp_files():
                bad.append("%s #%d EIO: temp files left: %s" % (syscall, k, srv.tmp_files()))
            status = srv.post(blob_id, body)[0]
            if status != 200 or srv.get(blob_id)[2] != body:
                bad.append("%s #%d EIO: the next upload answered %d" % (syscall, k, status))
    figures.add(6, trials, len(bad), seed=rng.seed_value)
    assert not bad
