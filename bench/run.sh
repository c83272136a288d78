#!/usr/bin/env bash
# `make bench`: SOS against nginx on this machine; appends to BENCHMARKS.md.
#
# Installs what the bench drives (nginx with WebDAV, wrk, curl) if missing,
# as root with apt-get, then runs bench/bench.py, which starts and stops every
# server itself.  Knobs (the list and their defaults: bench/bench.py's top):
# BENCH_ROWS, BENCH_DURATION, BENCH_RUNS, BENCH_IDS, BENCH_SEED,
# BENCH_CONNECTIONS, BENCH_THREADS, BENCH_BLOBS, BENCH_MISSING_RUNS,
# BENCH_REBALANCE_BLOBS, BENCH_CACHE, BENCH_OUT, BENCH_BLOB_ARGS, BENCH_SOS_ARGS,
# BENCH_PROFILE;
# PYTHON picks the interpreter that runs blob.py, sos.py and replicate.py.
#
#   make bench                                          # every row, < 15 min
#   BENCH_ROWS=blob_get_4k BENCH_DURATION=5 make bench  # one row, quickly
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

has_dav() { command -v nginx >/dev/null && [[ "$(nginx -V 2>&1)" == *--with-http_dav_module* ]]; }

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
has_dav || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bench: needs ${need[*]}: run as root, or apt-get install them" >&2
        exit 1
    fi
    echo "bench: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi
has_dav || { echo "bench: this nginx lacks the WebDAV module (nginx -V)" >&2; exit 1; }

# The interpreter itself, not a wrapper (pyenv shims cost ~0.1 s a start).
PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')
export PYTHON
exec "$PYTHON" bench/bench.py
