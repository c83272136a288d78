#!/usr/bin/env bash
# Build the SOS programs as one fully static multi-call executable.
#
#   packaging/build.sh                    # dist/sos, and dist/{blob-server,sos-server,replicate}
#                                         # as hard links to it
#   packaging/build.sh NAME=SCRIPT ...    # other programs, each on its own, e.g. the three
#                                         # separately: blob-server=blob.py sos-server=sos.py
#                                         # replicate=replicate.py
#
# One executable (packaging/multicall.py), because each static program
# carries a whole Python runtime: three binaries were 9.9-10.2 MiB each, 30 MiB
# together (a 24 MiB .deb), for nearly the same content; the one is 10.3 MiB.
# `sos` runs the program it is called as (the links), or the one named by its
# first argument (`sos blob-server -store data`).  The links are hard links
# (see main below).  PyInstaller follows the imports from multicall.py into
# the programs and whatever modules they import, so no list of modules is
# kept here.
#
# How: PyInstaller --onefile turns each script plus the Python runtime into one
# dynamically linked executable, then staticx wraps that with its own libc and
# loader, so the result runs in an empty chroot (`ldd` says "not a dynamic
# executable").
#
# Why Debian's /usr/bin/python3 and not pyenv's: staticx refuses executables
# whose libraries carry a RUNPATH, and pyenv's libpython has one.  The build
# venv (.venv-build/, made on first use) therefore comes from /usr/bin/python3.
#
# Why `staticx --no-compress`: staticx compresses with xz, which cost ~200 ms
# of decompression at every start (430 ms instead of 230 ms for --help);
# PyInstaller's own archive is already zlib-compressed, so xz saved only
# ~2 MB.  Budgets: MAX_SIZE and MAX_HELP_MS below.
#
# At run time each binary needs /proc (staticx reads /proc/self/exe) and a
# writable, exec-allowed $TMPDIR (default /tmp): it unpacks its libc and then
# the Python runtime there at every start, and removes them on exit.  It runs
# as three processes (staticx launcher -> PyInstaller launcher -> Python);
# signals sent to the first are passed down.  After blob-server chroots,
# nothing new can be imported: modules and codecs live in the unpacked
# directory and the executable, both outside the chroot.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

BUILD_PYTHON=${BUILD_PYTHON:-/usr/bin/python3}
BUILD_VENV=${BUILD_VENV:-$ROOT/.venv-build}
PYINSTALLER_VERSION=${PYINSTALLER_VERSION:-6.22.3}
STATICX_VERSION=${STATICX_VERSION:-0.14.2}
MAX_SIZE=${MAX_SIZE:-$((15 * 1024 * 1024))}     # bytes, per binary
MAX_HELP_MS=${MAX_HELP_MS:-500}                 # --help wall time, warn only
DIST=${DIST:-$ROOT/dist}
BUILD=${BUILD:-$ROOT/build}

# Standard-library parts the programs never use.  Leaving them out makes the
# binaries smaller and quicker to unpack.  Do not add anything the programs
# import (directly or at first use after chroot): email, http, json, hashlib,
# ssl, ctypes, mimetypes, urllib, logging, socketserver, encodings stay in.
EXCLUDES=(
    tkinter _tkinter turtle turtledemo idlelib
    unittest doctest pydoc pydoc_data pdb lib2to3 distutils ensurepip venv
    test sqlite3 _sqlite3 curses _curses readline dbm xmlrpc
    decimal _decimal _pydecimal fractions statistics
    bz2 _bz2 lzma _lzma tarfile
    # East-Asian multibyte codecs (~1 MB); utf-8, latin-1, ascii and idna
    # are unaffected.
    _multibytecodec _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp
    _codecs_kr _codecs_tw
)

die() { echo "build.sh: ERROR: $*" >&2; exit 1; }
say() { echo "build.sh: $*" >&2; }

# --- Tools ---------------------------------------------------------------

# What the build really needs from Debian:
#   patchelf, binutils (objcopy, strip)  staticx
#   libc-bin (ldd)                       PyInstaller and staticx (always present)
#   python3-venv                         the build venv
#   libpython3.X                         PyInstaller bundles the shared libpython
# No compiler, python3-dev or scons: both tools ship prebuilt bootloaders.
ensure_apt_packages() {
    local pyver missing=() p
    pyver=$("$BUILD_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
        || die "$BUILD_PYTHON is not a working Python (apt-get install python3)"
    for p in patchelf binutils "python$pyver-venv" "libpython$pyver"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"ok installed"* ]] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Without package lists (a fresh machine) the first try fails: update, retry.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
}

ensure_venv() {
    local want="pyinstaller==$PYINSTALLER_VERSION staticx==$STATICX_VERSION"
    if [ ! -x "$BUILD_VENV/bin/python" ]; then
        say "creating $BUILD_VENV from $BUILD_PYTHON"
        "$BUILD_PYTHON" -m venv "$BUILD_VENV"
    fi
    # A stamp file, so an up-to-date venv costs nothing.
    if [ "$(cat "$BUILD_VENV/.sos-build-reqs" 2>/dev/null)" != "$want" ]; then
        say "installing $want"
        # shellcheck disable=SC2086
        "$BUILD_VENV/bin/pip" install -q --disable-pip-version-check $want 2> >(grep -v "is ignored: it is neither" >&2)
        echo "$want" > "$BUILD_VENV/.sos-build-reqs"
    fi
}

# --- Build ---------------------------------------------------------------

build_one() {
    local name=$1 script=$2 args=() m libgcc
    [ -f "$script" ] || die "$script not found (needed for $name)"
    for m in "${EXCLUDES[@]}"; do args+=(--exclude-module "$m"); done
    # glibc dlopens libgcc_s.so.1 when a thread is cancelled or exits through
    # pthread_exit (as Python's daemon threads do at interpreter exit).  In a
    # chroot it cannot be found then, so blob-server preloads it with
    # ctypes.CDLL("libgcc_s.so.1") before chrooting.  staticx does not carry
    # it, and PyInstaller only does when it spots that literal call: bundle it
    # explicitly, so the preload always finds it in the unpacked directory.
    # awk reads to the end: a reader that quits early would kill ldconfig
    # with SIGPIPE, and under pipefail the whole build (exit 141, seen in CI).
    libgcc=$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ && !found { print $NF; found = 1 }')
    [ -n "$libgcc" ] || die "libgcc_s.so.1 not found (apt-get install libgcc-s1)"
    args+=(--add-binary "$libgcc:.")
    say "$name: pyinstaller $script"
    # PYINSTALLER_ZLIB_COMPRESSION_LEVEL: archive compression (9 = default).
    "$BUILD_VENV/bin/pyinstaller" --onefile --name "$name" --paths "$ROOT" \
        --distpath "$BUILD/pyinstaller" --workpath "$BUILD/work" --specpath "$BUILD/spec" \
        --noconfirm --clean --log-level WARN --strip \
        "${args[@]}" "$script"
    say "$name: staticx"
    mkdir -p "$DIST"
    "$BUILD_VENV/bin/staticx" --no-compress "$BUILD/pyinstaller/$name" "$DIST/$name.tmp"
    chmod 0755 "$DIST/$name.tmp"    # staticx makes it 0700
    mv -f "$DIST/$name.tmp" "$DIST/$name"
}

check_one() {
    local name=$1 bin="$DIST/$1" size ms out
    out=$(ldd "$bin" 2>&1 || true)
    case $out in *"not a dynamic executable"*) ;; *) die "$bin is not static: $out" ;; esac
    size=$(stat -L -c %s "$bin")
    [ "$size" -le "$MAX_SIZE" ] || die "$bin is $size bytes, over the $MAX_SIZE budget"
    "$bin" --version >/dev/null || die "$bin --version failed"
    # Best of three, so one cold cache does not decide it.
    ms=$(for _ in 1 2 3; do
            s=$(date +%s%N); "$bin" --help >/dev/null; e=$(date +%s%N)
            echo $(((e - s) / 1000000))
         done | sort -n | sed -n 1p)
    [ "$ms" -le "$MAX_HELP_MS" ] || say "WARNING: $name --help took $ms ms (budget $MAX_HELP_MS ms)"
    printf '%-14s %6.1f MB  --help %4d ms  %s\n' "$name" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$ms" "$("$bin" --version 2>&1)"
}

# The programs the multi-call binary runs; dist/NAME is a link to dist/sos.
PROGRAMS=(blob-server sos-server replicate)

main() {
    local targets=("$@") t start links=() p
    if [ ${#targets[@]} -eq 0 ]; then
        targets=(sos=packaging/multicall.py)
        links=("${PROGRAMS[@]}")
    fi
    start=$(date +%s)
    ensure_apt_packages
    ensure_venv
    for t in "${targets[@]}"; do
        [[ $t == *=* ]] || die "expected NAME=SCRIPT, got '$t'"
        build_one "${t%%=*}" "${t#*=}"
    done
    # Hard links, not symbolic ones: the program is chosen by the name it
    # is run as, and through staticx that name is the executable's path as
    # /proc/self/exe gives it, where a symbolic link is already resolved (see
    # packaging/multicall.py).  A copy (`cp dist/blob-server`) works too.
    for p in "${links[@]}"; do
        ln -f "$DIST/sos" "$DIST/$p.tmp"
        mv -Tf "$DIST/$p.tmp" "$DIST/$p"
    done
    for t in "${targets[@]}"; do check_one "${t%%=*}"; done
    for p in "${links[@]}"; do check_one "$p"; done
    say "built ${#targets[@]} binaries in $(($(date +%s) - start)) s"
}

main "$@"
