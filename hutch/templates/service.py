"""Templates as the rest of hutch uses them: what an instance of a template mounts, builds with
their progress, the built-in templates, and deletion that never pulls a template from under a
running sandbox.

Built-in templates are Debian systems built from the host's own apt sources (no registry
needed): `base` (Python with pip and venv, Node.js with npm, git, curl, sudo and the usual
tools) and `code-interpreter-v1` (base plus the data-science packages and the kernels E2B's code
interpreter offers: IPython, Deno's for JavaScript and TypeScript, bash_kernel and IRkernel; the
PyPI and npm ones from `install-kernels.sh`). The first start prepares those named in
`[templates] prepare`, in the background, logging its progress; sandboxes of a template still
being prepared get a 503 that says so. `host` is not a root file system but the host's own
system, read-only, as sandboxes had before templates (and where no Debian mirror can be reached).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from hutch.config import TemplatesConfig
from hutch.errors import (
    FailedPrecondition,
    HutchError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unavailable,
)
from hutch.runtime.base import RootFS, Runtime
from hutch.runtime.rootfs import CA_ENV
from hutch.templates import debian, oci
from hutch.templates.builder import Step, StepRunner
from hutch.templates.model import DEFAULT_TAG, HOST, Template, check_name, check_tag
from hutch.templates.store import TemplateStore

log = logging.getLogger(__name__)

BASE_PACKAGES = (
    "python3", "python3-pip", "python3-venv", "python-is-python3", "nodejs", "npm", "git", "curl", "wget",
    "ca-certificates", "sudo", "procps", "less", "nano", "unzip", "xz-utils", "iproute2", "build-essential",
)  # fmt: skip
CODE_INTERPRETER_PACKAGES = (
    *BASE_PACKAGES, "python3-ipykernel", "python3-numpy", "python3-pandas", "python3-matplotlib", "python3-scipy",
    "python3-sklearn", "python3-requests", "python3-pil", "python3-bs4", "python3-openpyxl", "python3-seaborn",
    "r-base-core", "r-cran-irkernel",
)  # fmt: skip
BUILTIN = {"base": BASE_PACKAGES, "code-interpreter-v1": CODE_INTERPRETER_PACKAGES}
# What Debian does not package, installed last in the tree: the kernels from PyPI and npm.
KERNELS_SCRIPT = Path(__file__).with_name("install-kernels.sh")
BUILTIN_SETUP = {"code-interpreter-v1": lambda: "set -- /usr/local /usr/bin/python3\n" + KERNELS_SCRIPT.read_text()}
LOG_LINES = 2000  # kept per build
KEPT_BUILDS = 256  # finished builds whose status and logs can still be read
WAITING_COUNTS_S = 600.0  # how long a registered build with no steps yet counts against its tenant


@dataclass
class Build:
    """A build in progress or done, as clients follow it."""

    template: str
    build_id: str
    status: str = "building"  # waiting (no steps yet) | building | ready | error
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    failed_step: int | None = None  # the step whose failure ended the build (1-based)
    owner: str = ""  # the tenant that asked for it
    tags: tuple[str, ...] = (DEFAULT_TAG,)  # what the finished build is registered as (`TemplateStore.put`)
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    total_lines: int = 0  # lines logged since the start (offsets of `lines` are relative to it)
    echo: bool = False  # also to hutch's own log (the built-ins' preparation, which no client follows)

    def log(self, line: str, level: str = "info") -> None:
        self.lines.append((time.time(), level, line))
        self.total_lines += 1
        if self.echo and line.strip():
            log.log(logging.ERROR if level == "error" else logging.INFO, "template %s: %s", self.template, line)

    def since(self, offset: int) -> list[tuple[float, str, str]]:
        first = self.total_lines - len(self.lines)
        return list(self.lines)[max(0, offset - first) :]


class TemplateService:
    def __init__(
        self,
        store: TemplateStore,
        config: TemplatesConfig,
        in_use: Callable[[], set[str]],
        runtime: Runtime | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.runtime = runtime  # runs build steps in sandboxes (None: only Debian bases build here)
        self.files_dir = store.root / "files"  # COPY uploads: <tenant>/<files hash>
        self.files_dir.mkdir(mode=0o700, exist_ok=True)
        self.in_use = in_use  # names of the templates running instances boot from
        self.builds: dict[str, Build] = {}  # by build id
        self._building: dict[str, Build] = {}  # by template name, while it builds
        self._tasks: set[asyncio.Task] = set()
        self._fell_back: set[str] = set()  # built-in templates not prepared, warned about once
        self.on_ready: Callable[[str], Awaitable[None]] | None = None  # a template was (re)built
        # Builds run this many at a time on the host (each runs sandboxes with egress, mmdebstrap
        # or an image pull); the others wait their turn, saying so in their log.
        self._slots = asyncio.Semaphore(config.max_concurrent_builds)

    # -- what instances mount ------------------------------------------------------------------

    def rootfs(self, name: str) -> RootFS | None:
        """The layers of template `name` for a new instance; None for `host`.

        Raises:
            Unavailable: the template is still being built.
            NotFound: no such template.
        """
        if name == HOST:
            return None
        if not self.store.exists(name):
            if name in BUILTIN:
                # Until a built-in template is prepared (or where it cannot be: no Debian mirror),
                # its functions run on the host's own system, as before templates.
                if name not in self._fell_back:
                    self._fell_back.add(name)
                    log.warning("template %s is not prepared: its sandboxes use the host's system (template "
                                "'host') until it is; see [templates] prepare", name)  # fmt: skip
                return None
            if name in self._building:
                raise Unavailable(f"template {name!r} is being prepared; try again in a minute")
        return self.store.rootfs(name)

    def env(self, name: str) -> dict[str, str]:
        """The environment of an instance of `name` before its function's and session's."""
        if name == HOST or (name in BUILTIN and not self.store.exists(name)):
            return {}
        return {**CA_ENV, **self.config.env, **self.store.get(name).env}

    def templates(self) -> list[Template]:
        return self.store.templates()

    def get(self, name: str) -> Template:
        return self.store.get(name)

    async def add_snapshot(
        self,
        name: str,
        owner: str,
        source: str,
        copy: Callable[[Path, Path | None], Awaitable[RootFS]],
        memory: bool = False,
        kind: str = "snapshot",
    ) -> Template:
        """A template of a session's files: `copy(layer, checkpoint)` fills a new layer with the
        session's upper layer (and, for a `memory` snapshot, writes a checkpoint of its processes
        to the new directory `checkpoint` at the same moment) and returns the root file system
        it sits on; the snapshot is that root file system's layers (those the session booted
        from) plus the new one, with the same defaults. Instances of a memory snapshot start
        from its checkpoint: the source's processes with their memory. `kind` names what it is
        for in its `source` (`snapshot:<session>`, `fork:<session>`).

        Raises:
            PermissionDenied: `name` is another tenant's template.
            FailedPrecondition: `name` is being built, or the session cannot be copied.
        """
        check_name(name)
        if name in self._building:
            raise FailedPrecondition(f"template {name!r} is being built")
        if self.store.exists(name) and self.store.get(name).owner != owner:
            raise PermissionDenied(f"template {name!r} belongs to someone else")
        # Named by what made it: this session's files at this moment.
        layer = hashlib.sha256(f"{kind}:{source}:{uuid.uuid4().hex}".encode()).hexdigest()
        scratch = self.store.scratch()
        checkpoint = self.store.tmp_dir / f"{scratch.name}.memory" if memory else None
        try:
            rootfs = await copy(scratch, checkpoint)
            if checkpoint is not None:
                self.store.commit_memory(checkpoint, layer)
            self.store.commit(scratch, layer)
        except BaseException:
            for path in (scratch, checkpoint, self.store.memory_path(layer) if memory else None):
                if path is not None:
                    self.store.discard(path)
            raise
        # The layers the session booted from (its template may have been rebuilt since).
        booted = tuple(Path(path).name for path in rootfs.layer_paths)
        try:
            env = self.store.get(rootfs.template).env
        except (NotFound, InvalidArgument):  # deleted since the session booted
            env = {}
        template = Template(
            name=name, layers=(*booted, layer), env=dict(env), workdir=rootfs.workdir, user=rootfs.user,
            start_cmd=rootfs.start_cmd, ready_cmd=rootfs.ready_cmd, source=f"{kind}:{source}", owner=owner,
            memory=memory,
        )  # fmt: skip
        self.store.put(template)
        return template

    def delete(self, name: str) -> None:
        if name in BUILTIN and name in self.config.prepare:
            raise FailedPrecondition(f"template {name!r} is built in (remove it from [templates] prepare first)")
        if name in self._building:
            raise FailedPrecondition(f"template {name!r} is being built")
        self.store.delete(name, self.in_use())

    # -- builds --------------------------------------------------------------------------------

    def start_debian(
        self,
        name: str,
        packages: list[str],
        user: str = "user",
        workdir: str = "/home/user",
        env: dict[str, str] | None = None,
        build_id: str | None = None,
        setup: str = "",
    ) -> Build:
        """Begin building template `name` from the configured Debian suite with `packages` (and a
        `setup` script run last in its tree)."""
        check_name(name)
        if name == HOST:
            raise InvalidArgument(f"{HOST!r} is the host's own system, not a template that can be built")
        for package in packages:
            if not isinstance(package, str) or not debian.PACKAGE.match(package):
                raise InvalidArgument(f"invalid Debian package name {package!r}")
        if name in self._building:
            raise FailedPrecondition(f"template {name!r} is already being built")
        build = self.new_build(name, build_id=build_id)

        async def make() -> Template:
            layer = await asyncio.to_thread(
                debian.build, self.store, self.config.debian_suite, packages, self.config.debian_mirror,
                self.config.ca_files(), build.log, setup, {**CA_ENV, **self.config.env},
            )  # fmt: skip
            return Template(
                name=name, layers=(layer,), env=dict(env or {}), user=user, workdir=workdir,
                source=f"debian:{self.config.debian_suite}",
            )  # fmt: skip

        self._run(build, make)
        return build

    def new_build(
        self, name: str, owner: str = "", build_id: str | None = None, waiting: bool = False,
        tags: tuple[str, ...] = (DEFAULT_TAG,),
    ) -> Build:  # fmt: skip
        """Register a build of `name` (`waiting`: its steps come later, E2B's two-call start),
        to be registered under `tags` when it is done."""
        check_name(name)
        tags = tuple(dict.fromkeys(check_tag(tag) for tag in tags)) or (DEFAULT_TAG,)
        if name == HOST:
            raise InvalidArgument(f"{HOST!r} is the host's own system, not a template that can be built")
        if name in self._building and self._building[name].status == "building":
            raise FailedPrecondition(f"template {name!r} is already being built")
        if owner:
            # A waiting build whose steps never came stops counting after a while.
            running = [
                b
                for b in self.builds.values()
                if b.owner == owner
                and b.finished_at is None
                and (b.status != "waiting" or time.time() - b.started_at < WAITING_COUNTS_S)
            ]
            if len(running) >= self.config.max_builds_per_tenant:
                raise QuotaExceeded(
                    f"this tenant has {len(running)} template builds unfinished, its limit "
                    f"([templates] max_builds_per_tenant); wait for one to end"
                )
        build = Build(
            name, build_id or str(uuid.uuid4()), status="waiting" if waiting else "building", owner=owner, tags=tags
        )
        self.builds[build.build_id] = build
        finished = [b for b in self.builds.values() if b.finished_at is not None]
        for old in sorted(finished, key=lambda b: b.finished_at or 0)[: max(0, len(finished) - KEPT_BUILDS)]:
            del self.builds[old.build_id]  # clients follow a build while it runs, and shortly after
        if not waiting:
            self._building[name] = build
        return build

    def start_steps(
        self, build: Build, parent_name: str | None, steps: list[Step], force: bool = False,
        start_cmd: str | None = None, ready_cmd: str | None = None, image: str | None = None,
        image_credentials: str | None = None,
    ) -> None:  # fmt: skip
        """Run E2B-style build steps for a waiting build, on the template `parent_name` or on the
        OCI image `image` (pulled with `image_credentials`, "user:password", if given)."""
        if build.status != "waiting":
            raise FailedPrecondition(f"build {build.build_id} was already started")
        if self.runtime is None:
            raise FailedPrecondition("this process runs no sandboxes, so it cannot run build steps")
        # NotFound: a 404 before anything runs.
        parent = self.store.get(parent_name) if parent_name is not None and image is None else None
        if build.template in self._building:
            raise FailedPrecondition(f"template {build.template!r} is already being built")
        build.status = "building"
        self._building[build.template] = build
        runner = StepRunner(self.store, self.runtime, self.files_for(build.owner), {**CA_ENV, **self.config.env})

        async def make() -> Template:
            base = parent
            if base is None:
                assert image is not None
                base = await self._pull(image, image_credentials, build.log)
            template = await runner.build(build.template, base, steps, build.log, force, start_cmd, ready_cmd)
            return dataclasses.replace(template, owner=build.owner, source=base.source or template.source)

        self._run(build, make)

    async def _pull(self, image: str, credentials: str | None, log_line: Callable[[str], None]) -> Template:
        """The image as a template to build on (`hutch.templates.oci`)."""
        auth = dict(self.config.registry_auth)
        if credentials:
            auth[oci.registry_of(image)] = credentials
        layer, config = await asyncio.to_thread(
            oci.pull, self.store, image, self.config.insecure_registries, auth, self.config.ca_files(), log_line
        )
        return Template(name=f"image-{layer[:12]}", layers=(layer,), source=f"image:{image}", **oci.defaults(config))

    def _run(self, build: Build, make: Callable[[], Awaitable[Template]]) -> None:
        name = build.template

        async def run() -> None:
            try:
                if self._slots.locked():
                    build.log(f"waiting: {self.config.max_concurrent_builds} builds already run on this host")
                async with self._slots:
                    template = await make()
                self.store.put(dataclasses.replace(template, build_id=build.build_id), build.tags)
                build.status = "ready"
                build.log(f"template {name} is ready")
                log.info("template %s is ready (%d layers)", name, len(template.layers))
                if self.on_ready is not None:
                    await self.on_ready(name)
            except HutchError as exc:
                build.status, build.error = "error", exc.message
                build.failed_step = getattr(exc, "step", None)
                build.log(f"build failed: {exc.message}", "error")
                log.error("template %s failed to build: %s", name, exc.message)
            except Exception as exc:
                build.status, build.error = "error", f"{exc.__class__.__name__}: {exc}"
                build.log(f"build failed: {build.error}", "error")
                log.exception("template %s failed to build", name)
            finally:
                build.finished_at = time.time()
                self._building.pop(name, None)

        task = asyncio.get_running_loop().create_task(run(), name=f"template-build-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def files_for(self, tenant_id: str) -> Path:
        """Where a tenant's uploaded COPY archives live (one tenant never builds from another's)."""
        path = self.files_dir / (tenant_id or "_admin")
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def build(self, build_id: str) -> Build:
        try:
            return self.builds[build_id]
        except KeyError:
            raise NotFound(f"build {build_id!r} not found") from None

    def prepare_builtins(self) -> None:
        """Build the built-in templates named in the config that do not exist yet, or whose
        recipe changed since they were built (a new hutch adds packages or kernels, another
        Debian suite or mirror is configured): the old one serves until the new one is ready."""
        for name in self.config.prepare:
            if name not in BUILTIN:
                log.warning("[templates] prepare names %r, which is not a built-in template", name)
                continue
            setup = BUILTIN_SETUP[name]() if name in BUILTIN_SETUP else ""
            if self.store.exists(name):
                wanted = debian.layer_id(
                    self.config.debian_suite, BUILTIN[name], self.config.debian_mirror, self.config.ca_files(), setup
                )
                if self.store.get(name).layers == (wanted,):
                    continue
                log.info("the recipe of the built-in template %s changed: rebuilding it in the background", name)
            else:
                log.info("preparing the built-in template %s (Debian %s): the first start takes minutes",
                         name, self.config.debian_suite)  # fmt: skip
            build = self.start_debian(name, list(BUILTIN[name]), setup=setup)
            build.echo = True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
