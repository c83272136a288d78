"""blob.py started as root on a store that already belongs to its --user.

Found by the bench (bench/mkstore.py makes stores owned by nobody, as an
operator's `install -d -o nobody data` does): the server skipped its chown
walk, but its .tmp/ and .quarantine/, made as root a moment before, stayed
root's, and every upload failed with 500.
"""

import os
import pwd

from support import get_json, sha1


def test_store_owned_by_the_run_user_takes_uploads_after_a_root_start(
        blob_process, tmp_path):
    assert os.geteuid() == 0, "this test needs root (the tests run as root)"
    nobody = pwd.getpwnam("nobody")
    store = tmp_path / "owned"
    store.mkdir()
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    proc = blob_process("owned", "--user", "nobody")

    data = b"uploaded into a store nobody owned beforehand"
    blob_id = sha1(data)
    status, reply = get_json(proc.url + "/blob/" + blob_id, "POST", data)
    assert status == 200, reply
    assert os.stat(store / ".tmp").st_uid == nobody.pw_uid
    assert os.stat(store / ".quarantine").st_uid == nobody.pw_uid
