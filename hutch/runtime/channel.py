"""The host's side of the only channel into an instance: HTTP over the agent's Unix socket.

Used by the runtime (readiness), the scheduler (health, `/init`), tests and benchmarks. The
gateway forwards raw client traffic over the same socket and needs none of these helpers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hutch.agent import envelope
from hutch.errors import DeadlineExceeded, Unavailable, from_status, from_wire

STREAM_TYPE = "application/connect+json"


@dataclass
class CommandResult:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    pid: int = 0
    status: str = ""
    events: list[dict] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def user_header(user: str | None) -> dict[str, str]:
    """E2B's way to name who runs a command: `Authorization: Basic base64("<user>:")`."""
    if not user:
        return {}
    return {"authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


class AgentChannel:
    def __init__(self, socket_path: Path | str, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self._client = httpx.AsyncClient(
            # Plain HTTP over a Unix socket: no TLS, so no SSL context (httpx builds one per
            # transport otherwise, ~20 ms: more than a bwrap cold start's other steps).
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
            base_url="http://sandbox",
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AgentChannel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        return self._client

    async def health(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=5)).status_code == 204
        except httpx.HTTPError:
            return False

    async def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await self._client.get("/health", timeout=max(0.1, deadline - time.monotonic()))
                if response.status_code == 204:
                    return
            except (httpx.TransportError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"agent at {self.socket_path} not ready after {timeout:.1f}s")
            await asyncio.sleep(0.002)

    async def init(self, env: dict[str, str]) -> None:
        response = await self._client.post("/init", json={"envVars": env})
        _raise_for(response)

    async def run(
        self,
        cmd: str,
        *,
        shell: bool = True,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
        user: str | None = None,
        on_output: Callable[[bytes], None] | None = None,
    ) -> CommandResult:
        """Run a command to its end (`shell`: through `/bin/bash -l -c`, as E2B does), as `user`
        (None: the instance's default user); `on_output` sees its output as it comes."""
        process: dict[str, Any] = (
            {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]} if shell else {"cmd": cmd, "args": args or []}
        )
        if env:
            process["envs"] = env
        if cwd:
            process["cwd"] = cwd
        result = CommandResult(exit_code=-1)
        try:
            async with asyncio.timeout(timeout):
                async with self._client.stream(
                    "POST",
                    "/process.Process/Start",
                    content=envelope.encode({"process": process}),
                    headers={"content-type": STREAM_TYPE, **user_header(user)},
                    timeout=httpx.Timeout(timeout, connect=5),
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _raise_for(response)
                    decoder = envelope.Decoder()
                    async for chunk in response.aiter_raw():
                        for flags, message in decoder.feed(chunk):
                            if flags & envelope.FLAG_END_STREAM:
                                if "error" in message:
                                    error = message["error"]
                                    raise from_wire(error.get("code", ""), error.get("message", ""))
                                return result
                            event = message.get("event", {})
                            _apply_event(result, event)
                            if on_output is not None and "data" in event:
                                for data in event["data"].values():
                                    on_output(base64.b64decode(data))
        except TimeoutError:
            raise DeadlineExceeded(f"command did not finish within {timeout}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"lost the agent while running a command: {exc}") from None
        return result

    async def spawn(
        self, argv: list[str], tag: str | None = None, env: dict[str, str] | None = None, user: str | None = None
    ) -> int:
        """Start a background process and return its pid once started; it outlives this call."""
        process: dict = {"cmd": argv[0], "args": argv[1:]}
        if env:
            process["envs"] = env
        request: dict = {"process": process}
        if tag:
            request["tag"] = tag
        async with self._client.stream(
            "POST",
            "/process.Process/Start",
            content=envelope.encode(request),
            headers={"content-type": STREAM_TYPE, **user_header(user)},
        ) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for(response)
            decoder = envelope.Decoder()
            async for chunk in response.aiter_raw():
                for flags, message in decoder.feed(chunk):
                    if flags & envelope.FLAG_END_STREAM:
                        error = message.get("error", {})
                        raise from_wire(error.get("code", ""), error.get("message", "process did not start"))
                    return int(message["event"]["start"]["pid"])
        raise Unavailable("the agent closed the stream before the process started")

    async def follow(self, tag: str) -> AsyncIterator[dict]:
        """The events of the process with this tag from now on (envd `Connect`), until it ends
        or the instance goes; no read deadline (a quiet server may print nothing for hours)."""
        request = {"process": {"tag": tag}}
        async with self._client.stream(
            "POST",
            "/process.Process/Connect",
            content=envelope.encode(request),
            headers={"content-type": STREAM_TYPE},
            timeout=httpx.Timeout(None, connect=5),
        ) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for(response)
            decoder = envelope.Decoder()
            async for chunk in response.aiter_raw():
                for flags, message in decoder.feed(chunk):
                    if flags & envelope.FLAG_END_STREAM:
                        return
                    yield message.get("event", {})

    async def write_file(self, path: str, data: bytes) -> None:
        response = await self._client.post(
            "/files",
            params={"path": path},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        _raise_for(response)

    async def read_file(self, path: str) -> bytes:
        response = await self._client.get("/files", params={"path": path})
        _raise_for(response)
        return response.content

    async def execute(
        self, code: str, context_id: str | None = None, timeout: float = 120.0, language: str | None = None
    ) -> list[dict]:
        """Run code in the interpreter (the default context of `language`, Python's if None); the
        NDJSON lines of the answer."""
        lines = []
        body: dict = {"code": code, "context_id": context_id}
        if language is not None:
            body["language"] = language
        async with self._client.stream(
            "POST",
            "/execute",
            json=body,
            timeout=httpx.Timeout(timeout, connect=5),
        ) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                if line.strip():
                    lines.append(json.loads(line))
        return lines


def _apply_event(result: CommandResult, event: dict) -> None:
    result.events.append(event)
    if "start" in event:
        result.pid = event["start"].get("pid", 0)
    elif "data" in event:
        data = event["data"]
        if "stdout" in data:
            result.stdout += base64.b64decode(data["stdout"])
        if "stderr" in data:
            result.stderr += base64.b64decode(data["stderr"])
        if "pty" in data:
            result.stdout += base64.b64decode(data["pty"])
    elif "end" in event:
        end = event["end"]
        result.exit_code = end.get("exitCode", 0)
        result.status = end.get("status", "")


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        code, message = body.get("code"), body.get("message", response.text)
    except ValueError:
        code, message = None, response.text
    if isinstance(code, str):
        raise from_wire(code, message)
    raise from_status(response.status_code, message)
