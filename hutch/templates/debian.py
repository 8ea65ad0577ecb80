"""A base layer from a Debian suite, built with mmdebstrap from the host's own apt sources.

The layer is a Debian system with the sandbox user of every template (`user`, uid 1000, home
`/home/user`, passwordless sudo as in E2B's templates), the host's extra CA certificates added to
its trust store (hosts behind a TLS-inspecting proxy), and the empty directories the runtime
mounts on (`/opt/hutch`, `/run/hutch`), so an untouched instance writes nothing to its upper
layer. Its id is a hash of the recipe: the same suite, packages, mirror and certificates give
the same layer, built once. A recipe may add a setup script, run last inside the tree (chrooted, as root,
with the host's DNS and the CA and index settings of the build) for what Debian does not
package: the code-interpreter template's kernels from PyPI and npm.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from hutch.errors import BackendUnavailable, FailedPrecondition
from hutch.runtime.rootfs import refuse_linked_mount_points
from hutch.templates.store import TemplateStore

RECIPE_VERSION = 3  # bump when the hooks below change what a layer contains

PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}(:[a-z0-9-]+)?(=[A-Za-z0-9.+:~-]+)?$")
# What every template's base needs: the sandbox user's tools, trust store and sudo.
ESSENTIAL_PACKAGES = ("ca-certificates", "sudo", "procps")


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def layer_id(suite: str, packages: Sequence[str], mirror: str, ca_files: Sequence[Path], setup: str = "") -> str:
    recipe: dict = {
        "kind": "debian",
        "version": RECIPE_VERSION,
        "suite": suite,
        "packages": sorted(set(packages) | set(ESSENTIAL_PACKAGES)),
        "mirror": mirror,
        "ca": _digest(ca_files),
    }
    if setup:  # only then: the layers of recipes without one keep their ids
        recipe["setup"] = setup
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def customize_script(
    ca_files: Sequence[Path], update_ca: bool = True, setup: str = "", setup_env: dict[str, str] | None = None
) -> str:
    """The shell run on a finished tree (`$1`): mmdebstrap's customize hook, and the same for an
    unpacked image (`update_ca=False`: its tools may not run on this host; the certificates are
    appended to its bundle instead)."""
    lines = [
        "set -e",
        'mkdir -p "$1/etc" "$1/usr/local/share/ca-certificates" "$1/home"',
        'touch "$1/etc/passwd" "$1/etc/group" "$1/etc/shadow"',
        'grep -q "^user:" "$1/etc/passwd" || {',
        '  echo "user:x:1000:1000:user:/home/user:/bin/bash" >> "$1/etc/passwd"',
        '  echo "user:x:1000:" >> "$1/etc/group"',
        '  echo "user:*:19000:0:99999:7:::" >> "$1/etc/shadow"',
        "}",
        'sed -i "s/^sudo:x:27:$/sudo:x:27:user/" "$1/etc/group" 2>/dev/null || true',
        'mkdir -p "$1/home/user" "$1/opt/hutch" "$1/run/hutch"',
        # pip installs as in E2B's templates (Debian marks its Python as managed by apt only).
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        'cp -a "$1/etc/skel/." "$1/home/user/" 2>/dev/null || true',
        'chown -R 1000:1000 "$1/home/user"',
        'if [ -d "$1/etc/sudoers.d" ]; then',
        '  echo "user ALL=(ALL:ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/90-hutch-user"',
        '  chmod 0440 "$1/etc/sudoers.d/90-hutch-user"',
        "fi",
        'printf "127.0.0.1\\tlocalhost sandbox\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n" > "$1/etc/hosts"',
        'echo sandbox > "$1/etc/hostname"',
        'echo "nameserver 127.0.0.1" > "$1/etc/resolv.conf"',
    ]
    certificates = split_certificates(ca_files)
    for index, pem in enumerate(certificates):
        target = f'"$1/usr/local/share/ca-certificates/hutch-extra-{index}.crt"'
        lines.append(f"cat > {target} <<'HUTCH_CERTIFICATE'\n{pem}\nHUTCH_CERTIFICATE")
    if certificates and update_ca:
        lines.append('chroot "$1" update-ca-certificates >/dev/null 2>&1')
    elif certificates:
        lines.append(
            'if [ -f "$1/etc/ssl/certs/ca-certificates.crt" ]; then '
            'cat "$1"/usr/local/share/ca-certificates/hutch-extra-*.crt >> "$1/etc/ssl/certs/ca-certificates.crt"; fi'
        )
    if setup:
        # The host's DNS while it runs (the tree's own resolv.conf points at the sandbox's).
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", **(setup_env or {})}  # fmt: skip
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        lines += [
            'cp -L /etc/resolv.conf "$1/etc/resolv.conf"',
            f"cat > \"$1/tmp/hutch-setup.sh\" <<'HUTCH_SETUP'\n{setup}\nHUTCH_SETUP",
            f'env -i {assignments} chroot "$1" bash -e /tmp/hutch-setup.sh',
            'rm -rf "$1/tmp/hutch-setup.sh" "$1/root/.npm" "$1/root/.cache"',
            'echo "nameserver 127.0.0.1" > "$1/etc/resolv.conf"',
        ]
    return "\n".join(lines)


def split_certificates(ca_files: Sequence[Path]) -> list[str]:
    """The PEM certificates of `ca_files`, one each (update-ca-certificates takes one per file)."""
    found: dict[str, None] = {}
    for path in ca_files:
        text = path.read_text(errors="replace")
        for block in re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S):
            found[block] = None
    return list(found)


def build(
    store: TemplateStore,
    suite: str,
    packages: Sequence[str],
    mirror: str = "",
    ca_files: Sequence[Path] = (),
    log: Callable[[str], None] = lambda line: None,
    setup: str = "",
    setup_env: dict[str, str] | None = None,
) -> str:
    """Build (or find) the layer of `suite` with `packages` (then `setup`, a shell script run in
    the tree with `setup_env`); returns its id.

    Raises:
        BackendUnavailable: mmdebstrap is not installed.
        FailedPrecondition: the build failed (its output's last lines say why).
    """
    layer = layer_id(suite, packages, mirror, ca_files, setup)
    if store.has_layer(layer):
        return layer
    if shutil.which("mmdebstrap") is None:
        raise BackendUnavailable("mmdebstrap is not installed (apt-get install mmdebstrap)")
    scratch = store.scratch()
    hook = scratch.parent / f"{scratch.name}.hook.sh"
    hook.write_text(customize_script(ca_files, setup=setup, setup_env=setup_env))
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(sorted(set(packages) | set(ESSENTIAL_PACKAGES)))}",
        f'--customize-hook=sh {shlex.quote(str(hook))} "$1"',
        suite,
        str(scratch),
        *([mirror] if mirror else []),
    ]
    tail: list[str] = []
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            log(line)
            tail = [*tail[-19:], line]
        if process.wait() != 0:
            raise FailedPrecondition(f"mmdebstrap {suite} failed:\n" + "\n".join(tail))
        refuse_linked_mount_points(scratch, f"Debian {suite} with its setup script")
        return str(store.commit(scratch, layer).name)
    except BaseException:
        store.discard(scratch)
        raise
    finally:
        hook.unlink(missing_ok=True)
