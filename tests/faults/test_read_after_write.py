"""Rows 1, 2 and 3: through real sos-server and blob-server processes, what
goes in comes back out, a fetch right after an acknowledged upload finds
the blob (I3) with the right bytes (I4), and nothing shows before all of it
is stored."""

import socket
import threading
import time

from hypothesis import given, strategies as st

from support import RawConnection, address, request, sha1

from .kit import fuzz_settings, scaled


def test_every_acknowledged_upload_is_fetchable_at_once_on_a_new_connection(
        procs, figures, rng):
    c = procs.cluster()
    trials = scaled(300)
    not_found = wrong = 0
    for i in range(trials):
        body = rng.randbytes(rng.choice((0, 1, 100, 4096, 70000)))
        body += b"%d" % i                    # distinct even when empty
        status, reply = c.sos.upload(body)
        assert status == 200, reply
        status, _, data = c.sos.fetch(reply["id"])
        not_found += status != 200
        wrong += status == 200 and (data != body or sha1(data) != reply["id"])
    figures.add(2, trials, not_found + wrong, seed=rng.seed_value)
    assert (not_found, wrong) == (0, 0)


# Row 1: whatever bytes and X-* headers go in come back out.

EXCLUDED = ("x-forwarded-", "x-real-ip", "x-sos-", "x-cluster-")
HEADER_NAMES = st.from_regex(r"X-[A-Za-z][A-Za-z0-9]{0,7}(-[A-Za-z0-9]{1,6}){0,2}", fullmatch=True)
HEADER_VALUES = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)


def test_any_bytes_and_x_headers_round_trip_through_the_sos_server(procs, figures):
    c = procs.cluster((("g1", 2),))
    seen = {"cases": 0, "bad": []}
    first = {}        # id -> headers of its first upload, which are kept

    @fuzz_settings(scaled(200))
    @given(body=st.binary(max_size=256 * 1024),
           headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6))
    def round_trip(body, headers):
        headers = {k: v for k, v in headers.items() if not k.lower().startswith(EXCLUDED)}
        names = [k.lower() for k in headers]
        if len(set(names)) != len(names):
            return                   # one name twice in two cases: ambiguous
        seen["cases"] += 1
        status, reply = c.sos.upload(body, headers)
        want = first.setdefault(sha1(body), headers)
        got = c.sos.fetch(sha1(body))
        back = {k: got[1].get(k.lower()) for k in want}
        if status != 200 or got[0] != 200 or got[2] != body or back != want:
            seen["bad"].append((len(body), headers, status, got[0], back))
    round_trip()
    figures.add(1, seen["cases"], len(seen["bad"]), note="through sos, up to 256 KiB")
    assert seen["bad"] == []


# Row 3: nothing is visible before all of it is.

def test_a_slow_large_upload_is_never_visible_in_part(procs, figures, rng):
    srv = procs.blob()
    body = rng.randbytes(32 << 20)
    blob_id = sha1(body)
    seen = {"polls": 0, "partial": []}
    done = threading.Event()

    def poll_forever():
        while not done.is_set():
            seen["polls"] += 1
            status, _, data = srv.get(blob_id)
            if status == 200 and data != body:
                seen["partial"].append(len(data))
            head = request(srv.url + "/blob/" + blob_id, "HEAD")
            if head[0] == 200 and head[1].get("content-length") != str(len(body)):
                seen["partial"].append(head[1].get("content-length"))
            listed = srv.ids()
            seen["partial"] += [i for i in listed if i != blob_id]     # temp names
            time.sleep(0.005)
    pollers = [threading.Thread(target=poll_forever) for _ in range(3)]
    for t in pollers:
        t.start()
    with socket.create_connection(address(srv.url)) as sock:
        sock.sendall(b"POST /blob/%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % (blob_id.encode(), len(body)))
        for at in range(0, len(body), 256 << 10):        # ~8 MiB/s, well above MIN_RATE
            sock.sendall(body[at:at + (256 << 10)])
            time.sleep(0.03)
        resp = RawConnection(sock).reply("POST", time.monotonic() + 60)
    done.set()
    for t in pollers:
        t.join()
    figures.add(3, seen["polls"], len(seen["partial"]),
                note="%d polls during a 32 MiB upload: %d partial" % (seen["polls"],
                                                                    len(seen["partial"])))
    assert resp.status == 200
    assert seen["partial"] == []
