"""A tenant's sandboxes, as hutch's MCP tools use them: through hutch's own HTTP API and gateway.

Every call carries the caller's API key, so a tool can do exactly what that key can, no more:
the tenant scoping is hutch's own (the API and the gateway check the key), not re-implemented
here. A sandbox is a session of a function without a user server (`code-interpreter-v1` by
default); its id is the session id. In-sandbox calls address it by path
(`/functions/{name}/sessions/{id}/...`) and reach the instance's agent: `/execute` (the code
interpreter, one persistent context per sandbox), envd's `process.Process/Start` (Connect,
enveloped JSON) and `filesystem.Filesystem/ListDir`, and `/files`.

The same class serves `hutch mcp` (an `httpx.AsyncClient` to `HUTCH_URL`) and the MCP endpoint of
`hutch serve` (an in-process ASGI transport to the server itself). Answers are read as they come
and what a call keeps of a sandbox's output is capped (`OUTPUT_CAP`, `RESULTS_CAP`, `FILE_CAP`):
a sandbox writing gigabytes must not make hutch hold them. It raises `hutch.errors`; the MCP
server turns them into tool errors.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from hutch.agent import envelope
from hutch.client import error_of
from hutch.errors import DeadlineExceeded, FailedPrecondition, HutchError, InvalidArgument, NotFound, Unavailable

CONNECT_STREAM = "application/connect+json"
# What one tool call keeps of a sandbox's output (bytes), so that no sandbox can make hutch (or
# `hutch mcp`) hold more: per stream of a command or a cell, rich results of a cell, one file.
OUTPUT_CAP = 1024 * 1024
RESULTS_CAP = 16 * 1024 * 1024
MAX_LINE = RESULTS_CAP + 1024 * 1024
FILE_CAP = 16 * 1024 * 1024
KILL_GRACE_S = 2  # after a command's timeout, SIGTERM, then SIGKILL this much later
EXTRA_WAIT_S = 15  # the HTTP call may take this much longer than the command itself


class Sandboxes:
    """One tenant's sandboxes (the tenant of the API key `http` sends)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise DeadlineExceeded("hutch did not answer in time") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach hutch: {exc or exc.__class__.__name__}") from None
        if response.status_code >= 400:
            raise error_of(response)
        return response

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """An answer read as it comes (`_call`'s errors); closing it early is a disconnect."""
        try:
            async with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_of(response)
                yield response
        except httpx.TimeoutException:
            raise DeadlineExceeded("hutch did not answer in time") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach hutch: {exc or exc.__class__.__name__}") from None

    # -- lifecycle -------------------------------------------------------------------------------

    async def create(self, template: str, ttl_s: int | None, idle_timeout_s: int | None) -> dict:
        """A new sandbox of function `template`.

        Raises:
            NotFound: no such function.
            FailedPrecondition: the function runs a user server (its traffic goes there, not to the agent).
            QuotaExceeded: the tenant is at its quota of live sessions.
        """
        function = (await self._call("GET", f"/v1/functions/{template}")).json()
        if function.get("port") is not None:
            raise FailedPrecondition(
                f"function {template} runs its own server on port {function['port']}: sandbox tools need a "
                "function without one (base, code-interpreter-v1, or one of yours without startCommand)"
            )
        body: dict[str, Any] = {}
        if ttl_s is not None:
            body["sessionTTLInSeconds"] = ttl_s
        if idle_timeout_s is not None:
            body["sessionIdleTimeoutInSeconds"] = idle_timeout_s
        return (await self._call("POST", f"/v1/functions/{template}/sessions", json=body)).json()

    async def list(self) -> list[dict]:
        """The tenant's live sessions, newest first."""
        found: list[dict] = []
        token = None
        while True:
            params: dict[str, Any] = {"status": "Active", "limit": 1000}
            if token:
                params["nextToken"] = token
            page = (await self._call("GET", "/v1/sessions", params=params)).json()
            found += page["sessions"]
            token = page.get("nextToken")
            if not token:
                return found

    async def find(self, sandbox_id: str) -> dict:
        """The live session with this id.

        Raises:
            NotFound: none (it ended, or it never existed for this tenant).
            InvalidArgument: sessions of several functions have this id.
        """
        matches = [s for s in await self.list() if s["sessionId"] == sandbox_id]
        if not matches:
            raise NotFound(f"no live sandbox {sandbox_id!r}: it ended or never existed (list_sandboxes shows yours)")
        if len(matches) > 1:
            names = ", ".join(sorted(s["functionName"] for s in matches))
            raise InvalidArgument(f"sessions of several functions ({names}) have id {sandbox_id!r}")
        return matches[0]

    async def end(self, sandbox_id: str) -> dict:
        session = await self.find(sandbox_id)
        await self._call("DELETE", f"/v1/functions/{session['functionName']}/sessions/{sandbox_id}")
        return session

    async def _base(self, sandbox_id: str) -> str:
        session = await self.find(sandbox_id)
        return f"/functions/{session['functionName']}/sessions/{sandbox_id}"

    # -- inside the sandbox ----------------------------------------------------------------------

    async def run_code(self, sandbox_id: str, code: str, language: str, timeout_s: float) -> dict:
        """Run code in the sandbox's default interpreter context, whose state persists across calls.
        Output past the caps is dropped and the cell interrupted (`truncated`)."""
        base = await self._base(sandbox_id)
        body = {"code": code, "language": language}
        out: dict[str, Any] = {"text": None, "stdout": "", "stderr": "", "results": [], "error": None}
        kept = {"stdout": 0, "stderr": 0, "results": 0}
        truncated = False
        async with self._stream("POST", f"{base}/execute", json=body, timeout=timeout_s + EXTRA_WAIT_S) as response:
            pending = bytearray()
            async for chunk in response.aiter_bytes():
                pending += chunk
                end = pending.rfind(b"\n")
                if end < 0:
                    if len(pending) > MAX_LINE:
                        truncated = True  # one output item larger than the caps: stop (the cell is interrupted)
                        break
                    continue
                lines = bytes(pending[:end]).split(b"\n")
                del pending[: end + 1]
                for line in lines:
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    kind = item.get("type")
                    if kind in ("stdout", "stderr"):
                        text = item.get("text", "")
                        room = OUTPUT_CAP - kept[kind]
                        out[kind] += text[:room]
                        kept[kind] += min(len(text), room)
                        truncated |= len(text) > room
                    elif kind == "result":
                        result = {k: v for k, v in item.items() if k != "type" and v not in (None, False)}
                        size = len(line)
                        if kept["results"] + size > RESULTS_CAP:
                            truncated = True
                            continue
                        kept["results"] += size
                        out["results"].append(result)
                        if item.get("is_main_result"):
                            out["text"] = item.get("text")
                    elif kind == "error":
                        out["error"] = {k: item.get(k) for k in ("name", "value", "traceback")}
                if truncated and max(kept["stdout"], kept["stderr"]) >= OUTPUT_CAP:
                    break  # closing the answer interrupts the cell
        if truncated:
            out["truncated"] = True
        return out

    async def run_command(self, sandbox_id: str, command: str, cwd: str | None, timeout_s: int) -> dict:
        """Run a shell command (`bash -l -c`) to its end, or until `timeout_s` (then it is killed).
        stdout and stderr are kept up to `OUTPUT_CAP` each: a command that writes more is killed
        (`truncated`), so that no command can make hutch hold its output."""
        base = await self._base(sandbox_id)
        # coreutils `timeout` ends the command in the sandbox itself, whatever happens to this call.
        args = [f"--kill-after={KILL_GRACE_S}", str(timeout_s), "/bin/bash", "-l", "-c", command]
        process: dict[str, Any] = {"cmd": "/usr/bin/timeout", "args": args}
        if cwd:
            process["cwd"] = cwd
        output = {"stdout": b"", "stderr": b""}
        exit_code = None
        pid = None
        truncated = False
        async with self._stream(
            "POST",
            f"{base}/process.Process/Start",
            content=envelope.encode({"process": process}),
            headers={"content-type": CONNECT_STREAM},
            timeout=timeout_s + KILL_GRACE_S + EXTRA_WAIT_S,
        ) as response:
            decoder = envelope.Decoder()
            async for chunk in response.aiter_bytes():
                for flags, message in decoder.feed(chunk):
                    if flags & envelope.FLAG_END_STREAM:
                        if "error" in message:
                            error = message["error"]
                            raise HutchError(f"the command failed to run: {error.get('message', error)}")
                        continue
                    event = message.get("event", {})
                    pid = event.get("start", {}).get("pid", pid)
                    for stream, data in event.get("data", {}).items():
                        if stream in output:
                            data = base64.b64decode(data)
                            room = OUTPUT_CAP - len(output[stream])
                            output[stream] += data[:room]
                            if len(data) > room and not truncated:
                                truncated = True
                                if pid is not None:
                                    await self._kill(base, pid)
                    if "end" in event:
                        exit_code = event["end"].get("exitCode", 0)
        stderr = output["stderr"].decode(errors="replace")
        if truncated:
            stderr += f"\n[hutch: more than {OUTPUT_CAP} bytes of output: the command was stopped]"
        result = {
            "exitCode": exit_code,
            "stdout": output["stdout"].decode(errors="replace"),
            "stderr": stderr,
            "timedOut": exit_code in (124, 137),
        }
        if truncated:
            result["truncated"] = True
        return result

    async def _kill(self, base: str, pid: int) -> None:
        """SIGKILL a process started in the sandbox (and its process group)."""
        message = {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}
        with contextlib.suppress(HutchError):
            await self._call("POST", f"{base}/process.Process/SendSignal", json=message)

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        """A file's bytes, up to `FILE_CAP` (a bigger one is an error that says so)."""
        base = await self._base(sandbox_id)
        too_big = FailedPrecondition(
            f"'{path}' is larger than {FILE_CAP} bytes, the most read_file returns: read it in parts "
            "(run_command with head/tail/split) or download it with the files API"
        )
        identity = {"accept-encoding": "identity"}  # sizes as they are; the cap applies to what is kept anyway
        async with self._stream("GET", f"{base}/files", params={"path": path}, headers=identity) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > FILE_CAP:
                raise too_big
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > FILE_CAP:
                    raise too_big
        return bytes(data)

    async def write_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        base = await self._base(sandbox_id)
        headers = {"content-type": "application/octet-stream"}
        await self._call("POST", f"{base}/files", params={"path": path}, content=data, headers=headers)

    async def list_files(self, sandbox_id: str, path: str) -> builtins.list[dict[str, Any]]:
        base = await self._base(sandbox_id)
        answer = await self._call("POST", f"{base}/filesystem.Filesystem/ListDir", json={"path": path, "depth": 1})
        return answer.json().get("entries", [])
