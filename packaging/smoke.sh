#!/usr/bin/env bash
# Smoke test of the static binaries in dist/, each run in its own empty chroot.
#
#   sudo packaging/smoke.sh            # after `make dist`; must run as root
#
# Every root holds only the binary, /proc, /tmp and a two-user /etc/passwd and
# /etc/group: no libc, no resolver, no /dev.  That proves the binaries are
# really self-contained, and that blob-server can chroot into its store and
# drop to nobody by itself.  Then a real round trip, as in the README's Quick
# Start: two blob-servers, a sos-server, an upload, a fetch, a replicate run,
# and a SIGTERM that must end blob-server with status 0.
#
# Ports can be moved to avoid clashes:
#   BLOB1_PORT=4001 BLOB2_PORT=4002 UPLOAD_PORT=9991 DOWNLOAD_PORT=9992 ADMIN_PORT=9993
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIST=${DIST:-$ROOT/dist}
BLOB1_PORT=${BLOB1_PORT:-4001}
BLOB2_PORT=${BLOB2_PORT:-4002}
UPLOAD_PORT=${UPLOAD_PORT:-9991}
DOWNLOAD_PORT=${DOWNLOAD_PORT:-9992}
ADMIN_PORT=${ADMIN_PORT:-9993}        # sos-server's loopback status port
READY_TIMEOUT=${READY_TIMEOUT:-20}    # seconds for a server to answer
STOP_TIMEOUT=${STOP_TIMEOUT:-10}      # seconds for a server to exit on SIGTERM
POLL=0.1
BINARIES=(blob-server sos-server replicate)
BLOBS=http://127.0.0.1:$BLOB1_PORT,http://127.0.0.1:$BLOB2_PORT

WORK=
PIDS=()        # every server started; each leads its own process group
MOUNTS=()

say() { echo "smoke: $*" >&2; }
fail() {
    echo "smoke: FAIL: $*" >&2
    show_logs
    exit 1
}
show_logs() {
    local f
    [ -n "$WORK" ] && [ -d "$WORK/logs" ] || return 0
    for f in "$WORK"/logs/*.log; do
        [ -s "$f" ] || continue
        echo "----- ${f##*/} (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}

cleanup() {
    local rc=$? pid m deadline
    trap - EXIT INT TERM
    # SIGTERM to each leader only: the static binary forwards it to the
    # processes it forks (a SIGTERM to the whole group reaches the program
    # twice, see packaging/systemd/blob-server.service, KillMode=).  SIGKILL
    # for whatever of the group is left at the deadline.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + STOP_TIMEOUT))
    for pid in "${PIDS[@]}"; do
        while kill -0 -- "-$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep $POLL; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    for m in "${MOUNTS[@]}"; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        # Never rm -rf through a mount point that is still there.
        if grep -q " $WORK/" /proc/mounts; then
            say "left $WORK in place: something is still mounted below it"
        elif [ -n "${KEEP:-}" ]; then
            say "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit $rc
}

# make_root DIR BINARY: an empty root $WORK/DIR holding /proc, /tmp,
# /etc/{passwd,group} and /BINARY.
make_root() {
    local dir="$WORK/$1" name=$2
    mkdir -p "$dir/proc" "$dir/tmp" "$dir/etc"
    chmod 1777 "$dir/tmp"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' >"$dir/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$dir/etc/group"
    cp "$DIST/$name" "$dir/$name"
    mount -t proc proc "$dir/proc"
    MOUNTS+=("$dir/proc")
}

# start NAME ROOT ARGS...: run /NAME chrooted in $WORK/ROOT in the background,
# in a session of its own so cleanup can reach the processes it forks.
# Sets STARTED to its pid.
start() {
    local name=$1 root=$2
    shift 2
    say "start: chroot $root /$name $*"
    setsid chroot "$WORK/$root" "/$name" "$@" >"$WORK/logs/$root.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

# wait_http PID URL: poll until URL answers with any HTTP status.
wait_http() {
    local pid=$1 url=$2 code deadline=$((SECONDS + READY_TIMEOUT))
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        [ "$code" != 000 ] && [ -n "$code" ] && return 0
        kill -0 "$pid" 2>/dev/null || fail "server for $url exited before it answered"
        [ $SECONDS -lt $deadline ] || fail "$url did not answer within ${READY_TIMEOUT}s"
        sleep $POLL
    done
}

port_free() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/" || true)
    [ "$code" = 000 ] || fail "port $1 is already in use; set ${2}=another port"
}

# stop PID WHAT: SIGTERM and require exit status 0 within STOP_TIMEOUT.
stop() {
    local pid=$1 what=$2 rc=0 deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || fail "$what still running ${STOP_TIMEOUT}s after SIGTERM"
        sleep $POLL
    done
    wait "$pid" || rc=$?
    [ "$rc" -eq 0 ] || fail "$what exited with status $rc after SIGTERM (want 0)"
    say "ok: $what exited 0 on SIGTERM"
}

# expect CODE METHOD URL [CURL ARGS...]: the request must answer CODE.
expect() {
    local want=$1 method=$2 url=$3 code
    shift 3
    code=$(curl -s -o "$WORK/body" -w '%{http_code}' --max-time 10 -X "$method" "$@" "$url" || true)
    [ "$code" = "$want" ] || fail "$method $url answered $code, want $want: $(head -c 300 "$WORK/body")"
}

# tour PORT ID: every blob-server route once, after its chroot.
tour() {
    local base=http://127.0.0.1:$1 id=$2 pid
    expect 200 GET "$base/blobs"
    grep -q "$id" "$WORK/body" || fail "GET /blobs does not list $id"
    expect 200 GET "$base/stats"
    expect 200 GET "$base/digests"
    expect 200 HEAD "$base/blob/$id" -I
    expect 206 GET "$base/blob/$id" -H 'Range: bytes=0-9'
    [ "$(stat -c %s "$WORK/body")" = 10 ] || fail "Range bytes=0-9 did not return 10 bytes"
    expect 416 GET "$base/blob/$id" -H 'Range: bytes=999999999-'
    expect 304 GET "$base/blob/$id" -H "If-None-Match: \"$id\""
    expect 404 GET "$base/blob/0000000000000000000000000000000000000000"
    expect 400 GET "$base/blob/NOT-AN-ID"
    expect 404 GET "$base/no/such/route"
    expect 405 PATCH "$base/blob/$id"
    expect 200 POST "$base/blob/smokedelete" --data-binary 'deleted after the chroot'
    expect 200 DELETE "$base/blob/smokedelete"
    expect 404 GET "$base/blob/smokedelete"
    expect 422 POST "$base/blob/$id" --data-binary 'not the right bytes'
    expect 200 POST "$base/verify/$id"
    expect 200 GET "$base/alive"
    pid=$(chrooted_in "$WORK/blob1/data1" | sed -n 1p)
    [ -n "$pid" ] || fail "blob-server 1 is gone after the API tour"
    say "ok: blob-server API tour after chroot (blobs, stats, digests, HEAD, Range, 304, 400/404/405/416/422, verify, delete)"
}

# Processes whose root directory is DIR, as "pid:uid" words.
chrooted_in() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}:$(stat -c %u "$p")"
    done
    return 0
}

main() {
    local b id id2 got sum pids code blob1 blob2 sos
    [ "$(id -u)" -eq 0 ] || { echo "smoke: must run as root (chroot, mount)" >&2; exit 1; }
    command -v curl >/dev/null || { echo "smoke: needs curl" >&2; exit 1; }
    for b in "${BINARIES[@]}"; do
        [ -x "$DIST/$b" ] || { echo "smoke: $DIST/$b missing: run 'make dist' first" >&2; exit 1; }
    done
    port_free "$BLOB1_PORT" BLOB1_PORT
    port_free "$BLOB2_PORT" BLOB2_PORT
    port_free "$UPLOAD_PORT" UPLOAD_PORT
    port_free "$DOWNLOAD_PORT" DOWNLOAD_PORT
    port_free "$ADMIN_PORT" ADMIN_PORT

    WORK=$(mktemp -d /tmp/sos-smoke.XXXXXX)
    chmod 755 "$WORK"
    mkdir "$WORK/logs"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    # 1. --help and --version, each binary alone in an empty root.
    for b in "${BINARIES[@]}"; do
        make_root "help-$b" "$b"
        chroot "$WORK/help-$b" "/$b" --help >"$WORK/logs/help-$b.log" 2>&1 \
            || fail "chroot /$b --help failed"
        grep -qi usage "$WORK/logs/help-$b.log" || fail "/$b --help printed no usage"
        chroot "$WORK/help-$b" "/$b" --version >>"$WORK/logs/help-$b.log" 2>&1 \
            || fail "chroot /$b --version failed"
        say "ok: $b --help and --version in an empty root ($(tail -n 1 "$WORK/logs/help-$b.log"))"
    done

    # 2. Two blob-servers, started as root: each chroots into its store and
    #    drops to nobody.
    make_root blob1 blob-server
    make_root blob2 blob-server
    start blob-server blob1 -store /data1 -port "$BLOB1_PORT"; blob1=$STARTED
    start blob-server blob2 -store /data2 -port "$BLOB2_PORT"; blob2=$STARTED
    wait_http "$blob1" "http://127.0.0.1:$BLOB1_PORT/alive"
    wait_http "$blob2" "http://127.0.0.1:$BLOB2_PORT/alive"
    got=$(curl -fsS --max-time 10 "http://127.0.0.1:$BLOB1_PORT/alive") || fail "GET /alive failed"
    say "ok: blob-servers answer /alive: $got"
    pids=$(chrooted_in "$WORK/blob1/data1")
    [ -n "$pids" ] || fail "no process of blob-server 1 has chrooted into $WORK/blob1/data1"
    for b in $pids; do
        [ "${b#*:}" != 0 ] || fail "blob-server 1 still runs as root inside its store (pid:uid $pids)"
    done
    say "ok: blob-server 1 runs chrooted in its store as non-root (pid:uid $pids)"

    # 3. sos-server, then the Quick Start's upload and fetch.
    make_root sos sos-server
    start sos-server sos -blob-server "$BLOBS" -api-host 127.0.0.1 \
        -upload-port "$UPLOAD_PORT" -download-port "$DOWNLOAD_PORT" -admin-port "$ADMIN_PORT"
    sos=$STARTED
    wait_http "$sos" "http://127.0.0.1:$UPLOAD_PORT/"
    wait_http "$sos" "http://127.0.0.1:$DOWNLOAD_PORT/"
    # The README uploads /etc/passwd; a copy, in case something edits it meanwhile.
    cp /etc/passwd "$WORK/passwd"
    got=$(curl -sS --max-time 10 -X POST --data-binary @"$WORK/passwd" \
        "http://127.0.0.1:$UPLOAD_PORT/upload") || fail "upload failed: $got"
    say "upload replied: $got"
    id=$(printf '%s' "$got" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])') \
        || fail "upload reply has no JSON \"id\": $got"
    sum=$(sha1sum <"$WORK/passwd" | cut -d' ' -f1)
    [ "$id" = "$sum" ] || fail "upload id $id is not the SHA1 of the body ($sum)"
    curl -fsS --max-time 10 "http://127.0.0.1:$DOWNLOAD_PORT/fetch/$id" -o "$WORK/fetched" \
        || fail "GET /fetch/$id failed"
    cmp -s "$WORK/fetched" "$WORK/passwd" || fail "fetched object differs from the upload"
    say "ok: fetch/$id returns the uploaded bytes"
    got=$(curl -fsS --max-time 10 -o /dev/null -w '%{content_type}' \
        "http://127.0.0.1:$DOWNLOAD_PORT/fetch/$id.txt") || fail "GET /fetch/$id.txt failed"
    case $got in text/plain*) ;; *) fail "fetch/$id.txt has Content-Type '$got', want text/plain" ;; esac
    say "ok: fetch/$id.txt is served as $got"
    # A body large enough to be spooled by sos-server (sent to the members
    # with sendfile) and written with O_DIRECT by the chrooted blob-servers.
    head -c $((9 << 20)) /dev/urandom >"$WORK/large"
    got=$(curl -sS --max-time 60 -X POST --data-binary @"$WORK/large" \
        "http://127.0.0.1:$UPLOAD_PORT/upload") || fail "large upload failed: $got"
    large=$(sha1sum <"$WORK/large" | cut -d' ' -f1)
    case $got in *"\"$large\""*'"copies": 2'*) ;; *) fail "large upload: $got" ;; esac
    curl -fsS --max-time 60 "http://127.0.0.1:$DOWNLOAD_PORT/fetch/$large" -o "$WORK/fetched" \
        || fail "GET /fetch/$large failed"
    cmp -s "$WORK/fetched" "$WORK/large" || fail "the large fetch differs from its upload"
    say "ok: a 9 MiB upload and fetch through chrooted blob-servers"

    # The chrooted blob-server can no longer open anything outside its store,
    # so code it reaches only now (error paths, listings, ranges) would fail
    # there first: walk its API once.
    tour "$BLOB1_PORT" "$id"

    # 4. replicate, in its own root: once from /etc/sos.conf, once from
    #    -blob-server.  An object POSTed to blob-server 2 only gives it
    #    something to copy.
    printf 'only on blob-server 2\n' >"$WORK/only2"
    id2=$(sha1sum <"$WORK/only2" | cut -d' ' -f1)
    curl -fsS --max-time 10 -X POST --data-binary @"$WORK/only2" -H 'X-Mime-Type: text/plain' \
        "http://127.0.0.1:$BLOB2_PORT/blob/$id2" >/dev/null || fail "POST /blob/$id2 to blob-server 2 failed"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -I "http://127.0.0.1:$BLOB1_PORT/blob/$id2")
    [ "$code" = 404 ] || fail "HEAD /blob/$id2 on blob-server 1 gave $code before replicate, want 404"
    make_root replicate replicate
    printf '%s\n' '# written by packaging/smoke.sh' '[1]' \
        "-: http://127.0.0.1:$BLOB1_PORT" "-: http://127.0.0.1:$BLOB2_PORT" \
        >"$WORK/replicate/etc/sos.conf"
    say "run: chroot replicate /replicate --verbose   (servers from /etc/sos.conf)"
    chroot "$WORK/replicate" /replicate --verbose >"$WORK/logs/replicate.log" 2>&1 \
        || fail "replicate (from /etc/sos.conf) failed"
    sed 's/^/  replicate: /' "$WORK/logs/replicate.log" >&2
    say "run: chroot replicate /replicate -blob-server $BLOBS --verbose"
    chroot "$WORK/replicate" /replicate -blob-server "$BLOBS" --verbose \
        >"$WORK/logs/replicate-flag.log" 2>&1 || fail "replicate -blob-server failed"
    sed 's/^/  replicate: /' "$WORK/logs/replicate-flag.log" >&2
    for b in "$BLOB1_PORT" "$BLOB2_PORT"; do
        curl -fsS --max-time 10 "http://127.0.0.1:$b/blob/$id" -o "$WORK/blob-$b" \
            || fail "blob-server on port $b does not hold $id after replicate"
        cmp -s "$WORK/blob-$b" "$WORK/passwd" || fail "blob-server on port $b holds different bytes for $id"
    done
    curl -fsS --max-time 10 "http://127.0.0.1:$BLOB1_PORT/blob/$id2" -o "$WORK/copied" \
        || fail "replicate did not copy $id2 from blob-server 2 to blob-server 1"
    cmp -s "$WORK/copied" "$WORK/only2" || fail "blob-server 1 holds different bytes for $id2"
    say "ok: both blob-servers hold $id and $id2"

    # 5. Graceful shutdown.
    stop "$blob1" "blob-server 1"
    stop "$blob2" "blob-server 2"
    stop "$sos" "sos-server"
    PIDS=()
    if grep -l Traceback "$WORK"/logs/*.log >/dev/null 2>&1; then
        fail "a program logged a traceback: $(grep -l Traceback "$WORK"/logs/*.log | xargs -n1 basename | tr '\n' ' ')"
    fi
    say "PASS"
}

main "$@"
