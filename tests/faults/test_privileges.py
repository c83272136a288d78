"""Row 20: a blob-server started as root gives root up for good.

It binds, chroots into its store and becomes --user (nobody): every uid and
gid nobody (so setuid(0) can only fail), no supplementary groups, no
capabilities, its root directory the store.  If the drop cannot be done it
refuses to start rather than serve as root.
"""

import os
import subprocess

import pytest

from support import PYTHON, ROOT

NOBODY = 65534


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.fail("row 20 needs root: run the fault suite as root (CI does)")


def test_a_blob_server_started_as_root_runs_as_nobody_chrooted_without_capabilities(
        as_root, procs, figures):
    srv = procs.blob()
    st = srv.status()
    found = {
        "Uid": st["Uid"].split(), "Gid": st["Gid"].split(), "Groups": st["Groups"].split(),
        "CapEff": int(st["CapEff"], 16), "CapPrm": int(st["CapPrm"], 16),
        "root": os.readlink("/proc/%d/root" % srv.pid),
    }
    want = {"Uid": [str(NOBODY)] * 4, "Gid": [str(NOBODY)] * 4, "Groups": [],
            "CapEff": 0, "CapPrm": 0, "root": os.path.realpath(srv.store)}
    wrong = {k: (found[k], want[k]) for k in want if found[k] != want[k]}
    # Real, effective, saved and filesystem uid all nobody and no
    # capabilities: the kernel refuses setuid(0).
    figures.add(20, 1, len(wrong), note="uids/gids %s, CapEff %x, root %s" % (
        found["Uid"][0], found["CapEff"], found["root"]))
    assert wrong == {}
    assert srv.alive()


@pytest.mark.parametrize("user", ["no-such-user-here", "root", "0"])
def test_a_blob_server_refuses_to_start_when_it_cannot_drop_root(as_root, tmp_path, figures, user):
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "blob.py"), "-store", str(tmp_path / "s"),
                           "-port", "0", "--user", user], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    served = "listening on" in proc.stdout
    figures.add(20, 1, int(proc.returncode == 0 or served),
                note="--user %s: exit %d" % (user, proc.returncode))
    assert proc.returncode != 0 and not served, (proc.stdout, proc.stderr)
