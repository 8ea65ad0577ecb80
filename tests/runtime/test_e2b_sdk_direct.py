"""The official e2b and e2b-code-interpreter SDKs, unchanged, against one sandboxed agent.

The SDK's Sandbox is built directly (no control plane is involved yet) with its sandbox URL
pointed at a TCP bridge to the instance's Unix socket; every call it makes is the real
in-sandbox protocol, with E2B's routing headers.
"""

from __future__ import annotations

import pytest
from e2b import ConnectionConfig, FileType, NotFoundException
from e2b.sandbox_sync.commands.command_handle import CommandExitException
from e2b_code_interpreter import Sandbox as CodeSandbox
from packaging.version import Version

from tests.bridge import TcpToUnixBridge

pytestmark = pytest.mark.sandbox


@pytest.fixture
def sdk(sandbox):
    bridge = TcpToUnixBridge(str(sandbox.instance.socket_path))
    config = ConnectionConfig(api_key="e2b_unused", sandbox_url=bridge.url, request_timeout=30)
    box = CodeSandbox(
        sandbox_id="direct-test",
        envd_version=Version("0.6.4"),
        envd_access_token=None,
        sandbox_domain=None,
        connection_config=config,
    )
    yield box
    bridge.close()


def test_commands_run_in_the_sandbox_home_as_user(sdk):
    result = sdk.commands.run("echo hello; whoami; pwd")
    assert result.stdout == "hello\nuser\n/home/user\n"
    assert result.exit_code == 0
    with pytest.raises(CommandExitException) as failed:
        sdk.commands.run("echo oops >&2; exit 7")
    assert failed.value.exit_code == 7 and "oops" in failed.value.stderr


def test_background_commands_can_be_listed_fed_and_killed(sdk):
    echo = sdk.commands.run("cat", background=True, stdin=True)
    assert any(p.pid == echo.pid for p in sdk.commands.list())
    sdk.commands.send_stdin(echo.pid, "piped\n")
    sdk.commands.close_stdin(echo.pid)
    assert echo.wait().stdout == "piped\n"

    sleeper = sdk.commands.run("sleep 60", background=True)
    reattached = sdk.commands.connect(sleeper.pid)
    assert sdk.commands.kill(sleeper.pid)
    with pytest.raises(CommandExitException) as killed:
        reattached.wait()
    assert killed.value.exit_code != 0
    assert all(p.pid != sleeper.pid for p in sdk.commands.list())


def test_files_write_read_list_and_remove(sdk):
    info = sdk.files.write("notes/hello.txt", "hi from the sdk")
    assert info.path == "/home/user/notes/hello.txt"
    assert sdk.files.read("notes/hello.txt") == "hi from the sdk"
    entries = sdk.files.list("notes")
    assert [(e.name, e.type) for e in entries] == [("hello.txt", FileType.FILE)]
    assert sdk.commands.run("cat /home/user/notes/hello.txt").stdout == "hi from the sdk"
    sdk.files.remove("notes/hello.txt")
    assert not sdk.files.exists("notes/hello.txt")
    with pytest.raises(NotFoundException):
        sdk.files.read("notes/hello.txt")


def test_run_code_keeps_state_and_returns_rich_results(sdk):
    sdk.run_code("x = 41")
    execution = sdk.run_code("x + 1")
    assert execution.text == "42"
    chart = sdk.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert any(result.png for result in chart.results)
    failure = sdk.run_code("1 / 0")
    assert failure.error is not None and failure.error.name == "ZeroDivisionError"
