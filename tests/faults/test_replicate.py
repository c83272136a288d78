"""Rows 10 and 11: replicate killed mid-run, and replicate meeting corrupt
copies.  A rerun after a kill converges (I5) and a further run copies
nothing; a corrupt source copy is never spread, and every one is reported.
"""

import os
import signal
import subprocess
import time

from support import PYTHON, ROOT, flip_bit, replicate_process, sha1, summary_total, wait_for

from .kit import scaled


def load(member, rng, count):
    """Upload count random blobs straight to one member: {id: body}."""
    blobs = {}
    for _ in range(count):
        body = rng.randbytes(rng.choice((10, 5000, 200000)))
        assert member.post(sha1(body), body)[0] == 200
        blobs[sha1(body)] = body
    return blobs


def test_replicate_killed_at_a_random_moment_converges_on_the_next_run(
        procs, figures, rng):
    a, b = procs.blob("a"), procs.blob("b")
    urls = ",".join([a.url, b.url])
    trials = scaled(6)
    bad = []
    blobs = {}
    killed = 0
    for trial in range(trials):
        blobs.update(load(a, rng, scaled(40)))
        run = subprocess.Popen([PYTHON, os.path.join(ROOT, "replicate.py"),
                                "-blob-server", urls], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.02, 0.4))         # the fault's random moment
        run.send_signal(signal.SIGKILL)
        killed += run.wait() == -signal.SIGKILL
        status, out, err = replicate_process([a.url, b.url])
        if status != 0:
            bad.append("trial %d: rerun exited %d: %s" % (trial, status, err[-500:]))
        missing = [i for i in blobs if not os.path.exists(b.path(i))]
        if missing:
            bad.append("trial %d: %d blobs still missing on b" % (trial, len(missing)))
        status, out, err = replicate_process([a.url, b.url])
        if status != 0 or summary_total(out, "copied") != 0:
            bad.append("trial %d: a further run exited %d and copied %d"
                       % (trial, status, summary_total(out, "copied")))
        try:
            wait_for(lambda: not b.tmp_files(), 10, what="b's temp files to go")
        except AssertionError as e:
            bad.append("trial %d: %s" % (trial, e))
    corrupt = [i for i in b.ids() if sha1(b.get(i)[2]) != i]
    figures.add(10, trials, len(bad) + len(corrupt), seed=rng.seed_value,
                note="%d/%d converged, %d killed mid-run" % (trials - len(bad), trials, killed))
    assert not bad and not corrupt
    assert killed, "every run ended before its kill: the test tested nothing"


def test_replicate_never_copies_a_corrupt_source_and_reports_every_one(
        procs, figures, rng):
    a, b = procs.blob("a"), procs.blob("b")
    n = scaled(50)
    good = load(a, rng, scaled(20))
    rotten = load(a, rng, n)
    for i, (blob_id, body) in enumerate(rotten.items()):
        flip_bit(a.path(blob_id), (0, len(body) - 1, rng.randrange(len(body)))[i % 3])
    status, out, err = replicate_process([a.url, b.url])
    spread = [i for i in rotten if os.path.exists(b.path(i))]
    reported = sum(1 for line in err.splitlines() if "CORRUPT copy of" in line)
    good_copied = all(b.get(i)[2] == body for i, body in good.items())
    figures.add(11, n, len(spread) + abs(n - reported) + (not good_copied),
                seed=rng.seed_value, note="%d corrupt copies, %d reported, %d written"
                % (n, reported, len(spread)))
    assert spread == []
    assert reported == n, err[-2000:]
    assert "corrupt copies refused: %d" % n in out
    assert good_copied and status == 1
