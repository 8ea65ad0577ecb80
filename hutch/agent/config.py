"""What the runtime tells the agent at boot (the `HUTCH_AGENT` environment variable, JSON).

The variable is removed from the environment before any user process can start, so user code
never sees it. Every field has a default, so `python -m hutch.agent --socket PATH` also runs the
agent outside a sandbox (tests, development).
"""

from __future__ import annotations

import os

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
ENVD_VERSION = "0.6.4"


class AgentConfig:
    __slots__ = (
        "env",
        "home",
        "kernel_python",
        "listen",
        "listen_fd",
        "prestart_kernel",
        "python_path",
        "releasable",
        "rlimits",
        "rootful",
        "socket_path",
        "user",
        "workdir",
    )

    def __init__(self, raw: dict) -> None:
        self.home: str = raw.get("home") or os.environ.get("HOME") or os.getcwd()
        self.user: str = raw.get("user", "user")
        # The environment every process (and kernel) starts with, before per-request envs.
        self.env: dict[str, str] = dict(raw.get("env") or {})
        self.listen_fd: int | None = raw.get("listen_fd")
        self.socket_path: str | None = raw.get("socket_path")
        # "HOST:PORT" ("[::]:PORT" for IPv6): serve TCP instead of a Unix socket, for a sandbox the
        # host cannot share a socket file with (a Kubernetes pod, reached at its pod IP).
        self.listen: str | None = raw.get("listen")
        # name -> [soft, hard]; applied once at boot, so user code can only lower them further.
        self.rlimits: dict[str, list[int]] = raw.get("rlimits") or {}
        # Extra import roots for the agent's lazily imported parts (jupyter_client).
        self.python_path: list[str] = raw.get("python_path") or []
        self.kernel_python: str = raw.get("kernel_python") or _default_python()
        self.prestart_kernel: bool = bool(raw.get("prestart_kernel", False))
        # The agent runs as root of a template's root file system and acts as the user each
        # request names (`hutch.agent.users`); `workdir` is where commands start by default.
        self.rootful: bool = bool(raw.get("rootful", False))
        self.workdir: str = raw.get("workdir") or self.home
        # The runtime may ask the agent to close its socket, and bind it again on SIGUSR1
        # (gVisor's hibernation: `runsc checkpoint` cannot save a host socket).
        self.releasable: bool = bool(raw.get("releasable", False)) and self.socket_path is not None

    def user_home(self) -> str:
        """The home of the user the current request acts as (relative paths start there)."""
        if self.rootful:
            from hutch.agent.users import current

            user = current()
            if user is not None:
                return user.home
        return self.home

    def process_env(self) -> dict[str, str]:
        """The base environment of user processes."""
        env = {
            "HOME": self.home,
            "USER": self.user,
            "LOGNAME": self.user,
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
        }
        env.update(self.env)
        return env


def _default_python() -> str:
    import sys

    return sys.executable
