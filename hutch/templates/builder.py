"""Build steps: a template made from another one by the instructions E2B's Template SDK sends.

The SDK turns every builder call into one of five instructions: `RUN [command, user?]`,
`COPY [src, dest, user?, mode?]` (with `filesHash`, the files uploaded before the build as a
gzipped tar), `ENV [key, value, ...]`, `WORKDIR [path]` and `USER [name]` (`apt_install`,
`pip_install`, `git_clone`, `make_dir`... are RUN commands it writes itself). RUN, COPY and
WORKDIR make a layer each: the step runs in a build sandbox (an instance of the template so far,
allowed egress, root inside), and what it changed (the instance's upper layer) is copied out and
becomes the layer. A layer's id hashes the layer under it, the instruction, the uploaded files'
hash and the environment, workdir and user it ran with: the same step on the same base is never
run twice unless forced (`force`, `skip_cache`). ENV and USER only change the defaults.

A step that fails ends the build with its exit code and its last lines of output; its layer and
the template are never registered, and its sandbox is gone with it.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hutch.errors import FailedPrecondition, InvalidArgument, IsolationError
from hutch.runtime.base import InstanceSpec, Resources, RootFS, Runtime
from hutch.runtime.channel import AgentChannel
from hutch.runtime.rootfs import refuse_linked_mount_points
from hutch.templates.model import Template
from hutch.templates.store import TemplateStore

BUILD_RESOURCES = Resources(cpu=2.0, memory_mb=2048, pids=2048, disk_mb=8192, tmp_mb=512, max_lifetime_s=3600)
STEP_TIMEOUT = 1800.0  # seconds one RUN may take
KINDS = ("RUN", "COPY", "ENV", "WORKDIR", "USER")


@dataclass(frozen=True)
class Step:
    kind: str
    args: tuple[str, ...]
    files_hash: str | None = None
    force: bool = False

    @classmethod
    def parse(cls, raw: dict) -> Step:
        kind = str(raw.get("type", "")).upper()
        args = raw.get("args") or []
        if kind not in KINDS:
            raise InvalidArgument(f"unknown build step type {raw.get('type')!r} (known: {', '.join(KINDS)})")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument(f"the args of a {kind} step must be a list of strings")
        need = {"RUN": 1, "COPY": 2, "ENV": 2, "WORKDIR": 1, "USER": 1}[kind]
        if len(args) < need or (kind == "ENV" and len(args) % 2):
            raise InvalidArgument(f"a {kind} step needs {'key/value pairs' if kind == 'ENV' else f'{need} args'}")
        files_hash = raw.get("filesHash")
        if kind == "COPY" and not (isinstance(files_hash, str) and len(files_hash) == 64):
            raise InvalidArgument("a COPY step needs the filesHash of its uploaded files")
        return cls(kind, tuple(args), files_hash, bool(raw.get("force")))

    def describe(self) -> str:
        return f"{self.kind} {' '.join(self.args)}"


@dataclass
class State:
    """What the steps so far made: layers (bottom first) and the defaults."""

    layers: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/home/user"
    user: str = "user"


def layer_key(state: State, step: Step) -> str:
    recipe = {
        "under": state.layers[-1] if state.layers else "",
        "kind": step.kind,
        "args": step.args,
        "files": step.files_hash,
        "env": state.env,
        "workdir": state.workdir,
        "user": state.user,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def copy_script(archive: str, src: str, dest: str, owner: str, mode: str) -> str:
    """Shell run as root: unpack the uploaded tar and put `src` at `dest` as Docker's COPY does
    (a directory's contents into `dest`; a file into `dest/` when it ends with a slash)."""
    q = shlex.quote
    stage = f"/tmp/hutch-copy-{uuid.uuid4().hex[:8]}"
    lines = [
        "set -e",
        f"mkdir -p {stage}",
        f"tar -xzf {q(archive)} -C {stage} 2>/dev/null || tar -xf {q(archive)} -C {stage}",
        f"rm -f {q(archive)}",
        f"src={q(stage + '/' + src.strip('/'))}",
        f"dest={q(dest)}",
        'if [ -d "$src" ]; then mkdir -p "$dest"; cp -a "$src/." "$dest/"; target="$dest"',
        'else case "$dest" in */) mkdir -p "$dest"; target="$dest$(basename "$src")";; '
        '*) if [ -d "$dest" ]; then target="$dest/$(basename "$src")"; '
        'else mkdir -p "$(dirname "$dest")"; target="$dest"; fi;; esac; cp -a "$src" "$target"; fi',
    ]
    if owner:
        lines.append(f'chown -R {q(owner)} "$target"')
    if mode:
        lines.append(f'chmod -R {q(mode)} "$target"')
    lines.append(f"rm -rf {stage}")
    return "\n".join(lines)


class StepRunner:
    """Runs the layer-making steps of builds in sandboxes of `runtime`."""

    def __init__(self, store: TemplateStore, runtime: Runtime, files_dir: Path, base_env: dict[str, str]) -> None:
        self.store = store
        self.runtime = runtime
        self.files_dir = files_dir  # uploaded COPY archives, by hash
        self.base_env = base_env  # CA certificates and mirror settings

    async def build(
        self, name: str, parent: Template, steps: list[Step], log: Callable[[str], None], force: bool = False,
        start_cmd: str | None = None, ready_cmd: str | None = None,
    ) -> Template:  # fmt: skip
        state = State(list(parent.layers), dict(parent.env), parent.workdir, parent.user)
        forced = force
        for index, step in enumerate(steps, start=1):
            label = f"[{index}/{len(steps)}] {step.describe()}"
            if step.kind == "ENV":
                pairs = step.args
                state.env.update({pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)})
                log(f"{label}")
                continue
            if step.kind == "USER":
                state.user = step.args[0]
                log(f"{label}")
                continue
            if step.kind == "WORKDIR":
                state.workdir = step.args[0]
            forced = forced or step.force  # a forced step rebuilds every step after it too
            key = layer_key(state, step)
            if not forced and self.store.has_layer(key):
                log(f"CACHED {label}")
                state.layers.append(key)
                continue
            log(label)
            await self._run_step(name, state, step, key, log, index)
            state.layers.append(key)
        return Template(
            name=name, layers=tuple(state.layers), env=state.env, workdir=state.workdir, user=state.user,
            start_cmd=start_cmd, ready_cmd=ready_cmd, source=f"template:{parent.name}",
        )  # fmt: skip

    async def _run_step(self, name: str, state: State, step: Step, key: str, log: Callable[[str], None],
                        index: int) -> None:  # fmt: skip
        rootfs = RootFS(
            template=f"build:{name}",
            layer_paths=tuple(str(self.store.layer_path(layer)) for layer in state.layers),
            user=state.user,
            workdir=state.workdir,
        )
        spec = InstanceSpec(
            instance_id=f"b-{uuid.uuid4().hex[:16]}",  # type: ignore[arg-type]
            resources=BUILD_RESOURCES,
            env={**self.base_env, **state.env},
            workspace=f"_builds/{uuid.uuid4().hex}",
            network={"internet": True},
            rootfs=rootfs,
        )
        instance = await self.runtime.start(spec)
        try:
            async with AgentChannel(instance.socket_path, timeout=STEP_TIMEOUT) as channel:
                tail: list[str] = []
                pending = b""

                def output(chunk: bytes) -> None:
                    nonlocal pending
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        text = line.decode(errors="replace")
                        log(text)
                        tail[:] = [*tail[-29:], text]

                command, user = self._command(state, step)
                if step.kind == "COPY":
                    archive = self.files_dir / str(step.files_hash)
                    if not archive.is_file():
                        raise FailedPrecondition(f"step {index}: the files of {step.args[0]!r} were never uploaded")
                    staged = f"/tmp/hutch-copy-{step.files_hash}.tar"
                    await channel.write_file(staged, archive.read_bytes())
                    owner, mode = [*step.args[2:4], "", ""][:2]
                    command = copy_script(staged, step.args[0], step.args[1], owner, mode)
                result = await channel.run(command, user=user, timeout=STEP_TIMEOUT, on_output=output)
                if pending:
                    output(b"\n")
                if result.exit_code != 0:
                    raise StepFailed(index, f"step {index} ({step.describe()[:200]}) failed with exit code "
                                            f"{result.exit_code}", tail)  # fmt: skip
            # Nothing of the step may run while host root copies its layer: a process it left
            # behind could swap a directory for a link to a host directory between cp's look
            # and its descent, and cp would copy the host's files into the template.
            await self.runtime.halt(instance.instance_id)
            scratch = self.store.scratch()
            try:
                copied = subprocess.run(
                    ["cp", "-a", f"{instance.workspace_path}/upper/.", f"{scratch}/"], capture_output=True, text=True
                )
                if copied.returncode != 0:
                    raise IsolationError(f"cannot keep the layer of step {index}: {copied.stderr.strip()[-500:]}")
                refuse_linked_mount_points(scratch, f"step {index} ({step.describe()[:200]})")
            except BaseException:
                self.store.discard(scratch)
                raise
            self.store.commit(scratch, key)
        finally:
            await self.runtime.stop(instance.instance_id)

    @staticmethod
    def _command(state: State, step: Step) -> tuple[str, str]:
        """The shell command of a step and who runs it."""
        if step.kind == "RUN":
            user = step.args[1] if len(step.args) > 1 and step.args[1] else state.user
            return f"cd {shlex.quote(state.workdir)} 2>/dev/null || true\n{step.args[0]}", user
        if step.kind == "WORKDIR":
            return f"mkdir -p {shlex.quote(step.args[0])}", "root"
        return "", "root"  # COPY: the script is made once the files are staged


class StepFailed(FailedPrecondition):
    """A build step exited non-zero: which one, and the end of its output."""

    def __init__(self, step: int, message: str, tail: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.tail = tail
