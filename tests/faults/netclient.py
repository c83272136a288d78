"""A client for the network tests, run inside a network namespace with
`ip netns exec NS python netclient.py COMMAND ...`; prints JSON.

    uploads URL COUNT SEED TIMEOUT   upload COUNT bodies made from SEED to
                                     URL/upload, one connection each:
                                     [[status or error, seconds, id]]
    check URL ID...                  fetch URL/fetch/ID: [ID whose bytes
                                     did not hash to it or were not 200]
    upload URL SIZE TIMEOUT          one upload of SIZE bytes:
                                     [status or error, seconds]

Standard library only: it runs outside the test process.
"""

import hashlib
import http.client
import json
import random
import sys
import time
from urllib.parse import urlsplit


def post(url, body, timeout):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request("POST", "/upload", body)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - start
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__, time.monotonic() - start
    finally:
        conn.close()


def bodies(seed, count):
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice((10, 1000, 50000))) + b"%d" % i for i in range(count)]


def main(argv):
    command, url = argv[0], argv[1]
    if command == "uploads":
        count, seed, timeout = int(argv[2]), int(argv[3]), float(argv[4])
        out = [list(post(url, body, timeout)) + [hashlib.sha1(body).hexdigest()]
               for body in bodies(seed, count)]
    elif command == "check":
        out = []
        parts = urlsplit(url)
        for blob_id in argv[2:]:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                conn.request("GET", "/fetch/" + blob_id)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or hashlib.sha1(data).hexdigest() != blob_id:
                    out.append(blob_id)
            except (OSError, http.client.HTTPException):
                out.append(blob_id)
            finally:
                conn.close()
    elif command == "upload":
        out = list(post(url, bytes(int(argv[2])), float(argv[3])))
    else:
        raise SystemExit("unknown command %r" % command)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
