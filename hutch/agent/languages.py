"""The languages of the code interpreter: which kernel runs each, and how to set its environment.

Python runs on the template's own Python with hutch's command line (`Interpreter._kernel_argv`).
Every other language runs the Jupyter kernel that the sandbox's file system has a kernelspec for
(`share/jupyter/kernels/*/kernel.json` below the kernel Python's prefix, `/usr/local` or `/usr`),
matched on the spec's `language`: the code-interpreter template installs Deno's kernel (which
serves JavaScript and TypeScript), `bash_kernel` and IRkernel. A template without one answers a
400 that names what is missing, so a language is only as available as its kernel.

Standard library only: the agent imports this at boot.
"""

from __future__ import annotations

import json
import os
import shlex

PYTHON = "python"
# What E2B's SDKs send (and the usual short names) -> the language's name here.
ALIASES = {
    "python": PYTHON, "python3": PYTHON, "py": PYTHON, "ipython": PYTHON,
    "javascript": "javascript", "js": "javascript", "node": "javascript", "deno": "javascript",
    "typescript": "typescript", "ts": "typescript",
    "bash": "bash", "sh": "bash", "shell": "bash",
    "r": "r",
    "java": "java",
}  # fmt: skip
# A kernelspec's `language` -> the languages its kernel runs (Deno's spec says "typescript").
SPEC_LANGUAGES = {"typescript": ("javascript", "typescript"), "javascript": ("javascript",)}
# What installs each language's kernel, for the error that says it is missing.
MISSING = {
    "javascript": "Deno's Jupyter kernel (npm package 'deno', kernelspec 'deno')",
    "typescript": "Deno's Jupyter kernel (npm package 'deno', kernelspec 'deno')",
    "bash": "bash_kernel (PyPI package 'bash_kernel', kernelspec 'bash')",
    "r": "IRkernel (Debian packages 'r-base-core' and 'r-cran-irkernel')",
    "java": "a Java Jupyter kernel, which this template does not install (Debian packages none)",
}


class KernelSpec:
    """How to start one language's kernel, from its kernel.json."""

    __slots__ = ("argv", "env", "interrupt_mode", "name", "transport")

    def __init__(self, name: str, argv: list[str], env: dict[str, str], interrupt_mode: str = "signal") -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.interrupt_mode = interrupt_mode
        # How the kernel names its sockets: ipykernel-based kernels (argv on a Python) use
        # jupyter_client's `ipc` names; Deno's speaks TCP only; others (IRkernel, node's) bind
        # `ipc://{ip}:{port}` ("ipc-colon", bridged by `hutch.agent.kernel`).
        command = os.path.basename(argv[0]) if argv else ""
        if command.startswith("python"):
            self.transport = "ipc"
        elif command == "deno":
            self.transport = "tcp"
            self.interrupt_mode = "message"  # SIGINT ends Deno's kernel; it takes interrupt_request
        else:
            self.transport = "ipc-colon"


def kernel_dirs(kernel_python: str) -> list[str]:
    """Where kernelspecs are looked for, first match wins."""
    prefix = os.path.dirname(os.path.dirname(kernel_python))
    dirs = [os.path.join(prefix, "share", "jupyter", "kernels"), "/usr/local/share/jupyter/kernels"]
    dirs.append("/usr/share/jupyter/kernels")
    return list(dict.fromkeys(dirs))


def find_kernels(kernel_python: str) -> dict[str, KernelSpec]:
    """The languages other than Python that this file system has a kernel for."""
    found: dict[str, KernelSpec] = {}
    for directory in kernel_dirs(kernel_python):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(directory, name, "kernel.json"), "rb") as f:
                    spec = json.load(f)
                argv = [str(a) for a in spec["argv"]]
                language = str(spec.get("language", "")).lower()
                env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
                interrupt_mode = str(spec.get("interrupt_mode") or "signal")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not a kernelspec we can read
            if not argv or language in ("python", ""):
                continue
            for lang in SPEC_LANGUAGES.get(language, (ALIASES.get(language, language),)):
                found.setdefault(lang, KernelSpec(name, argv, env, interrupt_mode))
    return found


def canonical(value: object) -> str:
    """The language a request names; raises ValueError (with the reason) for anything else."""
    if value is None or value == "":
        return PYTHON
    if not isinstance(value, str):
        raise ValueError("language must be a string")
    language = ALIASES.get(value.strip().lower())
    if language is None:
        raise ValueError(f"language '{value}' is not supported (supported: {', '.join(sorted(set(ALIASES.values())))})")
    return language


# -- environment variables as each language sets them --------------------------------------------


def _js(value: str) -> str:
    return json.dumps(value)


def _r(value: str) -> str:
    # R's string escapes are JSON's, except that it reads "\uD83D\uDE00" as two characters.
    return json.dumps(value, ensure_ascii=False)


def set_env(language: str, env: dict[str, str]) -> str:
    """Code for a non-Python kernel that sets `env` in its process environment."""
    if language == "bash":
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    if language in ("javascript", "typescript"):
        return ";".join(f"Deno.env.set({_js(k)}, {_js(v)})" for k, v in env.items())
    if language == "r":
        return "invisible(Sys.setenv(" + ", ".join(f"{_r(k)} = {_r(v)}" for k, v in env.items()) + "))"
    return ""


def unset_env(language: str, keys: list[str]) -> str:
    """Code for a non-Python kernel that removes `keys` from its process environment."""
    if language == "bash":
        return "unset " + " ".join(keys)
    if language in ("javascript", "typescript"):
        return ";".join(f"Deno.env.delete({_js(k)})" for k in keys)
    if language == "r":
        return "invisible(Sys.unsetenv(c(" + ", ".join(_r(k) for k in keys) + ")))"
    return ""


def valid_env_name(language: str, name: str) -> bool:
    """Whether `name` can be set in this language's kernel (bash takes identifiers only)."""
    if language == "bash":
        return name.isidentifier() and name.isascii()
    return True
