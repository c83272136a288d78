#!/usr/bin/env bash
# `make run`: the README's Quick Start on one machine, from the source tree.
#
# Two blob-servers (ports 4001 and 4002, stores ./data1 and ./data2) and a
# sos-server (upload 9991, download 9992) in the foreground; Ctrl-C stops all
# three.  Deletes are on, with a token generated into ./delete.token (kept
# across runs).  Needs only python3.  Ports and interpreter can be overridden:
#   PYTHON=python3 BLOB1_PORT=4001 BLOB2_PORT=4002 UPLOAD_PORT=9991 DOWNLOAD_PORT=9992 ADMIN_PORT=9993
#
# Started as root, each blob-server chroots into its store and runs as nobody
# (so ./data1 and ./data2 end up owned by nobody); as anyone else it just runs.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BLOB1_PORT=${BLOB1_PORT:-4001}
BLOB2_PORT=${BLOB2_PORT:-4002}
UPLOAD_PORT=${UPLOAD_PORT:-9991}
DOWNLOAD_PORT=${DOWNLOAD_PORT:-9992}
ADMIN_PORT=${ADMIN_PORT:-9993}
READY_TIMEOUT=${READY_TIMEOUT:-15}
PIDS=()

stop_all() {
    local pid deadline=$((SECONDS + 10))
    trap - INT TERM EXIT
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap 'echo; echo "stopping..."; stop_all; exit 0' INT TERM
trap stop_all EXIT

# Ready when /alive (blob) or any path (sos) gets an HTTP answer.
wait_ready() {
    local pid=$1 url=$2 deadline=$((SECONDS + READY_TIMEOUT))
    until "$PYTHON" - "$url" 2>/dev/null <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1).close()
except urllib.error.HTTPError:
    pass
PY
    do
        kill -0 "$pid" 2>/dev/null || { echo "run: server for $url exited" >&2; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "run: $url not ready after ${READY_TIMEOUT}s" >&2; exit 1; }
        sleep 0.1
    done
}

# Deletes need a token of their own: made once, readable by us only.
if [ ! -s delete.token ]; then
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(16))' >delete.token)
fi
DELETE_TOKEN=$(cat delete.token)

# setsid: Ctrl-C reaches only this script, which then sends each server one
# SIGTERM (a terminal's SIGINT plus our SIGTERM would be two signals).
setsid "$PYTHON" blob.py -store data1 -port "$BLOB1_PORT" & PIDS+=($!)
setsid "$PYTHON" blob.py -store data2 -port "$BLOB2_PORT" & PIDS+=($!)
wait_ready "${PIDS[0]}" "http://127.0.0.1:$BLOB1_PORT/alive"
wait_ready "${PIDS[1]}" "http://127.0.0.1:$BLOB2_PORT/alive"
setsid "$PYTHON" sos.py -blob-server "http://127.0.0.1:$BLOB1_PORT,http://127.0.0.1:$BLOB2_PORT" \
    -upload-port "$UPLOAD_PORT" -download-port "$DOWNLOAD_PORT" -admin-port "$ADMIN_PORT" \
    -delete-token delete.token & PIDS+=($!)
wait_ready "${PIDS[2]}" "http://127.0.0.1:$DOWNLOAD_PORT/"

cat <<EOF

SOS is running: blob-servers on :$BLOB1_PORT (./data1) and :$BLOB2_PORT (./data2),
sos-server uploads on :$UPLOAD_PORT, downloads on :$DOWNLOAD_PORT.  Try, in another terminal:

  curl -X POST --data-binary @/etc/passwd http://localhost:$UPLOAD_PORT/upload
  curl http://localhost:$DOWNLOAD_PORT/fetch/<id from the reply>
  curl -X DELETE -H 'Authorization: Bearer $DELETE_TOKEN' http://localhost:$UPLOAD_PORT/fetch/<id>
  $PYTHON replicate.py -blob-server http://localhost:$BLOB1_PORT,http://localhost:$BLOB2_PORT --verbose
  curl http://localhost:$BLOB1_PORT/blobs

Ctrl-C stops all three.

EOF

# Stay in the foreground until Ctrl-C, or until any server dies.
set +e
wait -n
rc=$?
echo "run: a server exited (status $rc); stopping the others" >&2
exit 1
