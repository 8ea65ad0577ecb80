"""The code interpreter (`/execute`, `/contexts`) against a real agent process and real kernels.

One agent (and its default context) serves most tests: each test either uses state of its own
naming or a context of its own, so they stay independent while paying for few kernel starts.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from e2b import NotFoundException, SandboxException
from e2b_code_interpreter.models import Execution, extract_exception, parse_output

from tests.agent.conftest import start_agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    running = start_agent(tmp_path_factory.mktemp("interpreter"))
    try:
        yield running
    finally:
        running.client.close()
        stop_agent(running.proc)


def stop_agent(proc: subprocess.Popen) -> None:
    # SIGINT ends the agent through a normal interpreter exit, so its atexit cleanup runs.
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def execute(client: httpx.Client, code: str, **fields) -> list[dict]:
    resp = client.post("/execute", json={"code": code, **fields})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.text.endswith("\n") and "\n\n" not in resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def of_type(lines: list[dict], kind: str) -> list[dict]:
    return [line for line in lines if line["type"] == kind]


def main_text(lines: list[dict]) -> str | None:
    mains = [line for line in of_type(lines, "result") if line["is_main_result"]]
    assert len(mains) <= 1
    return mains[0].get("text") if mains else None


def create_context(client: httpx.Client, **fields) -> dict:
    resp = client.post("/contexts", json=fields)
    assert resp.status_code == 200, resp.text
    return resp.json()


def kernel_pids(parent_pid: int) -> list[int]:
    """The ipykernel processes whose parent is `parent_pid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent_pid and b"kernel_launch" in cmdline:
            pids.append(int(entry))
    return pids


def connection_file(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return argv[argv.index(b"-f") + 1].decode()


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- executions ----------------------------------------------------------------------------------


def test_state_persists_across_executions_in_the_default_context(agent):
    first = execute(agent.client, "state_x = 1")
    second = execute(agent.client, "state_x")
    assert [line["type"] for line in first] == ["number_of_executions", "end_of_execution"]
    assert [line["type"] for line in second] == ["number_of_executions", "result", "end_of_execution"]
    assert second[1] == {"type": "result", "text": "1", "is_main_result": True}
    assert second[0]["execution_count"] == first[0]["execution_count"] + 1


def test_a_forked_childs_output_arrives_over_a_unix_socket_not_tcp(agent):
    """ipykernel's pipe for forked subprocesses listens beside the connection file
    (`hutch.agent.kernel_launch`): the kernel holds no TCP socket, which gVisor cannot save."""
    code = (
        "import os\npid = os.fork()\n"
        "if pid == 0:\n    print('from the child', flush=True)\n    os._exit(0)\nos.waitpid(pid, 0)"
    )
    lines = execute(agent.client, code)
    assert "from the child" in "".join(line["text"] for line in of_type(lines, "stdout"))
    (pid,) = kernel_pids(agent.proc.pid)
    with open(f"/proc/{pid}/net/tcp") as f:
        inodes = {line.split()[9] for line in f.read().splitlines()[1:]}
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not {f"socket:[{inode}]" for inode in inodes} & held


def test_stdout_and_stderr_arrive_as_separate_timestamped_lines(agent):
    before = time.time_ns()
    lines = execute(agent.client, "import sys\nprint('to out')\n_ = sys.stderr.write('to err\\n')")
    after = time.time_ns()
    assert [line["text"] for line in of_type(lines, "stdout")] == ["to out\n"]
    assert [line["text"] for line in of_type(lines, "stderr")] == ["to err\n"]
    for line in of_type(lines, "stdout") + of_type(lines, "stderr"):
        assert isinstance(line["timestamp"], int)
        assert before - 10**9 < line["timestamp"] < after + 10**9
    assert main_text(lines) is None
    assert lines[-1] == {"type": "end_of_execution"}


def test_display_calls_are_results_and_the_last_expression_is_the_main_result(agent):
    code = (
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>bold</b>'))\n"
        "display({'text/plain': 'plain', 'text/markdown': '**md**', 'application/json': {'k': 1},"
        " 'application/x-custom': 'custom'}, raw=True)\n"
        "'the ' + 'answer'"
    )
    results = of_type(execute(agent.client, code), "result")
    assert len(results) == 3
    html, raw, main = results
    assert html["html"] == "<b>bold</b>" and html["is_main_result"] is False
    assert raw == {
        "type": "result",
        "text": "plain",
        "markdown": "**md**",
        "json": {"k": 1},
        "extra": {"application/x-custom": "custom"},
        "is_main_result": False,
    }
    # A string's repr quotes are dropped, as E2B does.
    assert main == {"type": "result", "text": "the answer", "is_main_result": True}


def test_an_exception_becomes_one_error_line_with_name_value_and_traceback(agent):
    lines = execute(agent.client, "def explode():\n    raise ValueError('bad value')\nexplode()")
    errors = of_type(lines, "error")
    assert len(errors) == 1
    error = errors[0]
    assert error["name"] == "ValueError"
    assert error["value"] == "bad value"
    assert "explode()" in error["traceback"] and "ValueError: bad value" in error["traceback"]
    assert "\x1b[" not in error["traceback"]  # plain text, no terminal colours
    assert lines[-1] == {"type": "end_of_execution"}


def test_a_matplotlib_figure_comes_back_as_a_png_result(agent):
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    resp = agent.client.post("/execute", json={"code": code}, timeout=120)
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert of_type(lines, "error") == []
    pngs = [line for line in of_type(lines, "result") if "png" in line]
    assert len(pngs) == 1
    assert pngs[0]["is_main_result"] is False
    assert base64.b64decode(pngs[0]["png"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_env_vars_are_visible_to_one_execution_only(agent):
    execute(agent.client, "import os\nos.environ['HUTCH_KEEP'] = 'original'")
    read = "import os\n(os.environ.get('HUTCH_KEEP'), os.environ.get('HUTCH_ONLY'))"
    during = execute(agent.client, read, env_vars={"HUTCH_KEEP": "override", "HUTCH_ONLY": "scoped"})
    after = execute(agent.client, read)
    assert main_text(during) == "('override', 'scoped')"
    assert main_text(after) == "('original', None)"


def test_environment_set_with_init_reaches_a_running_kernel(agent):
    execute(agent.client, "1")  # the kernel is running before /init
    assert agent.client.post("/init", json={"envVars": {"HUTCH_GLOBAL": "from-init"}}).status_code == 204
    read = "import os\nos.environ.get('HUTCH_GLOBAL')"
    assert main_text(execute(agent.client, read, env_vars={"HUTCH_GLOBAL": "scoped"})) == "scoped"
    assert main_text(execute(agent.client, read)) == "from-init"


@pytest.mark.parametrize(
    ("language", "read"),
    [
        ("javascript", "console.log(String(Deno.env.get('HUTCH_OTHER')))"),
        ("bash", "echo -n $HUTCH_OTHER"),
        ("r", "cat(Sys.getenv('HUTCH_OTHER'))"),
    ],
)
def test_init_and_per_call_env_reach_other_languages_and_a_call_s_env_goes_back(agent, language, read):
    def value(**fields) -> str:
        lines = execute(agent.client, read, language=language, **fields)
        assert not of_type(lines, "error"), lines
        return "".join(line["text"] for line in of_type(lines, "stdout")).rstrip("\n")

    assert agent.client.post("/init", json={"envVars": {"HUTCH_OTHER": ""}}).status_code == 204
    value()  # the kernel is running before the next /init
    assert agent.client.post("/init", json={"envVars": {"HUTCH_OTHER": "from-init"}}).status_code == 204
    assert value(env_vars={"HUTCH_OTHER": 'it\'s "scoped" $x'}) == 'it\'s "scoped" $x'
    assert value() == "from-init"  # back to the sandbox's value, not unset


def test_executions_on_one_context_run_one_after_another(agent):
    running = threading.Event()
    finished: dict[str, float] = {}

    def slow() -> None:
        with agent.client.stream("POST", "/execute", json={"code": "import time\ntime.sleep(0.6)"}) as resp:
            for _line in resp.iter_lines():
                running.set()  # the cell has started
        finished["slow"] = time.monotonic()

    first = threading.Thread(target=slow)
    first.start()
    assert running.wait(10)
    started = time.monotonic()
    assert main_text(execute(agent.client, "'second'")) == "second"
    finished["fast"] = time.monotonic()
    first.join()
    assert finished["fast"] >= finished["slow"]
    assert finished["fast"] - started >= 0.4  # it waited for the slow one


def test_the_sdk_parser_reads_the_agent_output(agent):
    """The official SDK's own parser is the contract."""

    def run(code: str) -> Execution:
        execution = Execution()
        with agent.client.stream("POST", "/execute", json={"code": code, "context_id": None}) as resp:
            assert extract_exception(resp) is None
            for line in resp.iter_lines():
                parse_output(execution, line)
        return execution

    ok = run(
        "import sys\nfrom IPython.display import display, Markdown\n"
        "print('hello')\nsys.stderr.write('careful\\n')\ndisplay(Markdown('*hi*'))\n6 * 7"
    )
    assert ok.text == "42"
    assert ok.logs.stdout == ["hello\n"]
    assert ok.logs.stderr == ["careful\n"]
    assert [(r.markdown, r.is_main_result) for r in ok.results] == [("*hi*", False), (None, True)]
    assert ok.error is None
    assert isinstance(ok.execution_count, int)

    failed = run("int('x')")
    assert failed.text is None
    assert failed.results == []
    assert failed.error.name == "ValueError"
    assert failed.error.value == "invalid literal for int() with base 10: 'x'"
    assert "int('x')" in failed.error.traceback


# -- contexts ------------------------------------------------------------------------------------


def test_contexts_can_be_created_listed_restarted_and_deleted(agent):
    workdir = agent.home / "project"
    workdir.mkdir()
    ctx = create_context(agent.client, cwd="project", language="Python")
    assert ctx["language"] == "python"
    assert ctx["cwd"] == str(workdir)
    assert ctx in agent.client.get("/contexts").json()

    assert main_text(execute(agent.client, "import os\nos.getcwd()", context_id=ctx["id"])) == str(workdir)
    execute(agent.client, "ctx_only = 'mine'", context_id=ctx["id"])
    assert main_text(execute(agent.client, "ctx_only", context_id=ctx["id"])) == "mine"
    # Contexts do not share state.
    assert of_type(execute(agent.client, "ctx_only"), "error")[0]["name"] == "NameError"

    assert agent.client.post(f"/contexts/{ctx['id']}/restart").status_code == 204
    assert of_type(execute(agent.client, "ctx_only", context_id=ctx["id"]), "error")[0]["name"] == "NameError"

    pid = int(main_text(execute(agent.client, "import os\nos.getpid()", context_id=ctx["id"])))
    files = connection_file(pid)
    assert os.path.exists(files)
    assert oct(os.stat(os.path.dirname(files)).st_mode & 0o777) == "0o700"

    assert agent.client.delete(f"/contexts/{ctx['id']}").status_code == 204
    assert ctx not in agent.client.get("/contexts").json()
    assert gone(pid)
    assert not os.path.exists(files)
    assert agent.client.delete(f"/contexts/{ctx['id']}").status_code == 404
    assert agent.client.post("/execute", json={"code": "1", "context_id": ctx["id"]}).status_code == 404


def test_unknown_contexts_are_404_and_other_languages_are_400(agent):
    missing = agent.client.post("/execute", json={"code": "1", "context_id": "no-such-context"})
    assert missing.status_code == 404
    assert "no-such-context" in missing.json()["message"]
    assert isinstance(extract_exception(missing), NotFoundException)
    assert agent.client.post("/contexts/no-such-context/restart").status_code == 404

    unknown = agent.client.post("/execute", json={"code": "1", "language": "cobol"})
    assert unknown.status_code == 400
    assert "'cobol' is not supported" in unknown.json()["message"]
    assert isinstance(extract_exception(unknown), SandboxException)
    # No Java kernel is installed: the 400 says what is missing.
    for resp in (
        agent.client.post("/execute", json={"code": "1", "language": "java"}),
        agent.client.post("/contexts", json={"language": "Java"}),
    ):
        assert resp.status_code == 400
        assert resp.json()["code"] == 400
        assert "needs a Java Jupyter kernel" in resp.json()["message"]
        assert "this sandbox runs python, bash, javascript, r, typescript" in resp.json()["message"]
    bad_name = agent.client.post("/execute", json={"code": "true", "language": "bash", "env_vars": {"A-B": "1"}})
    assert bad_name.status_code == 400 and "A-B" in bad_name.json()["message"]

    assert agent.client.post("/contexts", json={"cwd": "does/not/exist"}).status_code == 404
    both = agent.client.post("/execute", json={"code": "1", "language": "python", "context_id": "x"})
    assert both.status_code == 400
    assert agent.client.post("/execute", json={"code": 1}).status_code == 400
    assert agent.client.post("/execute", json={"code": "1", "env_vars": {"A": 1}}).status_code == 400


# -- interrupts and dead kernels -----------------------------------------------------------------


def test_a_client_that_disconnects_interrupts_the_running_cell(agent):
    execute(agent.client, "interrupt_marker = 'kept'")
    with agent.client.stream("POST", "/execute", json={"code": "while True:\n    pass"}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if json.loads(line)["type"] == "number_of_executions":
                break  # the loop is running: hang up
    started = time.monotonic()
    lines = execute(agent.client, "interrupt_marker")
    assert time.monotonic() - started < 3
    assert main_text(lines) == "kept"  # same kernel, state intact


@pytest.mark.parametrize(
    ("language", "setup", "loop", "check", "expected"),
    [
        ("javascript", "let marker = 'kept'", "while (true) {}", "marker", "kept"),
        ("bash", "MARKER=kept", "while true; do :; done", "echo $MARKER", "kept\n"),
        ("r", "marker <- 'kept'", "repeat {}", "cat(marker)", "kept"),
    ],
)
def test_a_hang_up_interrupts_a_cell_of_any_language_and_keeps_its_state(agent, language, setup, loop, check, expected):
    execute(agent.client, setup, language=language)
    with agent.client.stream("POST", "/execute", json={"code": loop, "language": language}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if json.loads(line)["type"] == "number_of_executions":
                break
    started = time.monotonic()
    lines = execute(agent.client, check, language=language)
    assert time.monotonic() - started < 4
    assert "".join(line["text"] for line in of_type(lines, "stdout")) + (main_text(lines) or "") == expected


def child_commands(pid: int) -> list[bytes]:
    """The command lines of `pid`'s children."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != pid:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append(f.read())
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_kernels_of_other_languages_start_only_when_their_language_first_runs(tmp_path):
    running = start_agent(tmp_path)
    try:
        listed = running.client.get("/contexts").json()
        assert sorted(ctx["language"] for ctx in listed) == ["bash", "javascript", "python", "r", "typescript"]
        assert len({ctx["id"] for ctx in listed}) == 5
        assert child_commands(running.proc.pid) == []  # listed, none started
        assert (
            "".join(line["text"] for line in of_type(execute(running.client, "echo hi", language="sh"), "stdout"))
            == "hi\n"
        )
        children = child_commands(running.proc.pid)
        assert len(children) == 1 and b"bash_kernel" in children[0]
        # The default bash context ran it; the listing does not grow.
        assert running.client.get("/contexts").json() == listed
    finally:
        running.client.close()
        stop_agent(running.proc)


def test_a_kernel_that_dies_reports_an_error_and_the_next_execution_gets_a_fresh_kernel(agent):
    ctx = create_context(agent.client)
    execute(agent.client, "doomed = 1", context_id=ctx["id"])
    died = execute(agent.client, "import os\nos._exit(3)", context_id=ctx["id"])
    assert died[-1] == {"type": "end_of_execution"}
    errors = of_type(died, "error")
    assert len(errors) == 1
    assert errors[0]["name"] == "ContextRestarting"
    assert "exited with code 3" in errors[0]["value"]

    after = execute(agent.client, "doomed", context_id=ctx["id"])
    assert of_type(after, "error")[0]["name"] == "NameError"
    assert main_text(execute(agent.client, "1 + 1", context_id=ctx["id"])) == "2"

    # A restart does not wait for a running cell: the cell ends with an error at once.
    running = threading.Event()
    lines: list[dict] = []

    def sleep_in_context() -> None:
        body = {"code": "import time\ntime.sleep(60)", "context_id": ctx["id"]}
        with agent.client.stream("POST", "/execute", json=body) as resp:
            for raw in resp.iter_lines():
                lines.append(json.loads(raw))
                running.set()

    sleeper = threading.Thread(target=sleep_in_context)
    sleeper.start()
    assert running.wait(10)
    assert agent.client.post(f"/contexts/{ctx['id']}/restart").status_code == 204
    sleeper.join(10)
    assert not sleeper.is_alive()
    assert lines[-1] == {"type": "end_of_execution"}
    assert of_type(lines, "error")[0]["name"] == "ContextRestarting"
    assert main_text(execute(agent.client, "3 * 3", context_id=ctx["id"])) == "9"
    assert agent.client.delete(f"/contexts/{ctx['id']}").status_code == 204


# -- lifecycle -----------------------------------------------------------------------------------


def test_a_first_execution_racing_prestart_uses_the_same_kernel(tmp_path):
    """In-process: the agent's warm-up thread calls prestart() while a request comes in."""
    from hutch.agent.config import AgentConfig
    from hutch.agent.http import Body, Request
    from hutch.agent.interpreter import Interpreter

    interp = Interpreter(AgentConfig({"home": str(tmp_path), "prestart_kernel": True}))
    try:
        warm = threading.Thread(target=interp.prestart)
        warm.start()
        data = json.dumps({"code": "21 * 2"}).encode()
        req = Request("POST", "/execute", "HTTP/1.1", {}, b"", None)
        req.body = Body(io.BytesIO(data), len(data), False)
        resp = interp(req)
        lines = [json.loads(chunk) for chunk in resp.chunks if chunk]
        warm.join()
        assert main_text(lines) == "42"
        assert len(interp.contexts) == 1
        assert len(kernel_pids(os.getpid())) == 1
    finally:
        interp.close()
    assert wait_until(lambda: kernel_pids(os.getpid()) == [])


def test_the_agent_stops_its_kernels_and_removes_their_files_when_it_exits(tmp_path):
    running = start_agent(tmp_path)
    try:
        pid = int(main_text(execute(running.client, "import os\nos.getpid()")))
        files = os.path.dirname(connection_file(pid))
        assert os.path.isdir(files)
    finally:
        running.client.close()
        stop_agent(running.proc)
    assert wait_until(lambda: gone(pid))
    assert not os.path.exists(files)


def test_a_kernel_that_cannot_start_is_a_503_that_says_why(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'No module named ipykernel_launcher' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    running = start_agent(tmp_path, {"HUTCH_AGENT": json.dumps({"kernel_python": str(fake_python)})})
    try:
        resp = running.client.post("/execute", json={"code": "1"})
        assert resp.status_code == 503
        assert "No module named ipykernel_launcher" in resp.json()["message"]
        assert running.client.post("/contexts", json={}).status_code == 503
    finally:
        running.client.close()
        stop_agent(running.proc)
