"""Row 20: a blob-server started as root gives root up for good.

It binds, chroots into its store and becomes --user (nobody): every uid and
gid nobody (so setuid(0) can only fail), no supplementary groups, no
capabilities, its root directory the store.  If the drop cannot be done it
refuses to start rather than serve as root.  Chrooted, it still answers an
unexpected error with a logged 500: what that needs was loaded before.
"""

import json
import os
import subprocess

import pytest

from support import PYTHON, ROOT, sha1

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


def test_a_chrooted_blob_server_answers_an_unexpected_error_with_500_json_and_logs_it(
        as_root, procs, figures):
    """Its blob's file unreadable to nobody (mode 000; root could still read
    it, the server no longer can), a GET fails in open() with an error the
    server does not expect.  Logging its traceback needs modules the stdlib
    imports lazily (tokenize, since 3.13): had they not been loaded before
    the chroot, the request thread died and the client got no reply at all.
    """
    srv = procs.blob()
    srv.ignore_tracebacks = True          # the 500 is logged with its traceback
    body = b"a blob its server will not be able to open"
    blob_id = sha1(body)
    assert srv.post(blob_id, body)[0] == 200
    os.chmod(srv.path(blob_id), 0)

    status, headers, reply = srv.get(blob_id)
    log = srv.log()
    figures.add(20, 1, int(status != 500), note="unreadable blob: %d" % status)
    assert (status, headers["content-type"], json.loads(reply)) == (
        500, "application/json", {"error": "Internal Server Error"})
    assert "PermissionError: [Errno 13]" in log, log
    assert "--- Logging error ---" not in log and "ModuleNotFoundError" not in log, log
    assert srv.alive()
