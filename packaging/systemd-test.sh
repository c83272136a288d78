#!/usr/bin/env bash
# The .deb, installed on Debian 12 booted with a real systemd, checked as an
# operator would use it.
#
#   sudo packaging/systemd-test.sh          # or: make systemd-test
#
# It runs `make deb`, then boots a Debian 12 root in a container
# (systemd-nspawn, its own network namespace: only its loopback, no port
# clash with the host), installs the package there and checks, one line each
# ("ok: ..." or "FAIL: ..."; the first failure ends the run, with the
# journal):
#   - one-disk host: blob-server.service and sos-server.service start; an
#     upload and a fetch through sos-server; blob-server serves chrooted in
#     its store as sos-blob with no capabilities; `kill -9` of the server is
#     restarted by systemd, without touching the store's ownership, and
#     every upload acknowledged before it is still there; the access log reaches the journal; stop is clean;
#   - several disks: two blob-server@ instances, each on its own "disk" (a
#     bind mount from /etc/fstab at /var/lib/sos/NAME), an upload lands on
#     both; replicate.timer starts replicate.service, which copies, writes its
#     summary to the journal and its --metrics-file to its state directory;
#   - `systemd-analyze security` of every unit, each within its budget
#     (SECURITY_BUDGETS below; the full list of open points goes to the log);
#   - `dpkg --purge sos` is clean and leaves /var/lib/sos.
#
# The root comes from `debootstrap --variant=minbase` (Debian's packages,
# about a minute) and is kept in $CACHE/base between runs; each run boots a
# fresh copy.  Delete $CACHE to start over.  Needs root, debootstrap and
# systemd-container (installed if missing), and network to a Debian mirror
# the first time.
#
#   CACHE=/var/cache/sos-systemd-test  MIRROR=http://deb.debian.org/debian
#   KEEP=1     keep the booted copy ($CACHE/run) and the logs ($CACHE/logs)
#   NODEB=1    use the newest dist/sos_*_amd64.deb as it is (no `make deb`)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CACHE:-/var/cache/sos-systemd-test}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BOOT_TIMEOUT=${BOOT_TIMEOUT:-90}      # seconds until the container's systemd is up
WAIT_TIMEOUT=${WAIT_TIMEOUT:-30}      # seconds for a unit or a port
RESTART_TIMEOUT=${RESTART_TIMEOUT:-60} # seconds for a restart after kill -9 (9-18 s seen on a loaded machine)
STOP_BUDGET=${STOP_BUDGET:-30}        # seconds a clean stop may take (the units allow 45; 10 s seen loaded)
# Highest exposure `systemd-analyze security` may give each unit (0 = best,
# 10 = unprotected): what the units score today, so that a change which
# loosens one fails here.  Why each remaining point is open: README.md,
# "What systemd-analyze security says".
SECURITY_BUDGETS=(blob-server.service=2.7 blob-server@disk1.service=2.7
                  sos-server.service=1.2 replicate.service=1.1)
INCLUDE=systemd,systemd-sysv,dbus,curl,procps

BASE=$CACHE/base
RUN=$CACHE/run
LOGS=$CACHE/logs
SHARE=/srv/sos-test                   # in the container; /tmp there is a tmpfs
NSPAWN_PID=
INIT=

# The check lines go to fd 3, the script's stdout, also from inside $(...).
exec 3>&1
say() { echo "systemd-test: $*" >&2; }
ok() { echo "ok: $*" >&3; }
fail() {
    echo "FAIL: $*" >&3
    if [ -n "$INIT" ]; then
        say "last journal lines of the sos units:"
        inside journalctl --no-pager -n 60 -u blob-server -u 'blob-server@*' \
            -u sos-server -u replicate -u replicate.timer >&2 || true
    fi
    exit 1
}

# Run a command in the container, with a plain environment.
inside() {
    nsenter -t "$INIT" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

cleanup() {
    local rc=$? deadline
    trap - EXIT INT TERM
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # SIGTERM to systemd-nspawn: an orderly shutdown of the container.
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$NSPAWN_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    if [ -z "${KEEP:-}" ] && [ -d "$RUN" ]; then
        if grep -q " $RUN[/ ]" /proc/mounts; then
            say "left $RUN in place: something is still mounted below it"
        else
            rm -rf "$RUN"
        fi
    fi
    [ -n "${KEEP:-}" ] && say "kept $RUN and $LOGS"
    exit $rc
}

# --- The host's side --------------------------------------------------------

ensure_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v nsenter >/dev/null || missing+=(util-linux)
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# The debootstrapped root, made once: $BASE exists only when complete.
ensure_base() {
    local start=$SECONDS
    if [ -f "$BASE/.sos-base" ] && [ "$(cat "$BASE/.sos-base")" = "$SUITE $INCLUDE" ]; then
        say "using the cached root $BASE"
        return 0
    fi
    rm -rf "$BASE" "$BASE.tmp"
    mkdir -p "$CACHE"
    say "debootstrap $SUITE into $BASE (about a minute)"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$BASE.tmp" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; fail "debootstrap failed"; }
    echo "$SUITE $INCLUDE" >"$BASE.tmp/.sos-base"
    mv "$BASE.tmp" "$BASE"
    ok "debootstrap of Debian 12 ($SUITE, minbase + systemd) took $((SECONDS - start)) s"
}

boot() {
    local deb=$1 start=$SECONDS deadline p state
    rm -rf "$RUN" "$LOGS"
    mkdir -p "$LOGS"
    cp -a "$BASE" "$RUN"
    mkdir -p "$RUN$SHARE"
    # debootstrap writes no /etc/hosts (the installer does), and without it
    # "localhost" is looked up in DNS, of which the container has none.
    printf '%s\n' '127.0.0.1 localhost' '::1 localhost ip6-localhost ip6-loopback' >"$RUN/etc/hosts"
    cp "$deb" "$RUN$SHARE/sos.deb"
    # --register=no: the host need not run systemd (machined); --keep-unit
    # likewise.  --private-network: the container has its own loopback only.
    systemd-nspawn --register=no --keep-unit --private-network --quiet \
        --console=read-only --machine=sos-test -D "$RUN" -b >"$LOGS/console.log" 2>&1 &
    NSPAWN_PID=$!
    deadline=$((SECONDS + BOOT_TIMEOUT))
    # The container's init: nspawn's child whose pid is 1 in its namespace.
    while [ -z "$INIT" ]; do
        kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$LOGS/console.log" >&2; fail "systemd-nspawn exited"; }
        [ $SECONDS -lt $deadline ] || fail "no container init within ${BOOT_TIMEOUT}s"
        for p in $(pgrep -P "$NSPAWN_PID" || true); do
            grep -qP '^NSpid:.*\t1$' "/proc/$p/status" 2>/dev/null && INIT=$p
        done
        [ -n "$INIT" ] || sleep 0.2
    done
    # Until its bus is up, systemctl fails at once ("Failed to connect to
    # bus"), printing no state: try again.
    state=
    while [ -z "$state" ] && [ $SECONDS -lt $deadline ]; do
        state=$(timeout $((deadline - SECONDS > 0 ? deadline - SECONDS : 1)) \
            nsenter -t "$INIT" -a systemctl is-system-running --wait 2>/dev/null || true)
        [ -n "$state" ] || sleep 0.2
    done
    case $state in
        running) ;;
        *) inside systemctl --failed --no-pager >&2 || true
           fail "the container's systemd is '$state' after boot, want running" ;;
    esac
    ok "Debian 12 booted under systemd $(inside systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p') in $((SECONDS - start)) s (copy of the root included)"
}

# --- Inside the container ---------------------------------------------------

# Pids of a unit's processes.
unit_pids() {
    local cg f
    cg=$(inside systemctl show -P ControlGroup "$1")
    [ -n "$cg" ] || return 0
    for f in unified systemd ""; do
        if inside test -f "/sys/fs/cgroup${f:+/$f}$cg/cgroup.procs"; then
            inside cat "/sys/fs/cgroup${f:+/$f}$cg/cgroup.procs"
            return 0
        fi
    done
}

# Pids of a unit's processes whose root directory is DIR (the chrooted server).
chrooted_pids() {
    local p
    for p in $(unit_pids "$1"); do
        [ "$(inside readlink "/proc/$p/root" 2>/dev/null)" = "$2" ] && echo "$p"
    done
    return 0
}

# wait_until SECONDS WHAT COMMAND...: poll until COMMAND succeeds.
wait_until() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "$what: not within ${limit}s"
        sleep 0.2
    done
}

# answers URL: something answers there with any HTTP status.
answers() {
    local code
    code=$(inside curl -s --max-time 2 -o /dev/null -w '%{http_code}' "$1" || true)
    [ -n "$code" ] && [ "$code" != 000 ]
}

has_chrooted() { [ -n "$(chrooted_pids "$1" "$2")" ]; }

# upload FILE (a path in the container): the id sos-server acknowledged.
upload() {
    local reply
    reply=$(inside curl -sS --max-time 20 -X POST --data-binary @"$1" http://127.0.0.1:9991/upload) \
        || fail "upload of $1 failed: $reply"
    printf '%s' "$reply" | sed -n 's/.*"id": *"\([0-9a-f]\{40\}\)".*/\1/p'
    printf '%s' "$reply" >"$LOGS/last-upload"
}

# start_units UNIT...: enable --now, each must become active.
start_units() {
    local u
    inside systemctl enable --now "$@" >"$LOGS/enable.log" 2>&1 || fail "systemctl enable --now $* failed"
    for u in "$@"; do
        wait_until "$WAIT_TIMEOUT" "$u active" inside systemctl is-active --quiet "$u"
    done
}

# server_is_confined UNIT STORE: the processes serving from STORE run as
# sos-blob with no effective capabilities.
server_is_confined() {
    local unit=$1 store=$2 pids p uid cap seen=()
    wait_until "$WAIT_TIMEOUT" "$unit chrooted into $store" has_chrooted "$unit" "$store"
    pids=$(chrooted_pids "$unit" "$store")
    for p in $pids; do
        uid=$(inside awk '/^Uid:/ { print $3 }' "/proc/$p/status")
        cap=$(inside awk '/^CapEff:/ { print $2 }' "/proc/$p/status")
        [ "$uid" = "$(inside id -u sos-blob)" ] || fail "$unit: pid $p serves from $store as uid $uid, not sos-blob"
        [ "$cap" = 0000000000000000 ] || fail "$unit: pid $p in $store has CapEff $cap, want 0"
        seen+=("$p")
    done
    ok "$unit serves chrooted in $store as sos-blob, CapEff 0 (pids ${seen[*]})"
}

# stop_clean UNIT...: each stops within STOP_BUDGET, its main process exiting
# 0 (no SIGKILL needed, nothing left in its control group).
stop_clean() {
    local u start=$SECONDS since result status left
    since=$(date +%s)
    inside systemctl stop "$@" || fail "systemctl stop $* failed"
    for u in "$@"; do
        result=$(inside systemctl show -P Result "$u")
        status=$(inside systemctl show -P ExecMainStatus "$u")
        left=$(unit_pids "$u" | wc -l)
        [ "$result" = success ] && [ "$status" = 0 ] && [ "$left" = 0 ] \
            || fail "stop of $u: Result=$result, ExecMainStatus=$status, $left processes left"
    done
    [ $((SECONDS - start)) -le "$STOP_BUDGET" ] || fail "stopping $* took $((SECONDS - start)) s"
    if inside journalctl -q --no-pager --since "@$since" -u blob-server -u 'blob-server@*' -u sos-server \
            | grep -E 'SIGKILL|Killing process|Traceback|status=[1-9]'; then
        fail "the journal of the stopped units shows a kill, a traceback or a failure (above)"
    fi
    ok "stop of $* is clean in $((SECONDS - start)) s (exit 0, nothing killed, no traceback)"
}

# --- The checks -------------------------------------------------------------

one_disk_host() {
    local id sum got pid before nrestart main_before start acked bad n
    inside dpkg -i "$SHARE/sos.deb" >"$LOGS/dpkg-i.log" 2>&1 || { cat "$LOGS/dpkg-i.log" >&2; fail "dpkg -i failed"; }
    inside getent passwd sos-blob >/dev/null || fail "the package made no sos-blob user"
    ok "dpkg -i $(inside dpkg-query -W -f='${Package} ${Version}' sos): installed, user sos-blob made, $(inside readlink -f /usr/bin/blob-server) linked as blob-server, sos-server, replicate"

    inside sh -c 'printf "%s\n" "[1]" "-: http://127.0.0.1:3001" >/etc/sos.conf'
    start_units blob-server.service sos-server.service
    wait_until "$WAIT_TIMEOUT" "blob-server on :3001" answers http://127.0.0.1:3001/alive
    wait_until "$WAIT_TIMEOUT" "sos-server's admin port :9993" answers http://127.0.0.1:9993/health
    ok "blob-server.service and sos-server.service start and answer (one-disk host)"

    # The seed's Quick Start, through sos-server.
    id=$(upload /etc/os-release)
    sum=$(inside sha1sum /etc/os-release | cut -c1-40)
    [ "$id" = "$sum" ] || fail "upload answered id '$id', want the SHA-1 $sum: $(cat "$LOGS/last-upload")"
    got=$(inside sh -c "curl -fsS --max-time 10 http://127.0.0.1:9992/fetch/$id | sha1sum | cut -c1-40") \
        || fail "GET /fetch/$id failed"
    [ "$got" = "$sum" ] || fail "fetch/$id returned other bytes"
    ok "curl upload to :9991 and fetch from :9992 through sos-server (id $id)"

    server_is_confined blob-server.service /var/lib/sos/blob

    # kill -9: uploads keep coming (a loop in the container, each upload
    # acknowledged by sos-server recorded); the server is killed in the
    # middle; systemd must restart it and every acknowledged object must
    # still be there, byte for byte.
    inside sh -c "cat >$SHARE/uploader" <<'UPLOADER'
#!/bin/sh
# Upload small distinct bodies until $1/stop exists; log each acknowledged id.
dir=$1 i=0
while [ ! -e "$dir/stop" ]; do
    i=$((i + 1))
    printf 'acked upload %d of run %s\n' "$i" "$$" >"$dir/body"
    code=$(curl -s -o "$dir/reply" -w '%{http_code}' --max-time 10 -X POST \
        --data-binary @"$dir/body" http://127.0.0.1:9991/upload)
    if [ "$code" = 200 ]; then
        sha1sum <"$dir/body" | cut -c1-40 >>"$dir/acked"
    else
        echo "$code" >>"$dir/refused"
    fi
done
UPLOADER
    inside sh -c "mkdir -p $SHARE/kill && rm -f $SHARE/kill/*"
    # A file of another owner in the store: a start that chowns the store
    # (systemd's StateDirectory= did, recursively, at every start) shows.
    inside sh -c 'mkdir /var/lib/sos/blob/.ownership-probe && touch /var/lib/sos/blob/.ownership-probe/f &&
        chown 4242:4242 /var/lib/sos/blob/.ownership-probe/f'
    main_before=$(inside systemctl show -P MainPID blob-server.service)
    before=$(inside systemctl show -P NRestarts blob-server.service)
    inside sh -c "setsid sh $SHARE/uploader $SHARE/kill >/dev/null 2>&1 &"
    wait_until 10 "first acknowledged uploads" inside sh -c "[ \$(wc -l <$SHARE/kill/acked) -ge 20 ]"
    pid=$(chrooted_pids blob-server.service /var/lib/sos/blob | sort -n | sed -n 1p)
    [ -n "$pid" ] || fail "no blob-server process to kill"
    start=$SECONDS
    inside kill -KILL "$pid"
    wait_until "$RESTART_TIMEOUT" "blob-server restarted after kill -9" inside sh -c \
        "[ \"\$(systemctl show -P NRestarts blob-server.service)\" -gt $before ] && systemctl is-active --quiet blob-server.service"
    wait_until "$RESTART_TIMEOUT" "blob-server answering after its restart" answers http://127.0.0.1:3001/alive
    nrestart=$(inside systemctl show -P NRestarts blob-server.service)
    # Some more uploads after the restart, then stop the loop.
    n=$(inside sh -c "wc -l <$SHARE/kill/acked")
    wait_until 20 "uploads acknowledged after the restart" inside sh -c "[ \$(wc -l <$SHARE/kill/acked) -ge $((n + 20)) ]"
    inside touch "$SHARE/kill/stop"
    wait_until 15 "the upload loop to end" inside sh -c "! pgrep -f 'sh $SHARE/[u]ploader'"
    acked=$(inside sh -c "wc -l <$SHARE/kill/acked")
    bad=$(inside sh -c "for id in \$(cat $SHARE/kill/acked); do
            got=\$(curl -fsS --max-time 10 http://127.0.0.1:9992/fetch/\$id | sha1sum | cut -c1-40)
            [ \"\$got\" = \"\$id\" ] || echo \$id
        done | wc -l")
    [ "$bad" = 0 ] || fail "kill -9: $bad of $acked acknowledged uploads lost or changed"
    [ "$(inside systemctl show -P MainPID blob-server.service)" != "$main_before" ] \
        || fail "kill -9: blob-server has the same main pid as before"
    [ "$(inside stat -c %u /var/lib/sos/blob/.ownership-probe/f)" = 4242 ] \
        || fail "the restart chowned the store (a file of uid 4242 in it is now uid $(inside stat -c %u /var/lib/sos/blob/.ownership-probe/f))"
    inside rm -rf /var/lib/sos/blob/.ownership-probe
    ok "kill -9 of blob-server (pid $pid): restarted by systemd (NRestarts $before -> $nrestart, serving again in $((SECONDS - start)) s or less, the store's ownership untouched), all $acked acknowledged uploads intact ($(inside sh -c "cat $SHARE/kill/refused 2>/dev/null | wc -l") refused while it was down)"

    # The access log: one line per request, to the journal.
    n=$(inside journalctl -q --no-pager -u sos-server.service | grep -c '"POST /upload HTTP/1.1" 200' || true)
    [ "$n" -gt 0 ] || fail "no 'POST /upload ... 200' access-log line of sos-server in the journal"
    got=$(inside journalctl -q --no-pager -u blob-server.service | grep -c '"POST /blob/[0-9a-f]* HTTP/1.1" 200' || true)
    [ "$got" -gt 0 ] || fail "no 'POST /blob/...' access-log line of blob-server in the journal"
    ok "the access logs reach the journal (sos-server: $n upload lines, blob-server: $got POST /blob lines)"

    BLOB_COUNT=$(inside find /var/lib/sos/blob -type f | wc -l)
    stop_clean sos-server.service blob-server.service
    inside systemctl disable --quiet blob-server.service
}

several_disks() {
    local d id sum got n
    # Names, not addresses, in /etc/sos.conf: sos-server and replicate
    # resolve them inside their sandboxes.
    # Two "disks", each mounted (from /etc/fstab, as on a real host) where
    # its instance keeps its store.
    inside sh -c 'mkdir -p /srv/disk1 /srv/disk2
        printf "%s\n" "/srv/disk1 /var/lib/sos/disk1 none bind 0 0" \
            "/srv/disk2 /var/lib/sos/disk2 none bind 0 0" >>/etc/fstab
        echo BLOB_SERVER_OPTS=\"-port 3002\" >/etc/default/blob-server@disk1
        echo BLOB_SERVER_OPTS=\"-port 3003\" >/etc/default/blob-server@disk2
        printf "%s\n" "[1]" "-: http://localhost:3002" "-: http://localhost:3003" >/etc/sos.conf
        systemctl daemon-reload'
    start_units blob-server@disk1.service blob-server@disk2.service sos-server.service
    wait_until "$WAIT_TIMEOUT" "blob-server@disk1 on :3002" answers http://127.0.0.1:3002/alive
    wait_until "$WAIT_TIMEOUT" "blob-server@disk2 on :3003" answers http://127.0.0.1:3003/alive
    wait_until "$WAIT_TIMEOUT" "sos-server" answers http://127.0.0.1:9993/health
    for d in disk1 disk2; do
        inside findmnt -n /var/lib/sos/$d >/dev/null || fail "blob-server@$d started without its disk mounted at /var/lib/sos/$d"
    done
    ok "blob-server@disk1 and @disk2 start on :3002 and :3003, each after its disk's mount (RequiresMountsFor)"
    server_is_confined blob-server@disk1.service /var/lib/sos/disk1
    server_is_confined blob-server@disk2.service /var/lib/sos/disk2

    inside sh -c "head -c 300000 /dev/urandom >$SHARE/two"
    id=$(upload "$SHARE/two")
    sum=$(inside sha1sum "$SHARE/two" | cut -c1-40)
    [ "$id" = "$sum" ] || fail "upload to two instances: $(cat "$LOGS/last-upload")"
    grep -q '"copies": 2' "$LOGS/last-upload" || fail "upload did not report 2 copies: $(cat "$LOGS/last-upload")"
    for d in 3002 3003; do
        got=$(inside sh -c "curl -fsS --max-time 10 http://127.0.0.1:$d/blob/$id | sha1sum | cut -c1-40")
        [ "$got" = "$sum" ] || fail "the upload is not on the blob-server at :$d"
    done
    n=$(inside sh -c "find /srv/disk1 /srv/disk2 -type f | wc -l")
    [ "$n" -ge 2 ] || fail "no files on the disks /srv/disk1, /srv/disk2"
    ok "an upload through sos-server lands on both instances, on their disks ($id)"

    # replicate.timer -> replicate.service: an object only on disk2 must
    # reach disk1.  The timer fires hourly; a drop-in makes it fire now.
    inside sh -c "printf 'only on disk2\n' >$SHARE/only2"
    id=$(inside sha1sum "$SHARE/only2" | cut -c1-40)
    inside curl -fsS --max-time 10 -o /dev/null -X POST --data-binary @"$SHARE/only2" \
        "http://127.0.0.1:3003/blob/$id" || fail "POST /blob/$id to :3003 failed"
    inside mkdir -p /run/systemd/system/replicate.timer.d
    inside sh -c 'printf "%s\n" "[Timer]" "OnActiveSec=1s" "RandomizedDelaySec=0" \
        >/run/systemd/system/replicate.timer.d/now.conf'
    # What replicate keeps between runs, its metrics file, goes in its
    # state directory.
    inside sh -c 'echo "REPLICATE_OPTS=\"--metrics-file /var/lib/sos/replicate/metrics.prom\"" >/etc/default/replicate'
    inside systemctl daemon-reload
    inside systemctl enable --quiet replicate.timer
    inside systemctl restart replicate.timer
    wait_until 60 "replicate.service run by replicate.timer" inside sh -c \
        '[ "$(systemctl show -P ExecMainExitTimestampMonotonic replicate.service)" -gt 0 ] && ! systemctl is-active --quiet replicate.service'
    [ "$(inside systemctl show -P Result replicate.service)" = success ] || fail "replicate.service failed: Result=$(inside systemctl show -P Result replicate.service)"
    inside curl -fsS --max-time 10 -o /dev/null "http://127.0.0.1:3002/blob/$id" || fail "replicate did not copy $id to disk1"
    inside journalctl -q --no-pager -u replicate.service | grep -q 'examined' || fail "no replicate summary in the journal"
    inside grep -q '^sos_replicate_last_success_timestamp_seconds{group="1"}' /var/lib/sos/replicate/metrics.prom \
        || fail "no metrics from replicate in /var/lib/sos/replicate/metrics.prom"
    ok "replicate.timer started replicate.service: copied $id to disk1, its summary in the journal, its --metrics-file in /var/lib/sos/replicate; next: $(inside systemctl show -P NextElapseUSecRealtime replicate.timer)"
    inside rm -rf /run/systemd/system/replicate.timer.d
    inside systemctl daemon-reload
}

security() {
    local entry unit budget score over=0
    for entry in "${SECURITY_BUDGETS[@]}"; do
        unit=${entry%=*} budget=${entry#*=}
        inside systemd-analyze security --no-pager "$unit" >"$LOGS/security-$unit.txt" 2>&1 \
            || true    # exits non-zero when the score is above its own threshold
        score=$(sed -n 's/.*Overall exposure level for [^ ]*: \([0-9.]*\).*/\1/p' "$LOGS/security-$unit.txt")
        [ -n "$score" ] || { cat "$LOGS/security-$unit.txt" >&2; fail "systemd-analyze security $unit gave no score"; }
        say "systemd-analyze security $unit: the points still open:"
        grep '✗' "$LOGS/security-$unit.txt" | sed 's/^/    /' >&2 || true
        if awk -v s="$score" -v b="$budget" 'BEGIN { exit !(s <= b) }'; then
            ok "systemd-analyze security $unit: exposure $score (budget $budget)"
        else
            echo "FAIL: systemd-analyze security $unit: exposure $score, over its budget $budget" >&3
            over=1
        fi
    done
    [ $over = 0 ] || fail "a unit's exposure rose (the open points are listed above)"
}

purge() {
    local left
    stop_clean sos-server.service blob-server@disk1.service blob-server@disk2.service
    inside sh -c "echo 'keep me' >/var/lib/sos/blob/operator-note"
    inside dpkg --purge sos >"$LOGS/dpkg-purge.log" 2>&1 || { cat "$LOGS/dpkg-purge.log" >&2; fail "dpkg --purge sos failed"; }
    if grep -iE 'warning|error|cannot|failed' "$LOGS/dpkg-purge.log" >&2; then
        fail "dpkg --purge sos complained (above)"
    fi
    case $(inside dpkg-query -W -f='${Status}' sos 2>/dev/null || true) in
        *"ok installed"*|*config-files*) fail "dpkg still lists sos after the purge" ;;
    esac
    for left in /usr/bin/sos /usr/bin/blob-server /usr/bin/sos-server /usr/bin/replicate \
            /lib/systemd/system/blob-server.service /lib/systemd/system/blob-server@.service \
            /lib/systemd/system/sos-server.service /lib/systemd/system/replicate.timer; do
        inside test ! -e "$left" || fail "$left is still there after the purge"
    done
    left=$(inside find /etc/systemd/system -xtype l)
    [ -z "$left" ] || fail "dangling links after the purge: $left"
    inside systemctl list-units --all --no-legend 'blob-server*' 'sos-server*' 'replicate*' >"$LOGS/units-after-purge"
    [ ! -s "$LOGS/units-after-purge" ] || fail "units still loaded after the purge: $(cat "$LOGS/units-after-purge")"
    [ "$(inside find /var/lib/sos/blob -type f | wc -l)" -ge "$BLOB_COUNT" ] \
        || fail "the purge removed data from /var/lib/sos/blob"
    inside test -f /var/lib/sos/blob/operator-note || fail "the purge removed /var/lib/sos/blob/operator-note"
    inside test -f /var/lib/sos/replicate/metrics.prom || fail "the purge removed /var/lib/sos/replicate/metrics.prom"
    n=$(inside sh -c 'find /srv/disk1 /srv/disk2 -type f | wc -l')
    [ "$n" -ge 2 ] || fail "the purge removed data from the disks"
    ok "dpkg --purge sos: clean (no files, units or links left), /var/lib/sos kept ($(inside find /var/lib/sos/blob -type f | wc -l) files in blob/, the disks' $n, replicate/)"
}

main() {
    local deb start=$SECONDS
    [ "$(id -u)" -eq 0 ] || { echo "systemd-test: must run as root (debootstrap, systemd-nspawn)" >&2; exit 1; }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ensure_tools
    mkdir -p "$CACHE"
    if [ -z "${NODEB:-}" ]; then
        make -s -C "$ROOT" deb >"$CACHE/make-deb.log" 2>&1 || { tail -n 30 "$CACHE/make-deb.log" >&2; fail "make deb failed"; }
    fi
    deb=$(ls -t "$ROOT"/dist/sos_*_amd64.deb 2>/dev/null | sed -n 1p)
    [ -n "$deb" ] || fail "no dist/sos_*_amd64.deb: run make deb"
    ok "package ${deb##*/} ($(du -k "$deb" | cut -f1) KiB)"
    ensure_base
    boot "$deb"
    one_disk_host
    several_disks
    security
    purge
    say "PASS in $((SECONDS - start)) s"
}

main "$@"
