"""Fixtures of the fault suite: our programs as real processes, seeded
randomness, and the figures table printed at the end of the session.

Every test here starts blob.py, sos.py and replicate.py as processes, hurts
them (signals, ptrace fault injection, full or corrupted disks, hostile
clients) and counts invariant violations, Jepsen style:

    I1 every id listed or served has sha1(bytes) = id
    I2 no acknowledged upload is ever lost
    I3 a fetch right after a 2xx upload returns 200
    I4 sos-server never sends a 200 whose bytes don't match the id
    I5 after faults heal and one replicate run, every member of a group
       holds every id of the group
    I6 threads, fds and temp files return to their starting level

Counts scale with FAULT_SCALE (default 1, the CI size); tests marked soak
run only with `make soak` (`-m soak`), for SOAK_MINUTES in all.  Every
randomized test prints its seed; FAULT_SEED=<seed> replays it.
"""

import os
import random

import pytest

from support import Processes

FIGURES = pytest.StashKey[dict]()

ROWS = {
    1: "round-trip",
    2: "read-after-write",
    3: "partial visibility",
    4: "kill -9 mid-upload",
    5: "crash at every syscall",
    6: "fsync/write EIO",
    7: "disk full",
    8: "bit flip on disk",
    9: "file truncated/extended",
    10: "replicate killed mid-run",
    11: "corrupt source, replicate",
    12: "network partition",
    13: "slow link",
    14: "slowloris",
    15: "short body",
    16: "limits",
    17: "malformed-HTTP fuzz",
    18: "path traversal / ids",
    19: "concurrency",
    20: "privilege drop",
    21: "chaos soak",
    22: "delete, member away",
    23: "re-upload after delete",
    24: "upload/delete race",
    25: "kill -9 mid-delete",
    26: "crash in delete path",
    27: "rebalance killed mid-move",
    28: "move, target member down",
    29: "move, source member down",
    30: "move racing upload/delete",
    31: "move into a full group",
    32: "drain, member down",
    33: "fetch racing a move",
    34: "kill -9 mid chunked upload",
    35: "member down/full, chunks",
    36: "chunk/manifest flipped",
    37: "delete racing collection",
    38: "collection racing re-use",
    39: "scrub of a rotten chunk",
    40: "chunk sizes and ranges",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long fault runs, only with -m soak "
                            "(make soak; SOAK_MINUTES bounds them)")
    config.addinivalue_line("markers", "faults: the fault-injection suite")
    config.stash[FIGURES] = {}


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.faults)
    # Soak tests run only when a -m expression names them (pytest.ini
    # deselects them too; this holds even without it).
    if "soak" not in (config.getoption("markexpr") or ""):
        soak = [item for item in items if item.get_closest_marker("soak")]
        if soak:
            config.hook.pytest_deselected(items=soak)
            items[:] = [item for item in items if not item.get_closest_marker("soak")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(FIGURES, {})
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "fault figures (FAULT_SCALE=%s)" % os.environ.get("FAULT_SCALE", "1"))
    tr.write_line("%4s  %-28s %8s %11s %6s  %s" % ("row", "fault", "trials",
                                                   "violations", "lost", "notes"))
    for row in sorted(rows):
        r = rows[row]
        notes = "; ".join(r["notes"] + ["seed %s" % s for s in r["seeds"]])
        tr.write_line("%4d  %-28s %8d %11d %6d  %s" % (
            row, ROWS.get(row, "?"), r["trials"], r["violations"], r["lost"], notes))


class Figures:
    """Adds one test's counts to its matrix row."""

    def __init__(self, table):
        self.table = table

    def add(self, row, trials, violations, lost=0, seed=None, note=None):
        r = self.table.setdefault(row, {"trials": 0, "violations": 0, "lost": 0,
                                        "seeds": [], "notes": []})
        r["trials"] += trials
        r["violations"] += violations
        r["lost"] += lost
        if seed is not None:
            r["seeds"].append(seed)
        if note:
            r["notes"].append(note)


@pytest.fixture
def figures(request):
    return Figures(request.config.stash[FIGURES])


@pytest.fixture
def rng():
    """A random.Random whose seed is printed (and kept as .seed), so a failing
    trial can be replayed with FAULT_SEED."""
    seed = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(2 ** 32))
    print("seed %d (replay: FAULT_SEED=%d)" % (seed, seed))
    r = random.Random(seed)
    r.seed_value = seed
    return r


@pytest.fixture
def procs(tmp_path):
    """Factory for real processes (blob.py, sos.py): a support.Processes;
    all are killed after the test, and a traceback in any one's stderr
    fails it."""
    p = Processes(tmp_path)
    yield p
    p.stop_all()
    crashed = p.crashed()
    assert not crashed, "unexpected traceback:\n" + "\n".join(crashed)
