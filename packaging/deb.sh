#!/usr/bin/env bash
# `make deb`: dist/sos_<version>_amd64.deb from the static binaries in dist/.
#
#   packaging/deb.sh VERSION
#
# The package holds /usr/bin/{blob-server,sos-server,replicate}, the systemd
# units (enabled by nobody: the admin writes /etc/sos.conf first), the
# sos-blob system user (sysusers.d) and /usr/share/doc/sos/sos.conf.example.
# The binaries are static, so it depends on nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VERSION=${1:?usage: packaging/deb.sh VERSION}
DIST=${DIST:-$ROOT/dist}
PKG=$ROOT/build/deb/sos
DEB=$DIST/sos_${VERSION}_amd64.deb

die() { echo "deb.sh: ERROR: $*" >&2; exit 1; }
for b in blob-server sos-server replicate; do
    [ -x "$DIST/$b" ] || die "$DIST/$b missing: run 'make dist' first"
done
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"

rm -rf "$PKG"
install -d "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/lib/systemd/system" \
    "$PKG/usr/lib/sysusers.d" "$PKG/usr/share/doc/sos"
install -m 0755 "$DIST/blob-server" "$DIST/sos-server" "$DIST/replicate" "$PKG/usr/bin/"
install -m 0644 packaging/systemd/blob-server.service packaging/systemd/sos-server.service \
    packaging/systemd/replicate.service packaging/systemd/replicate.timer \
    "$PKG/lib/systemd/system/"
install -m 0644 packaging/sos.conf.example "$PKG/usr/share/doc/sos/sos.conf.example"
[ -f README.md ] && install -m 0644 README.md "$PKG/usr/share/doc/sos/README.md"
# blob-server drops to this user after chrooting into its store.
printf '%s\n' 'u sos-blob - "SOS blob-server" /var/lib/sos/blob' \
    >"$PKG/usr/lib/sysusers.d/sos.conf"
chmod 0644 "$PKG/usr/lib/sysusers.d/sos.conf"

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
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
POSTINST
cat >"$PKG/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
cat >"$PKG/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop replicate.timer sos-server.service blob-server.service || true
fi
PRERM
chmod 0755 "$PKG/DEBIAN/postinst" "$PKG/DEBIAN/postrm" "$PKG/DEBIAN/prerm"

mkdir -p "$DIST"
dpkg-deb --root-owner-group --build "$PKG" "$DEB" >/dev/null
echo "deb.sh: built $DEB"
dpkg-deb --info "$DEB" | sed -n '/Package:/,/Description:/p' >&2
dpkg-deb --contents "$DEB" >&2
