"""The code interpreter: E2B's port-49999 API (`/execute`, `/contexts`) over real IPython kernels.

Each context owns one kernel (`hutch.agent.kernel.Kernel`), started on demand; executions
without a `context_id` use a default context per language, created on first use (or by
`prestart()` right after boot). Python's kernel is IPython; the other languages run the Jupyter
kernels the template has (`hutch.agent.languages`), started only when a context of theirs first
runs code (their kernels cost memory that most sessions never use). A language without a kernel
is a 400 that names what is missing.

`POST /execute` answers NDJSON, one line per kernel message, flushed as it comes:

    {"type": "number_of_executions", "execution_count": N}      execute_input
    {"type": "stdout" | "stderr", "text": ..., "timestamp": NS}  stream (ns since the epoch)
    {"type": "result", "text": ..., "png": ..., "is_main_result": bool}
                                     display_data (false) / execute_result (true)
    {"type": "error", "name": ..., "value": ..., "traceback": ...}
    {"type": "end_of_execution"}                                  status idle

Threads, not an event loop: the connection thread that streams an execution also reads the
kernel's IOPub socket, keeping only messages whose parent is its own request. A context's lock
serializes everything that talks to its kernel (executions, start, restart, delete); a second
execution waits for the first. While it waits or the kernel is silent, the stream yields None
every TICK so the server notices a client that went away.

Interrupts: when the client disconnects (or times out, which is the same thing to us) before
the cell finished, the kernel gets SIGINT and the lock is held until the cell reports idle, so
the next execution starts on a quiet kernel with its state intact. A cell that ignores SIGINT
for INTERRUPT_GRACE seconds costs the context its kernel: it is replaced by a fresh one.

A kernel that dies under a cell (`os._exit`, the OOM killer) ends that execution with an error
named `ContextRestarting` (E2B's name for it) and is restarted in the background at once; the
next execution runs on the new kernel, with a fresh namespace. One that dies while idle is
replaced when the next execution comes.

`env_vars` are set in the kernel's process environment just before the cell (a silent request
queued ahead of it) and put back just after (another silent request), as E2B does: Python's to
their previous values, other languages' to the sandbox's (or unset). Environment set later with
`/init` is applied to running kernels before their next cell.

Python kernels run `kernel_startup.py` first: E2B's result formats (charts, DataFrame data,
`Image.show()`).

Start-up budget: this module imports only lean standard modules; jupyter_client and zmq load
with `hutch.agent.kernel`, when the first kernel starts.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import threading
import time

from hutch.agent import languages, paths
from hutch.agent.http import Request, Response, StreamResponse, error_response, json_response
from hutch.errors import HutchError, InvalidArgument, NotFound, Unavailable

TICK = 0.25  # seconds between checks that the client is still there and the kernel alive
INTERRUPT_GRACE = 5.0  # seconds an interrupted cell may take to stop before its kernel is replaced
# How long a late-output kernel's cell that showed nothing by its barrier may still publish (Deno's
# result can even follow a kernel_info's idle on a loaded machine); cells with output never wait.
LATE_GRACE = 0.3
PYTHON = languages.PYTHON
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
NDJSON_HEADERS = [("content-type", "application/x-ndjson")]
END = b'{"type":"end_of_execution"}\n'

# Jupyter mime type -> field of an E2B result; any other mime type goes to `extra`.
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}

# Kernel-side snippets for per-execution env vars. Lambdas keep the user's namespace clean; the
# previous values wait on the `sys` module until the restore runs.
SET_ENV = (
    "(lambda o, e: (setattr(__import__('sys'), '_hutch_saved_env', "
    "{{k: o.environ.get(k) for k in e}}), o.environ.update(e)))(__import__('os'), {env!r})"
)
RESTORE_ENV = (
    "(lambda o, s: [o.environ.pop(k, None) if v is None else o.environ.__setitem__(k, v) "
    "for k, v in s.items()])(__import__('os'), __import__('sys').__dict__.pop('_hutch_saved_env', {}))"
)
UPDATE_ENV = "__import__('os').environ.update({env!r})"
STARTUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_startup.py")
LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_launch.py")  # ipykernel_launcher


def log(message: str) -> None:
    from hutch.agent.server import log as server_log

    server_log(message)


class Context:
    """A named kernel session: its language, working directory and (once started) kernel."""

    __slots__ = ("closed", "cwd", "id", "kernel", "kernel_env", "language", "lock", "stopping")

    def __init__(self, context_id: str, language: str, cwd: str) -> None:
        self.id = context_id
        self.language = language
        self.cwd = cwd
        self.lock = threading.Lock()  # held by whoever talks to the kernel
        self.kernel = None  # hutch.agent.kernel.Kernel, once started
        self.kernel_env: dict[str, str] = {}  # the agent's env as the kernel last saw it
        self.closed = False
        self.stopping: str | None = None  # "restart" / "delete" while we kill the kernel on purpose

    def info(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Interpreter:
    def __init__(self, config) -> None:
        self.config = config
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}  # language -> id of its default context
        self.lock = threading.Lock()
        self._workdir: str | None = None
        self._serial = 0
        self._kernels: dict[str, languages.KernelSpec] | None = None  # found on first need
        atexit.register(self.close)

    # -- routing -------------------------------------------------------------------------------

    def __call__(self, req: Request):
        path = req.path
        method = req.method
        if path == "/execute":
            if method == "POST":
                return self.execute(req)
            return _not_allowed(method, path)
        if path == "/contexts":
            if method == "GET":
                return self.list_contexts()
            if method == "POST":
                return self.create_context(req)
            return _not_allowed(method, path)
        parts = path.split("/")  # "", "contexts", id[, "restart"]
        if len(parts) == 3 and parts[2]:
            if method == "DELETE":
                return self.delete_context(parts[2])
            return _not_allowed(method, path)
        if len(parts) == 4 and parts[2] and parts[3] == "restart":
            if method == "POST":
                return self.restart_context(parts[2])
            return _not_allowed(method, path)
        return error_response(NotFound(f"no route for {method} {path}"))

    # -- contexts ------------------------------------------------------------------------------

    def _get(self, context_id) -> Context:
        if not isinstance(context_id, str):
            raise InvalidArgument("context_id must be a string")
        with self.lock:
            ctx = self.contexts.get(context_id)
        if ctx is None:
            raise NotFound(f"context '{context_id}' not found")
        return ctx

    def _default(self, language: str) -> Context:
        with self.lock:
            ctx = self.contexts.get(self.defaults.get(language, ""))
            if ctx is None:
                ctx = Context(_new_id(), language, self.config.user_home())
                self.contexts[ctx.id] = ctx
                self.defaults[language] = ctx.id
            return ctx

    def list_contexts(self) -> Response:
        # Each language the template offers has its default context listed (its kernel starts
        # when it first runs code).
        for language in self.languages():
            self._default(language)
        with self.lock:
            return json_response([ctx.info() for ctx in self.contexts.values()])

    def kernels(self, rescan: bool = False) -> dict[str, languages.KernelSpec]:
        """The kernels of the languages other than Python, found once (again with `rescan`)."""
        found = self._kernels
        if found is None or rescan:
            found = self._kernels = languages.find_kernels(self.config.kernel_python)
        return found

    def languages(self) -> list[str]:
        return [PYTHON, *sorted(self.kernels())]

    def _language(self, value) -> str:
        """The language a request names, if this sandbox has its kernel (else a 400 saying why)."""
        try:
            language = languages.canonical(value)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if language == PYTHON or language in self.kernels() or language in self.kernels(rescan=True):
            return language
        raise InvalidArgument(
            f"language '{value}' has no kernel in this sandbox's template: it needs "
            f"{languages.MISSING.get(language, 'a Jupyter kernel for it')}; this sandbox runs "
            f"{', '.join(self.languages())}"
        )

    def create_context(self, req: Request) -> Response:
        body = req.json() or {}
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        language = self._language(body.get("language"))
        cwd = paths.resolve(body.get("cwd"), self.config.user_home())
        if not os.path.exists(cwd):
            raise NotFound(f"cwd '{cwd}' does not exist")
        if not os.path.isdir(cwd):
            raise InvalidArgument(f"cwd '{cwd}' is not a directory")
        ctx = Context(_new_id(), language, cwd)
        with ctx.lock:
            self._start_kernel(ctx)
        with self.lock:
            self.contexts[ctx.id] = ctx
        return json_response(ctx.info())

    def restart_context(self, context_id: str) -> Response:
        """A fresh kernel for the context, now: a running cell is killed, not waited for."""
        ctx = self._get(context_id)
        ctx.stopping = "restart"
        try:
            kernel = ctx.kernel
            if kernel is not None:
                kernel.kill()
            with ctx.lock:
                old, ctx.kernel = ctx.kernel, None
                if old is not None:
                    old.shutdown()
                if ctx.closed:
                    raise NotFound(f"context '{context_id}' not found")
                self._start_kernel(ctx)
        finally:
            ctx.stopping = None
        return Response(204)

    def delete_context(self, context_id: str) -> Response:
        with self.lock:
            ctx = self.contexts.pop(context_id, None)
            if ctx is None:
                raise NotFound(f"context '{context_id}' not found")
            for language, default_id in list(self.defaults.items()):
                if default_id == context_id:
                    del self.defaults[language]
        ctx.closed = True
        ctx.stopping = "delete"
        kernel = ctx.kernel
        if kernel is not None:
            kernel.kill()
        with ctx.lock:
            old, ctx.kernel = ctx.kernel, None
            if old is not None:
                old.shutdown()
        return Response(204)

    # -- kernels -------------------------------------------------------------------------------

    def prestart(self) -> None:
        """Start the default Python context's kernel (called on a background thread at boot).

        A first `/execute` racing with this waits on the context's lock for this same kernel.
        """
        ctx = self._default(PYTHON)
        try:
            with ctx.lock:
                if ctx.kernel is None and not ctx.closed:
                    self._start_kernel(ctx)
        except Exception as exc:  # a background thread: report, the next execution retries
            log(f"kernel prestart failed: {getattr(exc, 'message', exc)}")

    def _kernel_argv(self) -> list[str]:
        return [
            self.config.kernel_python,
            "-c",
            f"exec(compile(open({LAUNCH!r}).read(), {LAUNCH!r}, 'exec'), {{}})",
            "-f",
            "{connection_file}",
            "--InteractiveShell.colors=nocolor",  # tracebacks as plain text
            "--HistoryManager.hist_file=:memory:",  # no sqlite shared by every kernel in $HOME
            # E2B's result formats; exec() leaves the user's namespace as it was.
            f"--IPKernelApp.exec_lines=exec(compile(open({STARTUP!r}).read(), {STARTUP!r}, 'exec'), {{}})",
        ]

    def _kernel_slot(self) -> tuple[str, str]:
        """The private directory for kernel files (0700) and a fresh name inside it."""
        with self.lock:
            if self._workdir is None or not os.path.isdir(self._workdir):
                import tempfile

                self._workdir = tempfile.mkdtemp(prefix="hutch-kernels-")
            self._serial += 1
            return self._workdir, f"k{self._serial}"

    def _start_kernel(self, ctx: Context):
        """Start a kernel for `ctx` (its lock held). Raises Unavailable when it cannot start."""
        try:
            from hutch.agent.kernel import Kernel
        except ImportError as exc:
            raise Unavailable(f"the code interpreter is not installed: {exc}") from None
        with contextlib.ExitStack() as stack:
            env = self.config.process_env()
            as_user: dict = {}
            if self.config.rootful:
                # Kernels run as the template's user; their files and sockets are that user's.
                from hutch.agent import users

                user = users.lookup(self.config.user)
                stack.enter_context(users.acting_as(user))
                as_user = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
                env.update({"HOME": user.home, "USER": user.name, "LOGNAME": user.name})
            workdir, name = self._kernel_slot()
            kernel_env = dict(self.config.env)
            if ctx.language == PYTHON:
                env.setdefault("MPLBACKEND", INLINE_BACKEND)  # figures come back as PNG results
                argv, transport, interrupt_mode = self._kernel_argv(), "ipc", "signal"
            else:
                spec = self.kernels().get(ctx.language)
                if spec is None:
                    raise Unavailable(f"the {ctx.language} kernel is no longer installed in this sandbox")
                env = {**spec.env, **env}
                env.setdefault("NO_COLOR", "1")  # Deno's values and errors as plain text
                argv, transport, interrupt_mode = spec.argv, spec.transport, spec.interrupt_mode
            kernel = Kernel(
                argv, ctx.cwd, env, workdir, name, as_user, language=ctx.language,
                colon_ipc=transport == "ipc-colon", tcp=transport == "tcp", late_output=transport == "tcp",
                interrupt_mode=interrupt_mode,
            )  # fmt: skip
            kernel.start()
        ctx.kernel = kernel  # type: ignore[assignment]
        ctx.kernel_env = kernel_env
        return kernel

    def _ensure_kernel(self, ctx: Context) -> None:
        with ctx.lock:
            if ctx.closed:
                raise NotFound(f"context '{ctx.id}' not found")
            if ctx.kernel is None:
                self._start_kernel(ctx)

    def _live_kernel(self, ctx: Context):
        """The context's kernel, replaced first if it died while idle (lock held)."""
        kernel = ctx.kernel
        if kernel is not None and kernel.alive():
            return kernel
        ctx.kernel = None
        if kernel is not None:
            kernel.shutdown()
        return self._start_kernel(ctx)

    def _revive(self, ctx: Context, dead) -> None:
        """Replace a kernel that died under a cell, so the next execution finds one ready."""
        with ctx.lock:
            if ctx.kernel is dead:
                ctx.kernel = None
                dead.shutdown()  # type: ignore[attr-defined]
            if ctx.closed or ctx.kernel is not None:
                return
            try:
                self._start_kernel(ctx)
            except HutchError as exc:
                log(f"restarting the kernel of context {ctx.id} failed: {exc.message}")

    def close(self) -> None:
        """At exit: kill every kernel and remove their files."""
        with self.lock:
            contexts = list(self.contexts.values())
            self.contexts.clear()
            self.defaults.clear()
            workdir, self._workdir = self._workdir, None
        for ctx in contexts:
            ctx.closed = True
            kernel = ctx.kernel
            if kernel is not None:
                kernel.kill()
        if workdir is not None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    # -- execution -----------------------------------------------------------------------------

    def execute(self, req: Request):
        body = req.json()
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        code = body.get("code")
        if not isinstance(code, str):
            raise InvalidArgument("code must be a string")
        context_id = body.get("context_id")
        language = body.get("language")
        if context_id and language:
            raise InvalidArgument("only one of context_id and language can be given")
        env_vars = _env_vars(body.get("env_vars"))
        ctx = self._get(context_id) if context_id else self._default(self._language(language))
        for key in env_vars:
            if not languages.valid_env_name(ctx.language, key):
                raise InvalidArgument(f"environment variable name {key!r} cannot be set in a {ctx.language} kernel")
        if ctx.kernel is None:
            # The first kernel of a context: start it (or wait for prestart's) before answering,
            # so that a kernel that cannot start is an HTTP error rather than a 200.
            self._ensure_kernel(ctx)
        return StreamResponse(200, self._stream(ctx, code, env_vars), NDJSON_HEADERS)

    def _stream(self, ctx: Context, code: str, env_vars: dict[str, str]):
        while not ctx.lock.acquire(timeout=TICK):
            yield None
        try:
            if ctx.closed:
                yield _line(_error("ContextDeleted", "the context was deleted before this code ran"))
                yield END
                return
            try:
                kernel = self._live_kernel(ctx)
            except HutchError as exc:
                yield _line(_error("KernelUnavailable", exc.message))
                yield END
                return
            yield from self._run(ctx, kernel, code, env_vars)
        finally:
            ctx.lock.release()

    def _run(self, ctx: Context, kernel, code: str, env_vars: dict[str, str]):
        kernel.drain_shell()
        setup = self._env_setup(ctx, env_vars)
        if setup:
            kernel.execute(setup, silent=True)
        msg_id = kernel.execute(code)
        barrier = None  # a kernel_info request whose idle comes after the cell's late output
        grace_until = None  # after the barrier, for a cell that showed nothing yet (`LATE_GRACE`)
        shown = False
        finished = False
        errored = False
        try:
            while True:
                wait = TICK if grace_until is None else grace_until - time.monotonic()
                if wait <= 0:
                    break
                msg = kernel.next_message(wait)
                if msg is None:
                    if grace_until is not None:
                        continue
                    if not kernel.alive():
                        finished = True
                        yield _line(self._death_error(ctx, kernel))
                        yield END
                        return
                    yield None
                    continue
                parent = msg["parent_header"].get("msg_id")
                if barrier is not None and parent == barrier:
                    if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                        if shown:
                            break
                        grace_until = time.monotonic() + LATE_GRACE
                    continue
                if parent != msg_id:
                    continue  # left over from an earlier request, or a silent one
                msg_type = msg["msg_type"]
                if msg_type == "status":
                    if msg["content"].get("execution_state") == "idle":
                        finished = True
                        if not kernel.late_output:
                            break
                        # Deno's kernel may publish a cell's result just after its idle: what
                        # it publishes before the idle of a request sent now belongs to the cell.
                        barrier = kernel.request_info()
                    continue
                if msg_type == "error":
                    if errored:
                        continue
                    errored = True
                event = _event(msg_type, msg)
                if event is not None:
                    shown = True
                    yield _line(event)
            yield END
        finally:
            if not finished:
                self._stop_cell(ctx, kernel, msg_id)
            if ctx.kernel is kernel:
                if kernel.alive():  # type: ignore[attr-defined]
                    if env_vars:
                        kernel.execute(self._env_restore(ctx, env_vars), silent=True)  # type: ignore[attr-defined]
                elif ctx.stopping is None:
                    threading.Thread(target=self._revive, args=(ctx, kernel), name="kernel-revive", daemon=True).start()

    def _env_setup(self, ctx: Context, env_vars: dict[str, str]) -> str:
        """Kernel code that brings its environment up to date and applies `env_vars`."""
        parts = []
        current = dict(self.config.env)
        if current != ctx.kernel_env:
            changed = {k: v for k, v in current.items() if ctx.kernel_env.get(k) != v}
            if changed:
                python = ctx.language == PYTHON
                parts.append(UPDATE_ENV.format(env=changed) if python else languages.set_env(ctx.language, changed))
            ctx.kernel_env = current
        if env_vars:
            if ctx.language == PYTHON:
                parts.append(SET_ENV.format(env=env_vars))
            else:
                parts.append(languages.set_env(ctx.language, env_vars))
        return "\n".join(parts)

    def _env_restore(self, ctx: Context, env_vars: dict[str, str]) -> str:
        """Kernel code that takes `env_vars` back out after the cell."""
        if ctx.language == PYTHON:
            return RESTORE_ENV
        # As E2B does for its other kernels: back to the sandbox's value, or unset.
        sandbox = self.config.env
        back = {k: sandbox[k] for k in env_vars if k in sandbox}
        gone = [k for k in env_vars if k not in sandbox]
        parts = [languages.set_env(ctx.language, back)] if back else []
        if gone:
            parts.append(languages.unset_env(ctx.language, gone))
        return "\n".join(parts)

    def _stop_cell(self, ctx: Context, kernel, msg_id: str) -> None:
        """Interrupt the running cell and wait until it is over; replace the kernel if it won't stop."""
        deadline = time.monotonic() + INTERRUPT_GRACE
        next_signal = 0.0
        while time.monotonic() < deadline:
            if not kernel.alive():
                return
            now = time.monotonic()
            if now >= next_signal:
                kernel.interrupt()
                next_signal = now + 1.0
            msg = kernel.next_message(0.1)
            if (
                msg is not None
                and msg["msg_type"] == "status"
                and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"].get("execution_state") == "idle"
            ):
                return
        log(f"context {ctx.id}: the interrupted cell did not stop; restarting its kernel")
        ctx.kernel = None
        kernel.shutdown()
        try:
            self._start_kernel(ctx)
        except HutchError as exc:
            log(f"restarting the kernel of context {ctx.id} failed: {exc.message}")

    @staticmethod
    def _death_error(ctx: Context, kernel) -> dict:
        if ctx.stopping == "delete":
            return _error("ContextDeleted", "the context was deleted while this code ran")
        if ctx.stopping == "restart":
            return _error("ContextRestarting", "the context was restarted while this code ran")
        code = kernel.exit_code
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            if code == -signal.SIGKILL:
                how += " (possibly out of memory)"
        else:
            how = f"exited with code {code}"
        return _error(
            "ContextRestarting",
            f"the kernel {how} while running this code; it is being restarted and the "
            "context's state (variables, imports) is lost",
        )


# -- helpers -------------------------------------------------------------------------------------


def _not_allowed(method: str, path: str) -> Response:
    return error_response(HutchError(f"{method} is not allowed on {path}"), status=405)


def _new_id() -> str:
    import uuid

    return str(uuid.uuid4())


def _env_vars(value) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument("env_vars must be an object of strings")
    for key, val in value.items():
        if not key or "=" in key or "\x00" in key:
            raise InvalidArgument(f"invalid environment variable name {key!r}")
        if not isinstance(val, str) or "\x00" in val:
            raise InvalidArgument(f"environment variable {key!r} must be a string without NUL bytes")
    return value


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _error(name: str, value: str, traceback: str = "") -> dict:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


def _event(msg_type: str, msg: dict) -> dict | None:
    """The NDJSON line for one IOPub message of the execution, or None to skip it."""
    content = msg["content"]
    if msg_type == "stream":
        name = content.get("name")
        if name not in ("stdout", "stderr"):
            return None
        return {"type": name, "text": content.get("text", ""), "timestamp": _ns(msg["header"].get("date"))}
    if msg_type == "execute_input":
        return {"type": "number_of_executions", "execution_count": content.get("execution_count")}
    if msg_type == "display_data":
        return _result(content.get("data") or {}, False)
    if msg_type == "execute_result":
        return _result(content.get("data") or {}, True)
    if msg_type == "error":
        return _error(
            content.get("ename", ""),
            content.get("evalue", ""),
            "\n".join(content.get("traceback") or []),
        )
    return None


def _result(data: dict, main: bool) -> dict:
    out: dict = {"type": "result"}
    extra = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            out[field] = value
    text = out.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        out["text"] = text[1:-1]  # E2B shows a string result without its repr quotes
    if extra:
        out["extra"] = extra
    out["is_main_result"] = main
    return out


def _ns(date) -> int:
    """Nanoseconds since the epoch of a Jupyter header date (as the SDK's OutputMessage has it)."""
    try:
        return int(date.timestamp()) * 1_000_000_000 + date.microsecond * 1000
    except (AttributeError, TypeError, ValueError, OverflowError):
        return time.time_ns()
