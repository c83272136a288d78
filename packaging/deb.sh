#!/usr/bin/env bash
# `make deb`: dist/sos_<version>_amd64.deb from the static binaries in dist/.
#
#   packaging/deb.sh VERSION
#
# The package holds /usr/bin/sos (the static multi-call binary) with
# /usr/bin/{blob-server,sos-server,replicate} as links to it, the systemd
# units (enabled by nobody: the admin writes /etc/sos.conf first), the
# sos-blob system user (sysusers.d) and /usr/share/doc/sos/sos.conf.example.
# The binary is static, so it depends on nothing.
#
# Data is never deleted by the package: remove and purge leave /var/lib/sos
# (stores, replicate's state) and the sos-blob user.  Purge removes what
# `systemctl enable` made for its units.  packaging/systemd-test.sh checks it.
#
# Built from dist/ as `make dist` leaves it: dist/sos and the three links.
# Three separate binaries there (packaging/build.sh NAME=SCRIPT...) are
# packaged as they are.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VERSION=${1:?usage: packaging/deb.sh VERSION}
DIST=${DIST:-$ROOT/dist}
PKG=$ROOT/build/deb/sos
DEB=$DIST/sos_${VERSION}_amd64.deb

die() { echo "deb.sh: ERROR: $*" >&2; exit 1; }
PROGRAMS=(blob-server sos-server replicate)
UNITS=(blob-server.service blob-server@.service sos-server.service
       replicate.service replicate.timer)
for b in "${PROGRAMS[@]}"; do
    [ -x "$DIST/$b" ] || die "$DIST/$b missing: run 'make dist' first"
done
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"

rm -rf "$PKG"
install -d "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/lib/systemd/system" \
    "$PKG/usr/lib/sysusers.d" "$PKG/usr/lib/tmpfiles.d" "$PKG/usr/share/doc/sos"
# Hard links, as in dist/: through the static build a program knows only
# the path of the file it was run from, with symbolic links resolved.
for b in "${PROGRAMS[@]}"; do
    if [ -e "$DIST/sos" ] && [ "$DIST/$b" -ef "$DIST/sos" ]; then
        [ -e "$PKG/usr/bin/sos" ] || install -m 0755 "$DIST/sos" "$PKG/usr/bin/sos"
        ln -f "$PKG/usr/bin/sos" "$PKG/usr/bin/$b"
    else
        install -m 0755 "$DIST/$b" "$PKG/usr/bin/$b"
    fi
done
for u in "${UNITS[@]}"; do
    install -m 0644 "packaging/systemd/$u" "$PKG/lib/systemd/system/$u"
done
install -m 0644 packaging/sos.conf.example "$PKG/usr/share/doc/sos/sos.conf.example"
[ -f README.md ] && install -m 0644 README.md "$PKG/usr/share/doc/sos/README.md"
# blob-server drops to this user after chrooting into its store.
printf '%s\n' 'u sos-blob - "SOS blob-server" /var/lib/sos/blob' \
    >"$PKG/usr/lib/sysusers.d/sos.conf"
chmod 0644 "$PKG/usr/lib/sysusers.d/sos.conf"
# blob-server.service's store, already sos-blob's (see the unit: not
# StateDirectory=).  /var/lib/sos is not in the package, so that removing it
# never touches the data.
printf '%s\n' 'd /var/lib/sos 0755 root root -' 'd /var/lib/sos/blob 0700 sos-blob sos-blob -' \
    >"$PKG/usr/lib/tmpfiles.d/sos.conf"
chmod 0644 "$PKG/usr/lib/tmpfiles.d/sos.conf"

cat >"$PKG/DEBIAN/control" <<CONTROL
Package: sos
Version: $VERSION
Architecture: amd64
Maintainer: SOS developers <sos@localhost>
Section: net
Priority: optional
Installed-Size: $(du -sk "$PKG" | cut -f1)
Description: Simple Object Storage: a small replicated HTTP object store
 blob-server stores objects on local disk; sos-server offers uploads and
 downloads over HTTP and spreads objects over groups of blob-servers;
 replicate (hourly, via replicate.timer) copies each object to every member
 of its group.  Static binaries: no runtime dependencies.
CONTROL

cat >"$PKG/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers sos.conf
    elif ! getent passwd sos-blob >/dev/null; then
        adduser --system --group --no-create-home --home /var/lib/sos/blob sos-blob
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create sos.conf
    else
        install -d -m 0755 /var/lib/sos
        install -d -m 0700 -o sos-blob -g sos-blob /var/lib/sos/blob
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
POSTINST
# Purge: the links `systemctl enable` made (e.g. in multi-user.target.wants/)
# would be left dangling.  /var/lib/sos is left alone, always.
cat >"$PKG/DEBIAN/postrm" <<POSTRM
#!/bin/sh
set -e
if [ "\$1" = purge ] && [ -d /etc/systemd/system ]; then
    for u in ${UNITS[*]} 'blob-server@*.service'; do
        find /etc/systemd/system -type l -name "\$u" -delete
    done
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
cat >"$PKG/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop replicate.timer replicate.service sos-server.service \
        'blob-server@*.service' blob-server.service || true
fi
PRERM
chmod 0755 "$PKG/DEBIAN/postinst" "$PKG/DEBIAN/postrm" "$PKG/DEBIAN/prerm"

mkdir -p "$DIST"
dpkg-deb --root-owner-group --build "$PKG" "$DEB" >/dev/null
echo "deb.sh: built $DEB"
dpkg-deb --info "$DEB" | sed -n '/Package:/,/Description:/p' >&2
dpkg-deb --contents "$DEB" >&2
