"""Routing inside the agent: which service answers a request.

One agent serves both E2B in-sandbox ports. Traffic for envd (49983) and the code interpreter
(49999) is told apart by path; any other `E2b-Sandbox-Port` (or an HTTP CONNECT) is forwarded to
that port on the sandbox's own loopback, where user servers listen.

Services are created on first use so that the agent answers `/health` before it has imported
them; `warm_up_in_background` imports them once the first request (the runtime's readiness probe)
is answered: importing them earlier would compete with that answer for the GIL.
"""

from __future__ import annotations

import threading

from hutch.agent.config import ENVD_PORT, ENVD_VERSION, INTERPRETER_PORT, AgentConfig
from hutch.agent.http import Request, Response, error_response, json_response
from hutch.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

TYPE_CHECKING = False  # not `typing`'s: the agent does not import it at boot
if TYPE_CHECKING:
    from collections.abc import Callable

AGENT_PORTS = (str(ENVD_PORT), str(INTERPRETER_PORT))
RELEASE_PATH = "/_hutch/release"  # the runtime's, before a checkpoint (`hutch.runtime.gvisor`)


def requested_user(authorization: str | None, query_user: str | None = None) -> str | None:
    """The user a request names: E2B's `Authorization: Basic base64("<user>:")`, or `/files`'s
    `username` (binascii is built in: no import at request time)."""
    if authorization and authorization[:6].lower() == "basic ":
        import binascii

        try:
            decoded = binascii.a2b_base64(authorization[6:].strip().encode(), strict_mode=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise Unauthenticated("malformed Authorization header") from None
        name = decoded.split(":", 1)[0]
        if name:
            return name
    return query_user or None


class AgentApp:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._process = None
        self._filesystem = None
        self._files = None
        self._interpreter = None
        self._warming = False
        # Set by `main` where the runtime may ask the agent to let go of its socket (gVisor):
        # closes the listener and every other connection, returns once they are closed.
        self.on_release: Callable[[], None] | None = None

    # -- services, created once on first use -------------------------------------------------

    @property
    def process(self):
        if self._process is None:
            with self._lock:
                if self._process is None:
                    from hutch.agent.process import ProcessService

                    self._process = ProcessService(self.config)
        return self._process

    @property
    def filesystem(self):
        if self._filesystem is None:
            with self._lock:
                if self._filesystem is None:
                    from hutch.agent.filesystem import FilesystemService

                    self._filesystem = FilesystemService(self.config)
        return self._filesystem

    @property
    def files(self):
        if self._files is None:
            with self._lock:
                if self._files is None:
                    from hutch.agent.files import FilesEndpoint

                    self._files = FilesEndpoint(self.config)
        return self._files

    @property
    def interpreter(self):
        if self._interpreter is None:
            with self._lock:
                if self._interpreter is None:
                    from hutch.agent.interpreter import Interpreter

                    self._interpreter = Interpreter(self.config)
        return self._interpreter

    def warm_up_in_background(self) -> None:
        if self._warming:
            return
        self._warming = True

        def warm() -> None:
            # The kernel first: it takes the longest, and one failing step must not stop the rest.
            steps = [lambda: self.interpreter.prestart()] if self.config.prestart_kernel else []
            steps += [lambda: self.process, lambda: self.filesystem, lambda: self.files]
            for step in steps:
                try:
                    step()
                except Exception as exc:
                    from hutch.agent.server import log

                    log(f"warm-up step failed: {exc.__class__.__name__}: {exc}")

        threading.Thread(target=warm, name="warm-up", daemon=True).start()

    # -- dispatch ------------------------------------------------------------------------------

    def after_response(self) -> None:
        """Called by the server once an answer is sent: the first one starts the warm-up."""
        if not self._warming:
            self.warm_up_in_background()

    def __call__(self, req: Request):
        port = req.headers.get("e2b-sandbox-port")
        if req.method == "CONNECT" or (port and port not in AGENT_PORTS):
            from hutch.agent.forward import forward

            return forward(req, port)
        path = req.path
        if path == RELEASE_PATH and req.method == "POST" and self.on_release is not None:
            return self._release(self.on_release)
        if path != "/health":
            self._act_as(req, path)
        if path.startswith("/process.Process/"):
            return self.process.rpc(req)
        if path.startswith("/filesystem.Filesystem/"):
            return self.filesystem.rpc(req)
        if path == "/files":
            return self.files(req)
        if path == "/execute" or path == "/contexts" or path.startswith("/contexts/"):
            return self.interpreter(req)
        if path == "/health":
            return Response(204)
        if path == "/init" and req.method == "POST":
            return self._init(req)
        if path == "/envs" and req.method == "GET":
            return json_response(self.config.env)
        if path == "/version":
            return json_response({"version": ENVD_VERSION})
        return error_response(NotFound(f"no route for {req.method} {path}"))

    def _act_as(self, req: Request, path: str) -> None:
        """Take on the identity the request names (`hutch.agent.users`, imported at boot by a root
        agent: a module imported here, while the warm-up thread imports others, could meet a
        half-initialized one)."""
        name = requested_user(
            req.headers.get("authorization"), req.query_params().get("username") if path == "/files" else None
        )
        if self.config.rootful:
            from hutch.agent import users

            users.enter(users.lookup(name or self.config.user))
        elif name and name not in (self.config.user, "user"):
            # An agent that is not root (the `host` template) has only the sandbox user.
            if name == "root":
                raise PermissionDenied("this sandbox has no root user (its template is the host's read-only system)")
            raise Unauthenticated(f"error looking up user '{name}': no such user in this sandbox")

    def _release(self, release: Callable[[], None]) -> Response:
        """Let go of every host socket, so that the runtime can checkpoint the sandbox; the agent
        binds its socket again on SIGUSR1 (`main`). Refused while the sandbox holds a TCP socket:
        this runsc cannot save one that a process polls, and its failed checkpoint ends the
        sandbox. Reached only through the agent's socket, i.e. by hutch or through hutch's
        gateway on the sandbox's own behalf: a tenant can deafen no one but its own sandbox."""
        from hutch.agent.server import open_tcp_sockets
        from hutch.errors import FailedPrecondition

        held = open_tcp_sockets()
        if held:
            raise FailedPrecondition(f"the sandbox holds {held} TCP socket(s), which a checkpoint cannot save")
        release()
        import os

        return json_response({"pid": os.getpid()})

    def _init(self, req: Request) -> Response:
        """E2B's `/init`: set the environment that later processes and kernels start with."""
        body = req.json()
        env = body.get("envVars") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InvalidArgument("envVars must be an object of strings")
        self.config.env.update(env)
        return Response(204)
