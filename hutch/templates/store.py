"""Where templates live on disk: `<root>/layers/<id>/` (trees, stored once) and
`<root>/templates/<name>.json` (what each template is made of).

Layers are written under `<root>/tmp/` and renamed into place when complete, and a template's
record is written only once all its layers exist, so a crash in the middle of a build leaves
nothing half-made that anyone could boot (`sweep` removes the scraps). Everything here is
root's only (0700): layers hold files with their inside ownership, setuid bits included, which
no host user may reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

from hutch.errors import FailedPrecondition, NotFound
from hutch.templates.model import LAYER_ID, RootFS, Template, check_name


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.records_dir = self.root / "templates"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.root, self.layers_dir, self.records_dir, self.tmp_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._lock = threading.Lock()

    # -- templates -----------------------------------------------------------------------------

    def get(self, name: str) -> Template:
        check_name(name)
        try:
            raw = json.loads((self.records_dir / f"{name}.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"template {name!r} not found") from None
        return Template.from_dict(raw)

    def exists(self, name: str) -> bool:
        return (self.records_dir / f"{check_name(name)}.json").exists()

    def templates(self) -> list[Template]:
        found = []
        for path in sorted(self.records_dir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                found.append(Template.from_dict(json.loads(path.read_text())))
        return found

    def put(self, template: Template) -> None:
        """Register (or replace) a template; every layer it names must exist."""
        check_name(template.name)
        missing = [layer for layer in template.layers if not self.has_layer(layer)]
        if missing:
            raise FailedPrecondition(f"template {template.name!r} names missing layers {missing}")
        path = self.records_dir / f"{template.name}.json"
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(template.to_dict(), indent=1))
        tmp.rename(path)

    def delete(self, name: str, in_use: Iterable[str] = ()) -> None:
        """Forget a template and free the layers no other template uses. `in_use`: the templates
        that running instances boot from, which cannot be pulled from under them."""
        template = self.get(name)
        if name in set(in_use):
            raise FailedPrecondition(f"template {name!r} is in use by running sandboxes; stop them first")
        with self._lock:
            (self.records_dir / f"{name}.json").unlink(missing_ok=True)
            kept = {layer for other in self.templates() for layer in other.layers}
            for layer in template.layers:
                if layer not in kept:
                    self._remove_tree(self.layers_dir / layer)

    def rootfs(self, name: str) -> RootFS:
        template = self.get(name)
        return RootFS(
            template=template.name,
            layer_paths=tuple(str(self.layer_path(layer)) for layer in template.layers),
            user=template.user,
            workdir=template.workdir,
            start_cmd=template.start_cmd,
            ready_cmd=template.ready_cmd,
        )

    # -- layers --------------------------------------------------------------------------------

    def layer_path(self, layer: str) -> Path:
        if not LAYER_ID.match(layer):
            raise NotFound(f"invalid layer id {layer!r}")
        return self.layers_dir / layer

    def has_layer(self, layer: str) -> bool:
        return LAYER_ID.match(layer) is not None and (self.layers_dir / layer).is_dir()

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
