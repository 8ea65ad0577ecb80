"""A base layer from an OCI image, pulled by reference with skopeo and unpacked with umoci (both
Debian packages): `registry.example.com/team/app:1.2`, `127.0.0.1:5000/x:1`, `docker.io/…`.

The image's layers are flattened into one layer of hutch's, named by a hash of the image's
manifest digest (the same image is unpacked once), and made fit for hutch like a Debian layer
(`hutch.templates.debian`): the sandbox user `user` (uid 1000) if the image has none, the host's
extra CA certificates, the runtime's mount points. The image's configuration gives the template's
defaults: environment, working directory, user. Registries: `[templates] insecure_registries`
(plain HTTP or unverified TLS, e.g. a local registry) and `registry_auth` ("user:password" per
registry host).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from hutch.errors import BackendUnavailable, FailedPrecondition, InvalidArgument
from hutch.runtime.rootfs import refuse_linked_mount_points
from hutch.templates.debian import customize_script
from hutch.templates.store import TemplateStore

RECIPE_VERSION = 1
REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._:/@-]{0,254}[a-zA-Z0-9._-]$|^[a-z0-9]$")
PULL_TIMEOUT = 1800.0


def registry_of(reference: str) -> str:
    """The registry host of an image reference (Docker's rules: no dot, colon or localhost in
    the first part means Docker Hub)."""
    first = reference.split("/", 1)[0]
    if "/" in reference and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _run(argv: list[str], what: str, log: Callable[[str], None]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=PULL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{what} took longer than {PULL_TIMEOUT:.0f} s") from None
    for line in (result.stdout + result.stderr).splitlines()[-20:]:
        log(line)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise FailedPrecondition(f"{what} failed: {message[-1] if message else result.returncode}")
    return result.stdout


def pull(
    store: TemplateStore,
    reference: str,
    insecure_registries: Sequence[str] = (),
    registry_auth: dict[str, str] | None = None,
    ca_files: Sequence[Path] = (),
    log: Callable[[str], None] = lambda line: None,
) -> tuple[str, dict]:
    """The layer of image `reference` (pulled and unpacked if new) and the image's config
    (`Env`, `WorkingDir`, `User`…).

    Raises:
        InvalidArgument: not an image reference.
        BackendUnavailable: skopeo or umoci is not installed.
        FailedPrecondition: the image cannot be pulled or unpacked (the tools' last words).
    """
    if not isinstance(reference, str) or not REFERENCE.match(reference):
        raise InvalidArgument(f"invalid image reference {reference!r}")
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise BackendUnavailable(f"{tool} is not installed (apt-get install skopeo umoci)")
    registry = registry_of(reference)
    source = f"docker://{reference}"
    flags = ["--src-tls-verify=false"] if registry in insecure_registries else []
    credentials = (registry_auth or {}).get(registry)
    if credentials:
        flags += ["--src-creds", credentials]
    with tempfile.TemporaryDirectory(dir=store.tmp_dir) as work:
        layout = f"{work}/image:pulled"
        log(f"pulling {reference}")
        _run(["skopeo", "copy", "--quiet", *flags, source, f"oci:{layout}"], f"pulling image {reference}", log)
        index = json.loads(Path(work, "image", "index.json").read_text())
        digest = index["manifests"][0]["digest"]
        layer = hashlib.sha256(
            json.dumps(
                {"kind": "oci", "version": RECIPE_VERSION, "digest": digest, "ca": _ca_digest(ca_files)}
            ).encode()
        ).hexdigest()
        config = _image_config(Path(work, "image"), index)
        if store.has_layer(layer):
            log(f"image {reference} ({digest[:19]}) is already unpacked")
            return layer, config
        scratch = store.scratch()
        try:
            scratch.rmdir()  # umoci makes the directory itself
            _run(["umoci", "raw", "unpack", "--image", layout, str(scratch)], f"unpacking image {reference}", log)
            hook = Path(work, "hook.sh")
            hook.write_text(customize_script(ca_files, update_ca=False))
            _run(["sh", str(hook), str(scratch)], "preparing the image for sandboxes", log)
            refuse_linked_mount_points(scratch, f"image {reference}")
            return store.commit(scratch, layer).name, config
        except BaseException:
            if scratch.exists():
                store.discard(scratch)
            raise


def _ca_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def _image_config(layout: Path, index: dict) -> dict:
    """The `config` object of the image's configuration blob (empty when it cannot be read)."""
    try:
        manifest = _blob(layout, index["manifests"][0]["digest"])
        if "manifests" in manifest:  # an index of platforms: the first matching one was pulled
            manifest = _blob(layout, manifest["manifests"][0]["digest"])
        return _blob(layout, manifest["config"]["digest"]).get("config") or {}
    except (OSError, KeyError, IndexError, ValueError):
        return {}


def _blob(layout: Path, digest: str) -> dict:
    algorithm, _, value = digest.partition(":")
    return json.loads((layout / "blobs" / algorithm / value).read_text())


def defaults(config: dict) -> dict:
    """Template defaults from an image config: env (without PATH, which sandboxes set), workdir, user."""
    env = {}
    for item in config.get("Env") or []:
        key, sep, value = item.partition("=")
        if sep and key != "PATH":
            env[key] = value
    user = (config.get("User") or "").split(":", 1)[0]
    return {
        "env": env,
        "workdir": config.get("WorkingDir") or "/home/user",
        "user": user if user and not user.isdigit() else "user",
    }
