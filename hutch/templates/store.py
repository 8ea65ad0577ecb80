"""Where templates live on disk: `<root>/layers/<id>/` (trees, stored once),
`<root>/templates/<name>.json` (what each template is made of: its newest build, the `default`
tag), `<root>/tags/<name>.json` (its other tags, each the record of the build it names, so
that `name:tag` boots that build's layers after newer builds) and `<root>/memory/<layer id>/`
(a memory snapshot's checkpoint: the processes whose files are that layer; it goes with it).

Layers are written under `<root>/tmp/` and renamed into place when complete, and a template's
record is written only once all its layers exist, so a crash in the middle of a build leaves
nothing half-made that anyone could boot (`sweep` removes the scraps). Everything here is
root's only (0700): layers hold files with their inside ownership, setuid bits included, which
no host user may reach, and checkpoints hold a session's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from hutch.errors import FailedPrecondition, NotFound
from hutch.templates.model import DEFAULT_TAG, LAYER_ID, RootFS, Template, check_name, check_tag, split_ref


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.records_dir = self.root / "templates"
        self.tmp_dir = self.root / "tmp"
        self.tags_dir = self.root / "tags"
        self.memory_dir = self.root / "memory"
        for directory in (self.root, self.layers_dir, self.records_dir, self.tmp_dir, self.tags_dir, self.memory_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._lock = threading.Lock()

    # -- templates -----------------------------------------------------------------------------

    def get(self, ref: str) -> Template:
        """The template `name`, or the build its tag names (`name:tag`, named so)."""
        name, tag = split_ref(ref)
        try:
            raw = json.loads((self.records_dir / f"{name}.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"template {name!r} not found") from None
        if tag == DEFAULT_TAG:
            return Template.from_dict(raw)
        tagged = self._tags(name).get(tag)
        if tagged is None:
            raise NotFound(f"template {name!r} has no tag {tag!r}")
        return dataclasses.replace(Template.from_dict(tagged["template"]), name=f"{name}:{tag}")

    def exists(self, ref: str) -> bool:
        try:
            self.get(ref)
        except NotFound:
            return False
        return True

    def templates(self) -> list[Template]:
        found = []
        for path in sorted(self.records_dir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                found.append(Template.from_dict(json.loads(path.read_text())))
        return found

    def put(self, template: Template, tags: Iterable[str] = (DEFAULT_TAG,)) -> None:
        """Register a build of a template under `tags` (`default`: its bare name, replacing the
        newest build); every layer it names must exist. A template's first build is its default
        whatever its tags, so that its name always names a build."""
        name = check_name(template.name)
        tags = {check_tag(tag) for tag in tags}
        missing = [layer for layer in template.layers if not self.has_layer(layer)]
        if missing:
            raise FailedPrecondition(f"template {name!r} names missing layers {missing}")
        if template.memory and not self.memory_path(template.layers[-1]).is_dir():
            raise FailedPrecondition(f"template {name!r} is a memory snapshot without its checkpoint")
        with self._lock:
            if DEFAULT_TAG in tags or not self.exists(name):
                self._write(self.records_dir / f"{name}.json", template.to_dict())
            others = tags - {DEFAULT_TAG}
            if others:
                tagged = self._tags(name)
                now = time.time()
                for tag in others:
                    tagged[tag] = {"template": template.to_dict(), "tagged_at": now}
                self._write(self.tags_dir / f"{name}.json", tagged)

    def tags(self, name: str) -> dict[str, Template]:
        """Every tag of template `name` (`default` included) and the build it names."""
        found = {DEFAULT_TAG: self.get(name)}
        for tag, tagged in self._tags(name).items():
            found[tag] = dataclasses.replace(Template.from_dict(tagged["template"]), created_at=tagged["tagged_at"])
        return found

    def untag(self, name: str, tags: Iterable[str]) -> None:
        """Remove tags of `name` (its layers go with the template, in `delete`)."""
        self.get(name)
        tags = {check_tag(tag) for tag in tags}
        if DEFAULT_TAG in tags:
            raise FailedPrecondition(f"the {DEFAULT_TAG!r} tag is the template's name: delete the template instead")
        with self._lock:
            tagged = self._tags(name)
            unknown = sorted(tags - set(tagged))
            if unknown:
                raise NotFound(f"template {name!r} has no tag {unknown[0]!r}")
            self._write(self.tags_dir / f"{name}.json", {t: v for t, v in tagged.items() if t not in tags})

    def delete(self, name: str, in_use: Iterable[str] = ()) -> None:
        """Forget a template, all its tags, and free the layers no other template uses. `in_use`:
        the templates (or `name:tag`s) that running instances boot from, which cannot be pulled
        from under them."""
        self.get(name)
        if any(ref.partition(":")[0] == name for ref in in_use):
            raise FailedPrecondition(f"template {name!r} is in use by running sandboxes; stop them first")
        with self._lock:
            dropped = {layer for version in self.tags(name).values() for layer in version.layers}
            (self.records_dir / f"{name}.json").unlink(missing_ok=True)
            (self.tags_dir / f"{name}.json").unlink(missing_ok=True)
            kept = {layer for other in self.templates() for version in self._versions(other) for layer in version}
            for layer in dropped - kept:
                self._remove_tree(self.layers_dir / layer)
                self._remove_tree(self.memory_dir / layer)

    def _tags(self, name: str) -> dict[str, dict]:
        try:
            return json.loads((self.tags_dir / f"{name}.json").read_text())
        except FileNotFoundError:
            return {}

    def _versions(self, template: Template) -> list[tuple[str, ...]]:
        """The layers of every build a template's tags name."""
        return [template.layers, *(tuple(t["template"]["layers"]) for t in self._tags(template.name).values())]

    @staticmethod
    def _write(path: Path, content: dict) -> None:
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(content, indent=1))
        tmp.rename(path)

    def rootfs(self, name: str) -> RootFS:
        template = self.get(name)
        return RootFS(
            template=template.name,
            layer_paths=tuple(str(self.layer_path(layer)) for layer in template.layers),
            user=template.user,
            workdir=template.workdir,
            start_cmd=template.start_cmd,
            ready_cmd=template.ready_cmd,
            memory_image=str(self.memory_path(template.layers[-1])) if template.memory else None,
        )

    # -- layers --------------------------------------------------------------------------------

    def layer_path(self, layer: str) -> Path:
        if not LAYER_ID.match(layer):
            raise NotFound(f"invalid layer id {layer!r}")
        return self.layers_dir / layer

    def has_layer(self, layer: str) -> bool:
        return LAYER_ID.match(layer) is not None and (self.layers_dir / layer).is_dir()

    def memory_path(self, layer: str) -> Path:
        """The checkpoint of a memory snapshot whose files are `layer`."""
        return self.memory_dir / self.layer_path(layer).name

    def commit_memory(self, scratch: Path, layer: str) -> Path:
        """Make a finished checkpoint in `scratch` (under `tmp_dir`) the one of `layer`."""
        target = self.memory_path(layer)
        scratch.rename(target)
        return target

    def memory_bytes(self, layer: str) -> int:
        """The disk a memory snapshot's checkpoint takes (0 without one)."""
        return sum(entry.stat().st_size for entry in self.memory_path(layer).rglob("*") if entry.is_file())

    def scratch(self) -> Path:
        """A new empty directory to build a layer in (`commit` moves it into place)."""
        path = self.tmp_dir / uuid.uuid4().hex
        path.mkdir(mode=0o755)
        return path

    def commit(self, scratch: Path, layer: str) -> Path:
        """Make a finished scratch directory the layer `layer` (a layer that appeared meanwhile,
        built by someone else from the same recipe, wins: the scratch is dropped)."""
        target = self.layer_path(layer)
        os.chmod(scratch, 0o755)
        try:
            scratch.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            self._remove_tree(scratch)
        return target

    def discard(self, scratch: Path) -> None:
        self._remove_tree(scratch)

    def sweep(self) -> list[str]:
        """Remove the scraps of builds a crash interrupted."""
        removed = []
        for path in self.tmp_dir.iterdir():
            self._remove_tree(path)
            removed.append(f"unfinished template layer {path.name}")
        return removed

    @staticmethod
    def _remove_tree(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
