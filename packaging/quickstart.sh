#!/usr/bin/env bash
# CI: the README's Quick Start from the source tree, as a newcomer runs it.
#
# `make run` in the background, then the seed's curl upload and fetch, the
# replicate step reading ~/.sos.conf, the delete line it prints, and Ctrl-C
# (SIGINT) stopping it all.
# Uses the default ports (4001, 4002, 9991, 9992, 9993): they must be free.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
home=$work/home
mkdir -p "$home"
log=$work/run.log
fail() { echo "quickstart: FAIL: $*" >&2; cat "$log" >&2 || true; exit 1; }

# Job control: make run gets a process group of its own and, unlike a plain
# background job, does not start with SIGINT ignored: Ctrl-C works on it.
set -m
make run >"$log" 2>&1 &
run_pid=$!
set +m
cleanup() {
    kill -INT -- "-$run_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

deadline=$((SECONDS + 60))
until curl -s -o /dev/null http://localhost:9992/; do
    [ $SECONDS -lt $deadline ] || fail "make run did not come up within 60 s"
    kill -0 "$run_pid" 2>/dev/null || fail "make run exited"
    sleep 0.2
done

# The seed README's commands, verbatim but for the file uploaded.
cp /etc/hostname "$work/upload" 2>/dev/null || echo "hello from SOS" >"$work/upload"
reply=$(curl -s -X POST --data-binary @"$work/upload" http://localhost:9991/upload)
echo "upload: $reply"
id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$reply")
[ "$id" = "$(sha1sum "$work/upload" | cut -c1-40)" ] || fail "id is not the SHA-1"
curl -s "http://localhost:9992/fetch/$id" | cmp - "$work/upload" || fail "fetch differs"

printf 'http://localhost:4001\nhttp://localhost:4002\n' >"$home/.sos.conf"
HOME=$home python3 replicate.py --verbose || fail "replicate failed"
for port in 4001 4002; do
    curl -s "http://localhost:$port/blob/$id" | cmp - "$work/upload" \
        || fail "blob-server :$port lacks $id"
done

# The delete line make run printed, with the token it generated.
token=$(cat delete.token)
grep -qF "curl -X DELETE -H 'Authorization: Bearer $token' http://localhost:9991/fetch/<id>" "$log" \
    || fail "make run did not print the delete line"
code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE -H "Authorization: Bearer $token" \
    "http://localhost:9991/fetch/$id")
[ "$code" = 200 ] || fail "delete answered $code"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://localhost:9992/fetch/$id")
[ "$code" = 404 ] || fail "fetch after delete answered $code"

kill -INT -- "-$run_pid"
deadline=$((SECONDS + 30))
while kill -0 "$run_pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "Ctrl-C did not stop make run within 30 s"
    sleep 0.1
done
if curl -s -o /dev/null http://localhost:9992/ || curl -s -o /dev/null http://localhost:4001/alive; then
    fail "servers still answering after Ctrl-C"
fi
echo "quickstart: PASS"
