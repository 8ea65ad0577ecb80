"""What a template is: read-only layers plus the defaults of the instances that boot from it.

A layer is a directory tree stored once (`TemplateStore`), named by a hash of what made it
(the Debian suite and packages, an image's digest, a build step and the layer under it), so the
same recipe never builds twice and every template using it shares it. An instance mounts its
template's layers, bottom first, under a writable upper layer of its own (an overlay), which
lives in the session's workspace (`hutch.runtime.rootfs`).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from hutch.errors import InvalidArgument
from hutch.runtime.base import RootFS

__all__ = ["DEFAULT_TAG", "HOST", "RootFS", "Template", "check_name", "check_tag", "split_ref"]

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
TAG = NAME  # E2B's tags: `name:tag` names one build of a template
DEFAULT_TAG = "default"  # the tag of a template's newest build: what its bare name boots
LAYER_ID = re.compile(r"^[0-9a-f]{64}$")
HOST = "host"  # not a root file system: the host's own, read-only (hutch.runtime.hostfs)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidArgument(
            f"invalid template name {name!r}: 1-63 lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG.match(tag):
        raise InvalidArgument(
            f"invalid tag {tag!r}: 1-63 lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return tag


def split_ref(ref: str) -> tuple[str, str]:
    """`name` or `name:tag` -> (name, tag), checked; a bare name is its default tag."""
    name, _, tag = ref.partition(":")
    return check_name(name), check_tag(tag) if tag else DEFAULT_TAG


@dataclass(frozen=True)
class Template:
    """A root file system (`layers`, bottom first) and the defaults of its instances."""

    name: str
    layers: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/home/user"  # where commands start by default
    user: str = "user"  # who runs commands by default
    start_cmd: str | None = None  # started in the background at every boot
    ready_cmd: str | None = None  # the instance is ready once this exits 0
    source: str = ""  # how the bottom layer was made, for people: "debian:bookworm", "image:…"
    created_at: float = field(default_factory=time.time)
    owner: str = ""  # the tenant that built it ("": an admin's, or built in)
    build_id: str = ""  # the build that made it (its tags point at builds)
    # A memory snapshot: new instances start from a checkpoint of the source's processes
    # (`TemplateStore.memory_path` of its top layer, the source's files) instead of booting.
    memory: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, raw: dict) -> Template:
        return cls(**{**raw, "layers": tuple(raw["layers"])})
