"""The official e2b and e2b-code-interpreter SDKs, unchanged, against one sandboxed agent.

The SDK's Sandbox is built directly (no control plane is involved yet) with its sandbox URL
pointed at a TCP bridge to the instance's Unix socket; every call it makes is the real
in-sandbox protocol, with E2B's routing headers.
"""

from __future__ import annotations

import pytest
from e2b import ConnectionConfig, FileType, NotFoundException, SandboxException
from e2b.sandbox_sync.commands.command_handle import CommandExitException
from e2b_code_interpreter import Sandbox as CodeSandbox
from packaging.version import Version

from tests.bridge import TcpToUnixBridge

pytestmark = pytest.mark.sandbox


def code_sandbox(sandbox, request_timeout: float = 30):
    """The SDK's Sandbox for this instance, through a TCP bridge to its socket."""
    bridge = TcpToUnixBridge(str(sandbox.instance.socket_path))
    config = ConnectionConfig(api_key="e2b_unused", sandbox_url=bridge.url, request_timeout=request_timeout)
    box = CodeSandbox(
        sandbox_id="direct-test",
        envd_version=Version("0.6.4"),
        envd_access_token=None,
        sandbox_domain=None,
        connection_config=config,
    )
    yield box
    bridge.close()


@pytest.fixture
def sdk(sandbox):
    yield from code_sandbox(sandbox)


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


# -- the other languages and E2B's result formats, with the SDK's own parsing ----------------------


@pytest.fixture
def roomy_sdk(make_sandbox):
    """A sandbox with room for every kernel at once (Python, Deno, bash and R)."""
    yield from code_sandbox(make_sandbox(memory_mb=1536), request_timeout=60)


def test_javascript_typescript_bash_and_r_run_statefully_with_envs_cwd_and_errors(roomy_sdk):
    sdk = roomy_sdk
    home = sdk.run_code("import os\nos.getcwd()").text
    languages = {context.language for context in sdk.list_code_contexts()}
    assert {"python", "javascript", "typescript", "bash", "r"} <= languages

    # JavaScript and TypeScript: Deno's kernel, ES modules and top-level await.
    sdk.run_code("let n = 41", language="js")
    assert sdk.run_code("n + 1", language="javascript").text == "42"
    assert sdk.run_code("const t: number = await Promise.resolve(6); t * 7", language="ts").text == "42"
    assert sdk.run_code("import { join } from 'node:path'; join('a', 'b')", language="js").text == "a/b"
    env = sdk.run_code("`${Deno.env.get('GREETING')} ${Deno.cwd()}`", language="js", envs={"GREETING": "hi"})
    assert env.text == f"hi {home}"
    assert sdk.run_code("String(Deno.env.get('GREETING'))", language="js").text == "undefined"
    thrown = sdk.run_code("throw new TypeError('bad input')", language="js")
    assert (thrown.error.name, thrown.error.value) == ("TypeError", "bad input")
    assert "bad input" in thrown.error.traceback

    # Bash: bash_kernel.
    sdk.run_code("COUNT=41", language="bash")
    out = sdk.run_code("echo $((COUNT + 1)) $GREETING; pwd", language="bash", envs={"GREETING": "hey"})
    assert "".join(out.logs.stdout) == f"42 hey\n{home}\n"
    assert "".join(sdk.run_code('echo "[$GREETING]"', language="bash").logs.stdout) == "[]\n"
    failed = sdk.run_code("ls /no/such/dir", language="bash")
    assert failed.error is not None and failed.error.value == "2"

    # R: IRkernel (its values are display data, as in E2B).
    sdk.run_code("x <- 41", language="r")
    assert sdk.run_code("x + 1", language="r").results[0].text == "[1] 42"
    r_env = sdk.run_code("cat(Sys.getenv('GREETING'), getwd())", language="r", envs={"GREETING": "hola"})
    assert "".join(r_env.logs.stdout) == f"hola {home}"
    stopped = sdk.run_code("stop('boom')", language="r")
    assert stopped.error is not None and "boom" in stopped.error.value

    # Contexts of another language: own state, own cwd, restart and remove.
    ctx = sdk.create_code_context(cwd="/tmp", language="typescript")
    assert ctx.language == "typescript" and ctx.cwd == "/tmp"
    sdk.run_code("const mine = 'ctx'", context=ctx)
    assert sdk.run_code("Deno.cwd() + ' ' + mine", context=ctx).text == "/tmp ctx"
    assert sdk.run_code("typeof mine", language="ts").text == "undefined"
    sdk.restart_code_context(ctx)
    assert sdk.run_code("typeof mine", context=ctx).text == "undefined"
    sdk.remove_code_context(ctx)
    assert ctx.id not in {context.id for context in sdk.list_code_contexts()}

    with pytest.raises(SandboxException, match=r"400.*no kernel.*Java Jupyter kernel"):
        sdk.run_code("1", language="java")


def test_charts_dataframes_and_images_come_back_as_e2b_shapes_them(sdk):
    streamed: list = []
    charts = sdk.run_code(
        "import matplotlib.pyplot as plt\n"
        "import datetime\n"
        "plt.plot([1, 2, 3], [1, 4, 9], label='squares'); plt.title('line'); plt.xlabel('x (s)'); plt.show()\n"
        "plt.bar(['a', 'b', 'c'], [3, 1, 2]); plt.title('bar'); plt.show()\n"
        "plt.scatter([1, 2], [3, 4], label='dots'); plt.show()\n"
        "plt.pie([1, 3], labels=['one', 'three']); plt.show()\n"
        "plt.boxplot([[1, 2, 3, 4, 5], [2, 4, 6, 8, 10]], patch_artist=True); plt.show()\n"
        "plt.plot([1, 10, 100]); plt.yscale('log'); plt.show()\n"
        "days = [datetime.date(2024, 1, d) for d in (1, 2, 3)]\n"
        "plt.plot(days, [1, 2, 3]); plt.show()\n"
        "fig, (left, right) = plt.subplots(1, 2); left.plot([1, 2]); right.bar(['u'], [1]); fig.suptitle('both')\n"
        "plt.show()\n",
        on_result=streamed.append,
    )
    assert charts.error is None, charts.error
    assert [result.chart for result in streamed] == [result.chart for result in charts.results]  # each as it came
    kinds = [result.chart.type.value for result in charts.results]
    assert kinds == ["line", "bar", "scatter", "pie", "box_and_whisker", "line", "line", "superchart"]
    assert all(result.png for result in charts.results)  # the picture beside the data
    line, bar, scatter, pie, box, log, dates, both = (result.chart for result in charts.results)
    assert (line.title, line.x_label, line.x_unit) == ("line", "x (s)", "s")
    assert line.elements[0].label == "squares"
    assert [tuple(map(float, p)) for p in line.elements[0].points] == [(1, 1), (2, 4), (3, 9)]
    assert [(e.label, e.value) for e in bar.elements] == [("a", 3), ("b", 1), ("c", 2)]
    assert [tuple(map(float, p)) for p in scatter.elements[0].points] == [(1, 3), (2, 4)]
    assert [e.label for e in pie.elements] == ["one", "three"]
    assert [e.angle for e in pie.elements] == [90, 270]
    assert [(e.min, e.median, e.max) for e in box.elements] == [(1, 3, 5), (2, 6, 10)]
    assert log.y_scale.value == "log"
    assert dates.x_scale.value == "datetime"
    assert both.title == "both" and [c.type.value for c in both.elements] == ["line", "bar"]

    frame = sdk.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})")
    result = frame.results[0]
    assert result.is_main_result
    assert result.data == {"a": [1, 2], "b": ["x", None]}
    assert "<table" in result.html and result.text.startswith("   a")

    image = sdk.run_code("from PIL import Image\nImage.new('RGB', (3, 2), 'red').show()")
    assert image.error is None and len(image.results) == 1 and image.results[0].png

    saved = sdk.run_code("import matplotlib.pyplot as plt\nplt.plot([3, 2, 1])\nplt.savefig('plot.png')")
    assert [r.chart.type.value for r in saved.results] == ["line"]  # the cell's figure is shown too
