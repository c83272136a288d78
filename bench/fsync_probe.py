#!/usr/bin/env python3
"""What a durable small write costs this disk, without HTTP or our code.

    python3 bench/fsync_probe.py DIR [THREADS] [SECONDS]

THREADS threads each write 4 KiB files the way a blob-server stores a blob
(a temp file, written and fsynced, renamed into one of 256 leaf directories,
the leaf fsynced), then the same with group commit: the two fsyncs replaced
by waits on a committer thread that runs one syncfs(2) per batch for every
write waiting.  Prints writes per second and CPU per write (this process's
user and system time) for each.  DIR gets one store per run and is left in
place; remove it afterwards.

Issue 13 asked whether group commit would lift the durable upload row: this
is the measurement that answers it for a machine (BENCHMARKS.md, the note of
the run that quotes it).
"""

import ctypes
import os
import resource
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
DATA = b"x" * 4096


def run(root, mode, threads, seconds):
    os.makedirs(os.path.join(root, ".tmp"))
    root_fd = os.open(root, os.O_RDONLY)
    tmp_fd = os.open(os.path.join(root, ".tmp"), os.O_RDONLY)
    leaves = []
    for i in range(256):
        path = os.path.join(root, "%02x" % i)
        os.mkdir(path)
        leaves.append(os.open(path, os.O_RDONLY))
    os.sync()
    done = [0]
    stop = time.monotonic() + seconds
    waiting = []
    cond = threading.Condition()
    failures = []

    def committer():
        while time.monotonic() < stop + 5:
            with cond:
                while not waiting and time.monotonic() < stop + 5:
                    cond.wait(0.05)
                batch = waiting[:]
                del waiting[:]
            if batch and libc.syncfs(root_fd) != 0:
                failures.append(ctypes.get_errno())
            for event in batch:
                event.set()

    def durable(fd):
        if mode == "fsync":
            os.fsync(fd)
            return
        event = threading.Event()
        with cond:
            waiting.append(event)
            cond.notify()
        event.wait()

    def writer(t):
        n = 0
        while time.monotonic() < stop:
            n += 1
            name = "%d.%d" % (t, n)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                         dir_fd=tmp_fd)
            os.write(fd, DATA)
            durable(fd)
            os.close(fd)
            leaf = leaves[(t * 7919 + n) % 256]
            os.rename(name, name, src_dir_fd=tmp_fd, dst_dir_fd=leaf)
            durable(leaf)
            with cond:
                done[0] += 1

    if mode == "syncfs":
        threading.Thread(target=committer, daemon=True).start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = done[0]
    print("%-6s %3d threads: %6.0f writes/s, CPU per write: user %4.0f µs, "
          "system %4.0f µs%s" % (
              mode, threads, n / elapsed,
              (after.ru_utime - before.ru_utime) / n * 1e6,
              (after.ru_stime - before.ru_stime) / n * 1e6,
              ", syncfs failed: %s" % failures if failures else ""))


def main():
    base = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 5
    for i, mode in enumerate(("fsync", "syncfs", "fsync", "syncfs")):
        run(os.path.join(base, "%d-%s" % (i, mode)), mode, threads, seconds)


if __name__ == "__main__":
    main()
