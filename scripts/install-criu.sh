#!/usr/bin/env bash
# CRIU for hibernating sandboxes (hutch/runtime/criu.py), built from Debian's source of 4.2.1.
# Debian bookworm's own criu (3.17) cannot run on kernels >= 6.13, and the newer binary packages
# need a newer glibc, so the upstream tarball Debian ships is built here. Idempotent, run as root:
# it returns at once when the prefix already holds criu 4.2.1.
#   PREFIX (default /usr/local/lib/hutch/criu): the binary goes to $PREFIX/sbin/criu
#   CRIU_MIRROR (default: the first URI of the host's apt sources): where `apt-get source` looks
set -euo pipefail
VERSION=4.2.1
PREFIX=${PREFIX:-/usr/local/lib/hutch/criu}
BIN="$PREFIX/sbin/criu"

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -qx "Version: $VERSION"; then
  exit 0
fi

mirror=${CRIU_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
             grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
               | sed -E 's/^deb (\[[^]]*\] )?//' | awk '{print $1}') | grep -v security | head -n1 || true)
fi
[ -n "$mirror" ] || { echo "install-criu: no Debian mirror found in the apt sources; set CRIU_MIRROR" >&2; exit 1; }

# The build's own packages (bookworm's), then the source through a private apt config: the
# host's /etc/apt is not touched, and unstable's lists never reach the host's apt.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  build-essential libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev \
  libprotobuf-c-dev libprotobuf-dev pkg-config protobuf-c-compiler protobuf-compiler uuid-dev \
  iproute2 iptables nftables >/dev/null

work=$(mktemp -d /var/tmp/hutch-criu-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror unstable main" \
  > "$work/etc/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/etc/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update
# The .debian.tar.xz may be missing on the mirror (404): the upstream tarball is all we build.
(cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only "criu=$VERSION-1" >/dev/null 2>&1) || true
[ -f "$work/criu_$VERSION.orig.tar.xz" ] || { echo "install-criu: criu_$VERSION.orig.tar.xz not found on $mirror" >&2; exit 1; }
tar -xf "$work/criu_$VERSION.orig.tar.xz" -C "$work"
make -C "$work/criu-$VERSION" -j"$(nproc)" criu >"$work/make.log" 2>&1 \
  || { tail -n 30 "$work/make.log" >&2; exit 1; }
install -D -m 0755 "$work/criu-$VERSION/criu/criu" "$BIN"
"$BIN" check >/dev/null || echo "install-criu: $BIN is installed, but 'criu check' fails on this kernel" >&2
echo "installed $("$BIN" --version | head -n1) at $BIN"
