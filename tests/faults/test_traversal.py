"""Row 18: ids and paths that try to leave the store.

The blob-server runs unprivileged and without chroot here (as nobody, via
setpriv), so only its own path handling stands between a request and the
files around the store: a readable secret beside it, a writable directory
beside it, and symlinks planted inside the store that point at both.  Not
one byte of them may be served, and nothing outside the store may be
created or changed.
"""

import os
import shutil
import stat
import tempfile
from urllib.parse import quote

import pytest
from hypothesis import given, strategies as st

from support import raw_exchange, request, sha1

from .kit import fuzz_settings, require_tool, scaled

SECRET = b"SECRET-outside-the-store-" + os.urandom(8).hex().encode()
NOBODY = 65534

TRAVERSALS = [
    "../secret", "..%2fsecret", "%2e%2e%2fsecret", "%2e%2e/%2e%2e/secret", "..\\secret",
    "....//secret", "/../../secret", "secret%00", "secret\x00", "abc%0a", "abc%0d%0a",
    "%c0%ae%c0%ae/secret", "..%252fsecret", "secret/", ".", "..", "",
    "\u0661\u0662\u0663", "\uff11\uff12", "ABC", "a" * 129, "abcd/../../../secret",
    "planted", "abcd1234", "abcdef", "se/cr/secret", "%2fetc%2fpasswd", "~", "$HOME",
]


@pytest.fixture
def jail(procs):
    """An unprivileged blob-server whose store sits between a secret file
    and a directory it could write to, with symlinks planted to both."""
    require_tool("setpriv", "util-linux")
    base = tempfile.mkdtemp(prefix="sos-traversal-", dir="/tmp")
    os.chmod(base, 0o755)
    with open(os.path.join(base, "secret"), "wb") as f:
        f.write(SECRET)
    os.chmod(os.path.join(base, "secret"), 0o644)
    writable = os.path.join(base, "writable")
    os.makedirs(os.path.join(writable, "cd"))
    with open(os.path.join(writable, "cd", "abcd1234"), "wb") as f:
        f.write(SECRET)
    store = os.path.join(base, "store")
    os.makedirs(os.path.join(store, "pl", "an"))
    os.makedirs(os.path.join(store, "se", "cr"))
    # A blob file that is a symlink to the secret, a leaf directory that is a
    # symlink to a writable directory outside.
    os.symlink(os.path.join(base, "secret"), os.path.join(store, "pl", "an", "planted"))
    os.symlink(os.path.join(base, "secret"), os.path.join(store, "se", "cr", "secret"))
    os.symlink(writable, os.path.join(store, "ab"))
    for top, dirs, files in os.walk(base):
        for name in [top] + [os.path.join(top, n) for n in dirs + files]:
            if os.path.realpath(name) != os.path.join(base, "secret"):
                os.lchown(name, NOBODY, NOBODY)
    srv = procs.blob("jailed", store=store, python="/usr/bin/python3",
                     prefix=["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                             "--clear-groups"])
    assert open("/proc/%d/status" % srv.pid).read().count("\t%d\t" % NOBODY) >= 2
    before = snapshot(base, store)
    try:
        yield srv, base, store
        srv.kill()
        assert snapshot(base, store) == before, "files outside the store changed"
    finally:
        shutil.rmtree(base)


def snapshot(base, store):
    """Every path outside the store with its size, mtime and content hash."""
    out = {}
    for top, dirs, files in os.walk(base):
        if top == store or top.startswith(store + os.sep):
            continue
        for name in dirs + files:
            path = os.path.join(top, name)
            if path == store:
                continue
            st = os.lstat(path)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = sha1(f.read())
            out[path] = (st.st_size, st.st_mtime_ns, digest)
    return out


def attempts(srv, name, sos=None):
    """Every way of asking for `name`: raw request lines, so nothing is
    normalised on the way.  Yields (description, response)."""
    raw = name.encode("utf-8", "surrogateescape")
    for target in (b"/blob/" + raw, b"/blob/" + quote(name, safe="/%").encode(),
                   b"/verify/" + raw, b"/blobs?prefix=" + raw, b"/blobs?after=" + raw):
        for method in (b"GET", b"HEAD", b"POST"):
            body = SECRET[:5] if method == b"POST" else b""
            data = (method + b" " + target.replace(b" ", b"%20") + b" HTTP/1.1\r\nHost: t\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            yield "%s %r" % (method.decode(), target), raw_exchange(srv.url, data)


def leaks(resp):
    return resp is not None and (SECRET in resp.body or SECRET[:20] in resp.head)


def test_no_id_or_path_reads_or_writes_outside_the_store(jail, figures):
    srv, base, store = jail
    bad = []
    trials = 0
    for name in TRAVERSALS:
        for what, resp in attempts(srv, name):
            trials += 1
            if leaks(resp):
                bad.append("%s served the secret" % what)
            if resp is not None and resp.status == 200 and what.startswith("GET '/blob/"):
                bad.append("%s answered 200" % what)
    assert srv.alive()
    figures.add(18, trials, len(bad), note="%d fixed traversals, as nobody without chroot"
                % trials)
    assert bad == []


def test_generated_ids_never_reach_outside_the_store(jail, figures):
    srv, base, store = jail
    seen = {"cases": 0, "bad": []}

    @fuzz_settings(scaled(300))
    @given(name=st.one_of(
        st.text(max_size=30),
        st.lists(st.sampled_from(["..", "/", "%2f", "%2e", "\\", "\x00", "secret", "ab",
                                  "cd", "abcd1234", "planted", "%00", "\n"]),
                 max_size=8).map("".join)))
    def fuzz(name):
        name = name.replace("\r", "").replace("\n", "%0a")
        for what, resp in attempts(srv, name):
            seen["cases"] += 1
            if leaks(resp):
                seen["bad"].append("%s served the secret" % what)
    fuzz()
    figures.add(18, seen["cases"], len(seen["bad"]), note="%d generated" % seen["cases"])
    assert seen["bad"] == []


def test_sos_server_refuses_ids_that_are_not_ids(procs, figures):
    blob = procs.blob()
    sos = procs.sos([("g1", [blob])], "--copies", "1")
    bad = []
    for name in TRAVERSALS:
        path = "/fetch/" + quote(name, safe="/%")
        for method in ("GET", "HEAD"):
            status = request(sos.down + path, method)[0]
            if status not in (400, 404):
                bad.append("%s %s: %d" % (method, path, status))
    figures.add(18, 2 * len(TRAVERSALS), len(bad), note="sos-server fetch")
    assert bad == []
