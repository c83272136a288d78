"""Operating SOS: health, metrics, the status page, access logs, tokens, TLS."""

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import blob
import httpd
import process
import sos
from cluster import Cluster, Group
from support import ROOT, BlobProcess, InProcessServer, get_json, request, sha1, wait_for


@pytest.fixture
def admin(make_cluster):
    """A cluster of two groups of two, with its admin server."""
    c = make_cluster()
    srv = InProcessServer(sos.make_admin_server(c.cluster, ("127.0.0.1", 0),
                                          c.up.srv.metrics, ["an old error"]))
    c.admin = srv
    yield c
    srv.stop()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_health_is_200_when_every_group_can_take_a_write(admin):
    status, body = get_json(admin.admin.url + "/health")
    assert status == 200 and body["ok"] is True
    members = [m for g in body["groups"] for m in g["members"]]
    assert len(members) == 4
    assert all(m["up"] and m["disk_free"] > 0 and "latency_ms" in m for m in members)


def test_health_is_503_and_names_the_down_member(admin):
    down = admin.groups[1].members[0]
    admin.blobs[down].stop()
    status, body = get_json(admin.admin.url + "/health")
    assert status == 503 and body["ok"] is False
    g2 = [g for g in body["groups"] if g["name"] == "g2"][0]
    assert g2["writable"] is False
    assert [m["url"] for m in g2["members"] if not m["up"]] == [down]


def test_sos_metrics_parse_and_count_uploads(admin):
    for i in range(3):
        assert admin.upload(b"metric %d" % i)[0] == 200
    assert admin.fetch(sha1(b"metric 0"))[0] == 200
    status, headers, text = request(admin.admin.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    fams = families(text.decode())
    reqs = {(s.labels["route"], s.labels["status"]): s.value
            for s in fams["sos_requests"].samples if s.name.endswith("_total")}
    assert reqs[("upload", "200")] == 3 and reqs[("fetch", "200")] == 1
    events = {s.labels["event"]: s.value for s in fams["sos_upstream_events"].samples}
    assert events["copies_made"] >= 6
    assert fams["sos_request_seconds"].type == "histogram"
    up = [s.value for s in fams["sos_member_up"].samples]
    assert up == [1, 1, 1, 1]


def test_blob_server_metrics_parse(blob_server):
    srv = blob_server()
    assert request(srv.url + "/blob/abc", "POST", b"xyz")[0] == 200
    status, _, text = request(srv.url + "/metrics")
    assert status == 200
    fams = families(text.decode())
    assert fams["sos_blob_blobs"].samples[0].value == 1
    assert fams["sos_blob_bytes"].samples[0].value == 3
    assert fams["sos_blob_disk_free"].samples[0].value > 0
    reqs = {(s.labels["route"], s.labels["status"]): s.value
            for s in fams["sos_blob_requests"].samples if s.name.endswith("_total")}
    assert reqs[("blob", "200")] == 1


def test_status_page_is_self_contained_html(admin):
    status, headers, page = request(admin.admin.url + "/status")
    assert status == 200 and headers["content-type"].startswith("text/html")
    text = page.decode()
    assert 'http-equiv="refresh"' in text and "an old error" in text
    assert "<script" not in text and "src=" not in text and "href=" not in text
    for url in admin.blobs:
        assert url in text


def test_status_page_in_a_real_browser_shows_the_down_member(admin, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("chromium is needed for this test: apt-get install chromium")
    down = admin.groups[0].members[1]
    admin.blobs[down].stop()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             "--user-data-dir=%s" % (tmp_path / "profile")]
    shot = tmp_path / "status.png"
    subprocess.run(flags + ["--screenshot=%s" % shot, "--window-size=1200,900",
                            admin.admin.url + "/status"],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run(flags + ["--dump-dom", admin.admin.url + "/status"],
                         capture_output=True, timeout=120, check=True).stdout.decode()
    rows = [r for r in dom.split("<tr") if down in r]
    assert len(rows) == 1 and 'data-state="down"' in rows[0] and "DOWN" in rows[0]
    others = [r for r in dom.split("<tr") if "data-state=" in r and down not in r]
    assert len(others) == 3 and all('data-state="up"' in r for r in others)


def test_upload_token_is_required_and_compared(make_cluster):
    c = make_cluster()
    c.up.srv.token = "s3cret"
    status, body = c.upload(b"no token")
    assert status == 401 and "token" in body["error"]
    assert c.upload(b"bad", {"Authorization": "Bearer wrong"})[0] == 401
    status, body = c.upload(b"with token", {"Authorization": "Bearer s3cret"})
    assert status == 200
    assert c.fetch(body["id"])[0] == 200        # downloads stay open


def test_download_token_guards_fetches(make_cluster):
    c = make_cluster()
    c.down.srv.token = "reader"
    status, body = c.upload(b"guarded")
    assert c.fetch(body["id"])[0] == 401
    assert c.fetch(body["id"], headers={"Authorization": "Bearer reader"})[0] == 200


def test_cluster_token_locks_blob_server_but_alive(blob_server, tmp_path):
    srv = blob_server()
    srv.srv.token = "cluster"
    assert request(srv.url + "/alive")[0] == 200
    for path in ("/blobs", "/stats", "/digests", "/metrics", "/blob/abc"):
        status, _, body = request(srv.url + path)
        assert status == 401 and b"token" in body, path
    auth = {"Authorization": "Bearer cluster"}
    assert request(srv.url + "/blob/abc", "POST", b"x", auth)[0] == 200
    assert request(srv.url + "/blob/abc", headers=auth)[2] == b"x"
    # sos-server and replicate carry it through their Pool.
    pool = sos.Pool(token="cluster")
    reply = pool.request(srv.url, "GET", "/blobs")
    assert reply.status == 200 and reply.json() == ["abc"]


def test_tokens_from_files_through_the_cli(blob_process, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    b1 = blob_process("s1", "--cluster-token", str(token))
    b2 = blob_process("s2", "--cluster-token", str(token))
    assert request(b1.url + "/blobs")[0] == 401
    auth = {"Authorization": "Bearer tok-123"}
    assert request(b1.url + "/blob/abcd", "POST", b"1", auth)[0] == 200
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "replicate.py"),
                         "-blob-server", "%s,%s" % (b1.url, b2.url),
                         "--cluster-token", str(token)], capture_output=True,
                        timeout=60)
    assert rc.returncode == 0, rc.stderr
    assert request(b2.url + "/blob/abcd", headers=auth)[2] == b"1"


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def own_ca(tmp_path):
    """A CA and a blob-server certificate signed by it, made with the
    README's openssl commands: (ca.pem, server.pem, server.key)."""
    d = str(tmp_path)
    ext = os.path.join(d, "ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nauthorityKeyIdentifier=keyid\n")
    for argv in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "1", "-subj", "/CN=sos-ca",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-out", "server.pem", "-extfile", ext]):
        subprocess.run(["openssl"] + argv, cwd=d, check=True, capture_output=True,
                       timeout=60)
    return [os.path.join(d, n) for n in ("ca.pem", "server.pem", "server.key")]


def test_a_blob_server_certificate_from_the_readmes_own_ca_is_trusted_on_every_python(
        blob_server, tmp_path):
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a CA certificate
    # without keyUsage, which 3.11 and 3.12 accept, is refused there.  The
    # README's recipe must work on every Python we support.
    ca, cert, key = own_ca(tmp_path)
    members = [blob_server(name) for name in ("t1", "t2")]
    for srv in members:
        srv.srv.tls = process.tls_context(cert, key)
    cluster = Cluster([Group("tls", [m.url.replace("http:", "https:") for m in members])],
                      pool=sos.Pool(ssl_context=ssl.create_default_context(cafile=ca)))
    up, down = sos.make_servers(cluster, host="127.0.0.1", upload_port=0, download_port=0)
    down.server_close()
    up = InProcessServer(up)
    try:
        status, reply = get_json(up.url + "/upload", "POST", b"over https")
        assert (status, reply.get("copies")) == (200, 2), reply
        assert all(m.store.exists(reply["id"]) for m in members)
    finally:
        up.stop()
        cluster.close()


def test_a_silent_tls_client_is_cut_off_at_the_head_deadline(blob_server, certificate):
    # Nothing is sent, so the handshake never ends: the reaper must close the
    # connection (a socket timeout no longer does), and go on reaping.
    cert, key = certificate
    srv = blob_server()
    srv.srv.tls = process.tls_context(cert, key)
    port = srv.srv.server_port
    start = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30)
              for _ in range(2)]
    try:
        assert [s.recv(1) for s in silent] == [b"", b""]
    finally:
        for s in silent:
            s.close()
    assert time.monotonic() - start < httpd.HEAD_TIMEOUT + 2


def test_tls_blob_server_and_sos_server_over_https(blob_server, certificate):
    cert, key = certificate
    members = []
    for name in ("t1", "t2"):
        srv = blob_server(name)
        srv.srv.tls = process.tls_context(cert, key)
        members.append(srv.url.replace("http:", "https:"))
    client = ssl.create_default_context(cafile=cert)
    cluster = Cluster([Group("tls", members)],
                          pool=sos.Pool(ssl_context=client))
    up, down = sos.make_servers(cluster, host="127.0.0.1", upload_port=0, download_port=0,
                                tls=process.tls_context(cert, key))
    up, down = InProcessServer(up), InProcessServer(down)
    try:
        import http.client
        conn = http.client.HTTPSConnection("127.0.0.1", up.srv.server_port,
                                           context=client, timeout=30)
        conn.request("POST", "/upload", b"secret bytes")
        resp = conn.getresponse()
        assert resp.status == 200
        blob_id = json.loads(resp.read())["id"]
        conn = http.client.HTTPSConnection("127.0.0.1", down.srv.server_port,
                                           context=client, timeout=30)
        conn.request("GET", "/fetch/" + blob_id)
        assert conn.getresponse().read() == b"secret bytes"
        # A body too large to keep in memory is spooled, and goes to the
        # members through TLS (socket.sendfile falls back to reads and sends).
        big = os.urandom(sos.SPOOL_IN_MEMORY + 1)
        conn = http.client.HTTPSConnection("127.0.0.1", up.srv.server_port,
                                           context=client, timeout=30)
        conn.request("POST", "/upload", big)
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["copies"]) == (200, 2)
        conn = http.client.HTTPSConnection("127.0.0.1", down.srv.server_port,
                                           context=client, timeout=30)
        conn.request("GET", "/fetch/" + sha1(big))
        assert conn.getresponse().read() == big
        # Plain HTTP to a TLS port gets nothing, and the server lives on.
        with pytest.raises(Exception):
            request(down.url + "/fetch/" + blob_id, timeout=5)
        conn.request("GET", "/fetch/" + blob_id)
        assert conn.getresponse().read() == b"secret bytes"
    finally:
        up.stop()
        down.stop()


def test_silent_tls_client_does_not_block_others(blob_server, certificate):
    cert, key = certificate
    srv = blob_server()
    srv.srv.tls = process.tls_context(cert, key)
    silent = socket.create_connection(("127.0.0.1", srv.srv.server_port))
    try:
        client = ssl.create_default_context(cafile=cert)
        import http.client
        conn = http.client.HTTPSConnection("127.0.0.1", srv.srv.server_port,
                                           context=client, timeout=5)
        conn.request("GET", "/alive")
        assert conn.getresponse().read() == b"alive"
    finally:
        silent.close()


def test_access_log_file_in_common_log_format_reopens_on_sighup(blob_process, tmp_path):
    # blob-server started as root chroots and becomes nobody: it reopens the
    # log through a directory it opened before, which nobody must be able
    # to write.
    logs = tmp_path / "logs"
    logs.mkdir()
    nobody = blob.resolve_user("nobody")
    os.chown(logs, *nobody)
    log = logs / "access.log"
    b = blob_process("s", "--access-log", str(log))
    assert request(b.url + "/blob/abc", "POST", b"hello")[0] == 200
    line = wait_for(lambda: log.exists() and log.read_text(), what="access log")
    assert '"POST /blob/abc HTTP/1.1" 200' in line and line.startswith("127.0.0.1 - - [")
    os.rename(log, logs / "access.log.1")
    b.proc.send_signal(signal.SIGHUP)
    # The server must keep running and write to a fresh file after SIGHUP.
    wait_for(lambda: request(b.url + "/alive")[0] == 200 and log.exists()
             and "GET /alive" in log.read_text(), what="access log reopened")
    assert "POST" not in log.read_text()
    assert "POST /blob/abc" in (logs / "access.log.1").read_text()


def children_of(pid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.parametrize("flags", [[], ["--no-pin"]])
def test_each_of_several_workers_keeps_to_a_cpu_of_its_own(tmp_path, flags):
    """Workers are pinned in turn over the CPUs we may use (the master is
    worker 0), unless --no-pin; one worker alone is never pinned."""
    allowed = sorted(os.sched_getaffinity(0))
    srv = BlobProcess(tmp_path / "store", "--workers", "3", *flags)
    try:
        workers = [srv.pid] + wait_for(lambda: len(children_of(srv.pid)) == 2
                                       and sorted(children_of(srv.pid)),
                                       what="two forked workers")
        got = sorted(map(sorted, map(os.sched_getaffinity, workers)))
        if flags:
            assert got == [allowed] * 3
        else:
            assert got == sorted([allowed[i % len(allowed)]] for i in range(3))
        assert request(srv.url + "/alive")[0] == 200
    finally:
        srv.stop()
    single = BlobProcess(tmp_path / "one", "--workers", "1")
    try:
        assert sorted(os.sched_getaffinity(single.pid)) == allowed
    finally:
        single.stop()
