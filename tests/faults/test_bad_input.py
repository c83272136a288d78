"""Rows 16, 17, 18: hostile requests.

A table of requests past every limit, hypothesis-made garbage and mutated
requests, and ids that try to leave the store, against a real blob-server
and a real sos-server.  Nothing may be accepted that should not be, no
request may crash a server (no 5xx but 503, no traceback in its stderr: the
procs fixture fails a test on one), no response may carry injected header
lines, and no byte outside the store may be read or written.
"""

import pytest
from hypothesis import given, strategies as st

from support import raw_exchange, request, sha1

from .kit import fuzz_settings, judge, mutated, responses, scaled

MAX_SIZE = 1 << 20
@pytest.fixture
def servers(procs):
    """A blob-server with --max-size, and a sos-server with --max-upload in
    front of a group of one (its own blob-server)."""
    blob = procs.blob("store", "--max-size", str(MAX_SIZE))
    behind = procs.blob("behind")
    sos = procs.sos([("g1", [behind])], "--max-upload", str(MAX_SIZE), "--copies", "1")
    return {"blob": (blob.url, "/blob/" + sha1(b"x")), "sos": (sos.up, "/upload"),
            "procs": (blob, behind, sos)}


def head(path, *headers, method="POST"):
    return ("%s %s HTTP/1.1\r\nHost: t\r\n" % (method, path)).encode() + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n"


LIMITS = [
    # (case, request given the upload path, statuses that fit, Expect: 100-continue?)
    ("huge Content-Length", lambda p: head(p, b"Content-Length: %d" % (1 << 40)), {413}, True),
    ("Content-Length over the limit", lambda p: head(p, b"Content-Length: %d" % (MAX_SIZE + 1)),
     {413}, True),
    ("request line > 8 KiB", lambda p: head(p + "a" * 9000, b"Content-Length: 1"), {414}, True),
    ("> 64 headers", lambda p: head(p, b"Content-Length: 1",
                                    *[b"H%d: v" % i for i in range(70)]), {431}, True),
    ("header block > 16 KiB", lambda p: head(p, b"Content-Length: 1",
                                             *[b"H%d: %s" % (i, b"v" * 2000) for i in range(10)]),
     {431}, True),
    ("one header > 16 KiB", lambda p: head(p, b"Content-Length: 1", b"H: " + b"v" * 17000),
     {431}, True),
    ("too many X-* headers", lambda p: head(p, b"Content-Length: 1",
                                            *[b"X-M%d: v" % i for i in range(40)]), {431}, True),
    ("too much X-* metadata", lambda p: head(p, b"Content-Length: 1",
                                             *[b"X-M%d: %s" % (i, b"v" * 1000) for i in range(10)]),
     {431}, True),
    ("X-* value with a control byte", lambda p: head(p, b"Content-Length: 1", b"X-M: a\x01b"),
     {400}, True),
    ("Content-Length +5", lambda p: head(p, b"Content-Length: +5"), {400}, True),
    ("Content-Length 1_0", lambda p: head(p, b"Content-Length: 1_0"), {400}, True),
    ("Content-Length in Arabic digits", lambda p: head(p, "Content-Length: \u0665".encode()),
     {400}, True),
    ("Content-Length -1", lambda p: head(p, b"Content-Length: -1"), {400}, True),
    ("Content-Length 0x10", lambda p: head(p, b"Content-Length: 0x10"), {400}, True),
    ("Content-Length empty", lambda p: head(p, b"Content-Length: "), {400}, True),
    ("Content-Length twice", lambda p: head(p, b"Content-Length: 5", b"Content-Length: 5"),
     {400}, True),
    ("Content-Length list", lambda p: head(p, b"Content-Length: 5, 5"), {400}, True),
    ("Content-Length with Transfer-Encoding", lambda p: head(
        p, b"Content-Length: 5", b"Transfer-Encoding: chunked"), {400}, True),
    ("Transfer-Encoding twice", lambda p: head(
        p, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), {400}, True),
    ("Transfer-Encoding gzip", lambda p: head(p, b"Transfer-Encoding: gzip"), {400, 501}, True),
    ("no length", lambda p: head(p), {411}, True),
    ("space before colon", lambda p: head(p, b"Content-Length : 1"), {400}, True),
    ("obsolete line folding", lambda p: head(p, b"Content-Length: 1", b" folded"), {400}, True),
    ("malformed chunk size", lambda p: head(p, b"Transfer-Encoding: chunked") + b"zz\r\nab\r\n0\r\n\r\n",
     {400}, False),
    ("chunk size too long", lambda p: head(p, b"Transfer-Encoding: chunked") + b"1" * 2000 + b"\r\n",
     {400}, False),
    ("chunk without CRLF", lambda p: head(p, b"Transfer-Encoding: chunked") + b"2\r\nabX\r\n0\r\n\r\n",
     {400}, False),
    ("negative chunk size", lambda p: head(p, b"Transfer-Encoding: chunked") + b"-1\r\n",
     {400}, False),
]


@pytest.mark.parametrize("target", ["blob", "sos"])
def test_requests_past_a_limit_are_refused_with_the_fitting_status_before_any_body_is_read(
        servers, figures, target):
    url, path = servers[target]
    bad = []
    for case, make, statuses, expect in LIMITS:
        data = make(path)
        if expect:
            # With Expect: 100-continue the body is sent only after a 100;
            # the refusal must come first, so not one body byte is read.
            data = data[:-2] + b"Expect: 100-continue\r\n\r\n"
        resp = raw_exchange(url, data, timeout=15)
        if resp is None:
            bad.append("%s: closed without an answer" % case)
        elif resp.status not in statuses or resp.interim:
            bad.append("%s: %s%d, expected %s" % (case, "100 then " if resp.interim else "",
                                                  resp.status, sorted(statuses)))
    blob, behind, _ = servers["procs"]
    accepted = blob.ids() + behind.ids() + blob.tmp_files() + behind.tmp_files()
    figures.add(16, len(LIMITS), len(bad) + len(accepted), note="%s: %d cases" % (target, len(LIMITS)))
    assert bad == []
    assert accepted == []


# --- Row 17: fuzz ------------------------------------------------------------------

@pytest.mark.parametrize("target", ["blob", "sos-up", "sos-down"])
def test_garbage_and_mutated_requests_never_crash_a_server_or_inject_header_lines(
        servers, figures, target):
    blob, behind, sos = servers["procs"]
    url = {"blob": blob.url, "sos-up": sos.up, "sos-down": sos.down}[target]
    assert sos.upload(b"hello")[0] == 200 and blob.post(sha1(b"hello"), b"hello")[0] == 200
    seen = {"cases": 0, "bad": []}

    @fuzz_settings(scaled(600))
    @given(data=st.one_of(mutated(), st.binary(max_size=600)))
    def fuzz(data):
        seen["cases"] += 1
        problems = judge(responses(url, data))
        if problems:
            seen["bad"].append((data, problems))
    fuzz()
    answering = request(url + "/alive")[0] in (200, 404)    # sos ports: no /alive
    figures.add(17, seen["cases"], len(seen["bad"]) + (not answering),
                note="%s: %d cases" % (target, seen["cases"]))
    assert seen["bad"] == []
    assert answering


def test_stored_metadata_never_injects_lines_into_a_response(servers, figures):
    blob, behind, sos = servers["procs"]
    seen = {"cases": 0, "bad": []}

    # A LF would end the header line in the request itself (the mutation fuzz
    # covers that); everything else, CR and NUL included, goes in the value.
    @fuzz_settings(scaled(200))
    @given(value=st.binary(max_size=40).filter(lambda v: b"\n" not in v),
           name=st.sampled_from([b"X-Note", b"X-Mime-Type"]))
    def fuzz(value, name):
        seen["cases"] += 1
        body = b"meta %d" % seen["cases"]
        blob_id = sha1(body)
        data = head("/blob/" + blob_id, b"Content-Length: %d" % len(body), name + b": " + value) + body
        resp = raw_exchange(blob.url, data)
        if resp is None or resp.status not in (200, 400, 431):
            seen["bad"].append((value, resp))
            return
        if resp.status != 200:
            return
        resp = raw_exchange(blob.url, head("/blob/" + blob_id, method="GET"))
        problems = judge([resp])
        got = resp.header(name.decode())
        if problems or (got or "").encode("latin-1") != value.strip(b" \t\r"):
            seen["bad"].append((value, problems, got))
    fuzz()
    figures.add(17, seen["cases"], len(seen["bad"]), note="stored X-* values: %d" % seen["cases"])
    assert seen["bad"] == []
