"""hutch as an MCP server: the tools an agent needs to work in sandboxes.

`build_server(open_sandboxes)` defines the tools once; `hutch mcp` serves them over stdio (acting
as the tenant of `HUTCH_API_KEY` on the server at `HUTCH_URL`) and `hutch serve` over Streamable
HTTP at `/mcp` (acting as the tenant of each request's API key): see `hutch.mcp.endpoint`.
`open_sandboxes(ctx)` gives a tool the `Sandboxes` of its caller.

Tools: `create_sandbox`, `list_sandboxes`, `run_code` (stateful: one interpreter context per
sandbox, so `x = 1` then `x + 1` gives 2), `run_command`, `read_file`, `write_file`,
`list_files`, `end_sandbox`. Tools that act on a sandbox take `sandbox_id`, declared with
`x-mcp-header: Sandbox-Id`, so 2026-07-28 clients mirror it into `Mcp-Param-Sandbox-Id` for
routers in front.

This module is the MCP tools' error boundary: a `hutch.errors.HutchError` (an unknown or ended
sandbox, another tenant's, a quota, a bad path) becomes a tool error (`isError`) whose text is
the error's message; anything else is the SDK's generic tool error, logged with its traceback.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from hutch import __version__
from hutch.errors import HutchError
from hutch.mcp.sandboxes import Sandboxes

DEFAULT_TEMPLATE = "code-interpreter-v1"
SANDBOX_HOME = "/home/user"

OpenSandboxes = Callable[[Context], AbstractAsyncContextManager[Sandboxes]]

SandboxId = Annotated[
    str,
    Field(
        description="The sandbox, as create_sandbox returned it.",
        json_schema_extra={"x-mcp-header": "Sandbox-Id"},
    ),
]

INSTRUCTIONS = """\
Sandboxes are isolated Linux machines (user `user`, home /home/user, Python 3 with a Jupyter
kernel) that live until ended, their TTL, or their idle timeout. Create one with create_sandbox
and pass its sandboxId to the other tools. run_code keeps its state between calls (variables,
imports); run_command runs one shell command to its end. Files persist in /home/user for the
sandbox's life. No network access beyond the sandbox itself."""

P = ParamSpec("P")
R = TypeVar("R")


def _tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """hutch's errors become tool errors the model can read and act on."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except HutchError as exc:
            raise ToolError(exc.message) from exc

    return wrapper


def _sandbox(session: dict) -> dict[str, Any]:
    return {
        "sandboxId": session["sessionId"],
        "template": session["functionName"],
        "createdAt": session.get("createdTime"),
        "expiresAt": session.get("expireTime"),
        "idleTimeoutSeconds": session.get("sessionIdleTimeoutInSeconds"),
    }


def build_server(open_sandboxes: OpenSandboxes) -> MCPServer:
    """The MCP server with hutch's sandbox tools, each acting as the caller `open_sandboxes` gives."""
    server = MCPServer("hutch", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")

    @server.tool()
    @_tool_errors
    async def create_sandbox(
        ctx: Context,
        template: Annotated[str, Field(description="The function to start (no user server).")] = DEFAULT_TEMPLATE,
        timeout_seconds: Annotated[int | None, Field(description="Lifetime, 1-21600 s.", ge=1, le=21600)] = None,
        idle_timeout_seconds: Annotated[
            int | None, Field(description="Ended after this long unused (0: never).", ge=0, le=21600)
        ] = None,
    ) -> dict[str, Any]:
        """Start a new sandbox; returns its sandboxId for the other tools."""
        async with open_sandboxes(ctx) as sandboxes:
            return _sandbox(await sandboxes.create(template, timeout_seconds, idle_timeout_seconds))

    @server.tool()
    @_tool_errors
    async def list_sandboxes(ctx: Context) -> list[dict[str, Any]]:
        """Your live sandboxes, newest first."""
        async with open_sandboxes(ctx) as sandboxes:
            return [_sandbox(s) for s in await sandboxes.list()]

    @server.tool()
    @_tool_errors
    async def run_code(
        ctx: Context,
        sandbox_id: SandboxId,
        code: Annotated[str, Field(description="The code to run.")],
        language: Annotated[
            str,
            Field(description="The interpreter's language: python, javascript, typescript, bash or r."),
        ] = "python",
        timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 300,
    ) -> dict[str, Any]:
        """Run code in the sandbox's interpreter; variables and imports persist between calls.

        Returns `text` (the value of the last expression), `stdout`, `stderr`, all `results`
        (rich outputs such as PNG charts, base64) and `error` (name, value, traceback) if the code raised.
        """
        async with open_sandboxes(ctx) as sandboxes:
            return await sandboxes.run_code(sandbox_id, code, language, timeout_seconds)

    @server.tool()
    @_tool_errors
    async def run_command(
        ctx: Context,
        sandbox_id: SandboxId,
        command: Annotated[str, Field(description="A shell command line (bash -l -c).")],
        cwd: Annotated[str | None, Field(description="Working directory (default: /home/user).")] = None,
        timeout_seconds: Annotated[int, Field(ge=1, le=3600, description="Killed after this long.")] = 60,
    ) -> dict[str, Any]:
        """Run a shell command to its end; returns exitCode, stdout, stderr and timedOut."""
        async with open_sandboxes(ctx) as sandboxes:
            return await sandboxes.run_command(sandbox_id, command, cwd, timeout_seconds)

    @server.tool()
    @_tool_errors
    async def read_file(
        ctx: Context,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="Absolute, or relative to /home/user.")],
    ) -> dict[str, Any]:
        """A file's content: text (UTF-8) or, for other bytes, base64 (see `encoding`)."""
        async with open_sandboxes(ctx) as sandboxes:
            data = await sandboxes.read_file(sandbox_id, path)
        try:
            return {"path": path, "encoding": "utf-8", "content": data.decode("utf-8"), "size": len(data)}
        except UnicodeDecodeError:
            return {"path": path, "encoding": "base64", "content": base64.b64encode(data).decode(), "size": len(data)}

    @server.tool()
    @_tool_errors
    async def write_file(
        ctx: Context,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="Absolute, or relative to /home/user; parents are made.")],
        content: str,
        encoding: Literal["utf-8", "base64"] = "utf-8",
    ) -> dict[str, Any]:
        """Write a file (replacing it), from text or base64."""
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode("utf-8")
        except ValueError:
            raise ToolError("content is not valid base64") from None
        async with open_sandboxes(ctx) as sandboxes:
            await sandboxes.write_file(sandbox_id, path, data)
        return {"path": path, "size": len(data)}

    @server.tool()
    @_tool_errors
    async def list_files(
        ctx: Context,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="A directory.")] = SANDBOX_HOME,
    ) -> list[dict[str, Any]]:
        """The entries of a directory: name, path, type (file or dir), size."""
        async with open_sandboxes(ctx) as sandboxes:
            entries = await sandboxes.list_files(sandbox_id, path)
        return [
            {
                "name": e.get("name"),
                "path": e.get("path"),
                "type": "dir" if "DIRECTORY" in str(e.get("type", "")).upper() else "file",
                "size": int(e.get("size", 0) or 0),
            }
            for e in entries
        ]

    @server.tool()
    @_tool_errors
    async def end_sandbox(ctx: Context, sandbox_id: SandboxId) -> dict[str, Any]:
        """End a sandbox now: its processes stop and its files are deleted."""
        async with open_sandboxes(ctx) as sandboxes:
            session = await sandboxes.end(sandbox_id)
        return {"sandboxId": sandbox_id, "template": session["functionName"], "ended": True}

    return server
