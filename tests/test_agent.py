"""The agent loop (PROTOCOL §11): the model calls a tool, the server runs it
in the sandbox, and the model is asked again with what it got, within one
turn. The model is the local upstream's scripted one ("exec[CMD]"); every
message any client gets is checked against the 0.169.0 schema (conftest)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import uuid

import pytest

from tests.conftest import TEST_API_KEY

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def workspace(settings, tmp_path):
    """A workspace root of this server, outside its checkout (which commands may never write)."""
    root = tmp_path / "workspace"
    root.mkdir()
    settings.CODEX_WORKSPACE_ROOTS = [str(root)]
    return root


async def agent(connect, workspace, sandbox: str = "workspace-write", **params):
    client = await connect()
    await client.initialize("codex_vscode", "1.0.0")
    started = await client.call("thread/start", {"cwd": str(workspace), "sandbox": sandbox, **params})
    return client, started


async def turn(client, thread_id: str, text: str, timeout: float = 20.0) -> dict:
    return await client.run_turn(thread_id, text, timeout=timeout)


def commands_of(completed: dict) -> list[dict]:
    return [item for item in completed["turn"]["items"] if item["type"] == "commandExecution"]


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_a_command_runs_in_the_workspace_and_the_model_is_asked_again_with_its_output(
    connect, upstream, workspace, settings, transport
):
    settings.CODEX_RESPONSES_TRANSPORT = transport
    client, started = await agent(connect, workspace)
    assert started["sandbox"] == {
        "type": "workspaceWrite", "writableRoots": [str(workspace)], "networkAccess": False,
        "excludeTmpdirEnvVar": False, "excludeSlashTmp": False,
    }  # fmt: skip
    assert started["approvalPolicy"] == "on-request"
    thread = started["thread"]["id"]
    await turn(client, thread, "exec[echo made > made.txt && cat made.txt]")

    assert (workspace / "made.txt").read_text() == "made\n"
    item = (await client.notification("item/started", threadId=thread))["item"]
    while item["type"] != "commandExecution":
        item = (await client.notification("item/started", threadId=thread))["item"]
    assert item["command"] == "/bin/bash -lc 'echo made > made.txt && cat made.txt'" and item["cwd"] == str(workspace)
    assert item["status"] == "inProgress" and item["source"] == "unifiedExecStartup"
    assert (await client.notification("item/commandExecution/outputDelta", itemId=item["id"]))["delta"] == "made\n"
    done = await client.wait_for(
        lambda m: m.get("method") == "item/completed" and m["params"]["item"]["id"] == item["id"]
    )
    assert done["params"]["item"]["status"] == "completed" and done["params"]["item"]["exitCode"] == 0
    assert done["params"]["item"]["aggregatedOutput"] == "made\n" and done["params"]["item"]["durationMs"] >= 0

    first, second = upstream.model_requests()[-2:]
    assert [tool.get("name", tool["type"]) for tool in first.body["tools"]] == [
        "exec_command", "write_stdin", "request_user_input", "view_image", "web_search"
    ]  # fmt: skip
    assert "<cwd>" + str(workspace) in first.body["instructions"]
    call, output = second.body["input"][-2:]
    assert call["type"] == "function_call" and json.loads(call["arguments"]) == {"cmd": "echo made > made.txt && cat made.txt"}
    assert output == {"type": "function_call_output", "call_id": call["call_id"], "output": output["output"]}
    assert "Process exited with code 0" in output["output"] and output["output"].endswith("Output:\nmade\n")
    for request in (first, second):  # every request of the loop is the starter's
        assert request.originator == "codex_vscode" and request.user_agent.endswith("(codex_vscode; 1.0.0)")


async def test_parallel_calls_each_get_an_output_and_an_unknown_tool_is_told_so(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    completed = await turn(client, started["thread"]["id"], "exec[echo one] exec[echo two] call:calculator")
    assert completed["turn"]["status"] == "completed"
    outputs = [item["output"] for item in upstream.model_requests()[-1].body["input"] if item["type"] == "function_call_output"]
    assert len(outputs) == 3
    assert outputs[0].endswith("one\n") and outputs[1].endswith("two\n")
    assert outputs[2] == "unsupported call: calculator is not a tool of this server"


async def test_a_recorded_stream_that_calls_a_tool_we_lack_goes_on(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    completed = await turn(client, started["thread"]["id"], "fixture:openai-reasoning-encrypted-content.1")
    assert completed["turn"]["status"] == "completed"
    last = upstream.model_requests()[-1].body["input"]
    assert last[-1]["type"] == "function_call_output" and "not a tool of this server" in last[-1]["output"]
    assert last[-2]["type"] == "function_call" and last[-2]["name"] == "calculator"


async def test_calls_and_outputs_are_stored_and_replayed_in_the_next_turn(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    await turn(client, thread, "exec[echo remembered]")
    await turn(client, thread, "and now?")
    replayed = upstream.model_requests()[-1].body["input"]
    kinds = [item.get("type") or item.get("role") for item in replayed]
    assert kinds[:5] == ["message", "function_call", "function_call_output", "message", "message"]
    assert replayed[2]["output"].endswith("remembered\n")
    read = await client.call("thread/read", {"threadId": thread, "includeTurns": True})
    stored = [item for item in read["thread"]["turns"][0]["items"] if item["type"] == "commandExecution"]
    assert len(stored) == 1 and stored[0]["aggregatedOutput"] == "remembered\n" and stored[0]["status"] == "completed"


async def test_a_failing_command_is_failed_with_its_exit_code(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    completed = await turn(client, started["thread"]["id"], "exec[echo oops >&2; exit 3]")
    [command] = commands_of(completed)
    assert (command["status"], command["exitCode"], command["aggregatedOutput"]) == ("failed", 3, "oops\n")


async def test_interrupt_stops_the_command_and_its_whole_sandbox_within_a_second(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    marker = f"sleep 3{uuid.uuid4().int % 1000:03d}"
    turn_id = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": f"exec[{marker} & {marker}]"}]}))["turn"]["id"]
    await client.wait_for(lambda m: m.get("method") == "item/started" and m["params"]["item"]["type"] == "commandExecution")
    await asyncio.sleep(0.3)
    assert _processes(marker) == 2
    interrupted_at = asyncio.get_running_loop().time()
    await client.call("turn/interrupt", {"threadId": thread, "turnId": turn_id})
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "interrupted"
    assert asyncio.get_running_loop().time() - interrupted_at < 1.5
    assert await _none_left(marker)  # nothing of it keeps running after the turn
    [command] = commands_of(ended)
    assert command["status"] == "failed"


async def test_the_servers_secrets_do_not_reach_a_command(connect, upstream, workspace, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", TEST_API_KEY)
    client, started = await agent(connect, workspace)
    completed = await turn(client, started["thread"]["id"], "exec[env; cat /proc/1/environ]")
    [command] = commands_of(completed)
    assert TEST_API_KEY not in command["aggregatedOutput"] and "OPENAI_API_KEY" not in command["aggregatedOutput"]
    assert "CODEX_SANDBOX=bubblewrap" in command["aggregatedOutput"]


async def test_read_only_commands_cannot_write_the_workspace(connect, upstream, workspace):
    client, started = await agent(connect, workspace, sandbox="read-only")
    assert started["sandbox"] == {"type": "readOnly", "networkAccess": False}
    completed = await turn(client, started["thread"]["id"], "exec[echo x > made.txt]")
    assert not (workspace / "made.txt").exists()
    assert "Read-only file system" in commands_of(completed)[0]["aggregatedOutput"]


async def test_a_thread_outside_the_workspace_is_a_conversation_with_a_warning(connect, upstream, workspace, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    client, started = await agent(connect, elsewhere)
    warning = await client.notification("warning", threadId=started["thread"]["id"])
    assert str(elsewhere) in warning["message"] and "conversation only" in warning["message"]
    completed = await turn(client, started["thread"]["id"], "exec[echo hi]")
    assert commands_of(completed) == []
    assert "tools" not in upstream.model_requests()[-1].body


async def test_full_access_is_refused_unless_the_operator_allows_it(connect, upstream, workspace, settings):
    client = await connect()
    await client.initialize("codex_vscode", "1.0.0")
    refused = await client.request("thread/start", {"cwd": str(workspace), "sandbox": "danger-full-access"})
    assert refused["error"]["code"] == -32602 and "CODEX_ALLOW_FULL_ACCESS" in refused["error"]["message"]
    settings.CODEX_ALLOW_FULL_ACCESS = True
    started = await client.call("thread/start", {"cwd": str(workspace), "sandbox": "danger-full-access"})
    assert started["sandbox"] == {"type": "dangerFullAccess"}


async def test_a_turn_stops_after_the_most_tool_steps(connect, upstream, workspace, settings):
    settings.CODEX_MAX_TOOL_STEPS = 3
    client, started = await agent(connect, workspace)
    completed = await turn(client, started["thread"]["id"], "exec[true] steps:10")
    assert completed["turn"]["status"] == "failed" and "CODEX_MAX_TOOL_STEPS" in completed["turn"]["error"]["message"]
    assert len(upstream.model_requests()) == 3


def _processes(command_line: str) -> int:
    """Processes running exactly ``command_line`` (not the shell or sandbox around them)."""
    found = subprocess.run(["pgrep", "-f", f"^{command_line}$"], capture_output=True, text=True)
    return len(found.stdout.split())


async def _none_left(*command_lines: str, within: float = 1.0) -> bool:
    """Whether no process runs any of ``command_lines`` within ``within`` seconds: the
    kernel ends a sandbox's processes as its PID namespace goes, a moment after its bwrap."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while any(_processes(line) for line in command_lines):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --- approvals -----------------------------------------------------------------------


async def approval_request(client, timeout: float = 10.0) -> dict:
    return await client.wait_for(lambda m: m.get("method") == "item/commandExecution/requestApproval" and "id" in m, timeout)


async def answer(client, request: dict, decision) -> None:
    await client.send({"id": request["id"], "result": {"decision": decision}})


async def start(client, thread: str, text: str) -> str:
    return (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": text}]}))["turn"]["id"]


async def test_untrusted_asks_before_a_command_that_writes_and_runs_it_once_accepted(connect, upstream, workspace):
    client, started = await agent(connect, workspace, approvalPolicy="untrusted")
    thread = started["thread"]["id"]
    reading = await turn(client, thread, "exec[ls]")  # known to only read: no question
    assert commands_of(reading)[0]["status"] == "completed"
    await start(client, thread, "exec[touch made.txt]")
    request = await approval_request(client)
    assert request["params"]["command"] == "/bin/bash -lc 'touch made.txt'" and request["params"]["threadId"] == thread
    assert not (workspace / "made.txt").exists()
    await answer(client, request, "accept")
    resolved = await client.notification("serverRequest/resolved", threadId=thread)
    assert resolved["requestId"] == request["id"]
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "completed" and (workspace / "made.txt").exists()


async def test_a_declined_command_is_shown_declined_and_the_model_is_told(connect, upstream, workspace):
    client, started = await agent(connect, workspace, approvalPolicy="untrusted")
    thread = started["thread"]["id"]
    await start(client, thread, "exec[touch made.txt]")
    await answer(client, await approval_request(client), "decline")
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "completed" and not (workspace / "made.txt").exists()
    [command] = commands_of(ended)
    assert command["status"] == "declined"
    assert upstream.model_requests()[-1].body["input"][-1]["output"] == "the user declined to run this command"


async def test_cancel_at_an_approval_interrupts_the_turn(connect, upstream, workspace):
    client, started = await agent(connect, workspace, approvalPolicy="untrusted")
    thread = started["thread"]["id"]
    await start(client, thread, "exec[touch made.txt]")
    await answer(client, await approval_request(client), "cancel")
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "interrupted" and not (workspace / "made.txt").exists()


async def test_accept_for_session_runs_the_same_command_later_without_asking(connect, upstream, workspace):
    client, started = await agent(connect, workspace, approvalPolicy="untrusted")
    thread = started["thread"]["id"]
    await start(client, thread, "exec[touch a.txt]")
    await answer(client, await approval_request(client), "acceptForSession")
    await client.notification("turn/completed", threadId=thread)
    again = await turn(client, thread, "exec[touch a.txt]")
    assert commands_of(again)[0]["status"] == "completed"
    assert not [m for m in client.inbox if m.get("method") == "item/commandExecution/requestApproval"]


async def test_on_request_asks_only_to_escalate_and_never_refuses_it(connect, upstream, workspace):
    client, started = await agent(connect, workspace)  # on-request, the default
    thread = started["thread"]["id"]
    assert commands_of(await turn(client, thread, "exec[touch plain.txt]"))[0]["status"] == "completed"
    await start(client, thread, "escalate[touch escalated.txt]")
    request = await approval_request(client)
    assert request["params"]["reason"] == "scripted"
    await answer(client, request, "accept")
    await client.notification("turn/completed", threadId=thread)
    assert (workspace / "escalated.txt").exists()

    never, started = await agent(connect, workspace, approvalPolicy="never")
    refused = await turn(never, started["thread"]["id"], "escalate[touch never.txt]")
    assert refused["turn"]["status"] == "completed" and not (workspace / "never.txt").exists()
    assert "not available under this thread's approval policy" in upstream.model_requests()[-1].body["input"][-1]["output"]


async def test_a_phone_answers_the_desktops_approval_and_the_turn_keeps_the_desktops_identity(connect, upstream, workspace):
    desktop, started = await agent(connect, workspace, approvalPolicy="untrusted")
    thread = started["thread"]["id"]
    phone = await connect()
    await phone.initialize("codex_ios", "1.4.0")
    await phone.call("thread/resume", {"threadId": thread})
    await start(desktop, thread, "exec[touch from-phone.txt]")
    on_desktop, on_phone = await approval_request(desktop), await approval_request(phone)
    assert on_desktop["id"] == on_phone["id"]
    await answer(phone, on_phone, "accept")
    await answer(desktop, on_desktop, "decline")  # too late: the first answer won
    for client in (desktop, phone):
        assert (await client.notification("serverRequest/resolved", threadId=thread))["requestId"] == on_phone["id"]
    ended = await desktop.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "completed" and (workspace / "from-phone.txt").exists()
    assert {request.originator for request in upstream.model_requests()} == {"codex_vscode"}


# --- sessions that outlive their call --------------------------------------------------


async def test_a_command_left_running_is_a_background_terminal_the_model_can_type_into_and_the_user_can_end(
    connect, upstream, workspace
):
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    first = await turn(client, thread, "bg[read line; echo typed:$line; sleep 300]")
    assert "Process running with session ID" in upstream.model_requests()[-1].body["input"][-1]["output"]
    [command] = commands_of(first)
    assert command["status"] == "inProgress"
    listed = (await client.call("thread/backgroundTerminals/list", {"threadId": thread}))["data"]
    assert [(t["itemId"], t["processId"]) for t in listed] == [(command["id"], command["processId"])]

    await turn(client, thread, f"stdin[{command['processId']}:hello]")  # a later turn types into it
    assert "typed:hello" in upstream.model_requests()[-1].body["input"][-1]["output"]

    ended = await client.call(
        "thread/backgroundTerminals/terminate", {"threadId": thread, "processId": command["processId"]}
    )
    assert ended == {"terminated": True}
    assert (await client.call("thread/backgroundTerminals/list", {"threadId": thread}))["data"] == []
    assert await client.call("thread/backgroundTerminals/terminate", {"threadId": thread, "processId": "999"}) == {
        "terminated": False
    }
    await turn(client, thread, "bg[sleep 301]")
    assert await client.call("thread/backgroundTerminals/clean", {"threadId": thread}) == {}
    assert (await client.call("thread/backgroundTerminals/list", {"threadId": thread}))["data"] == []
    assert await _none_left("sleep 300", "sleep 301")


def test_a_workdir_outside_the_threads_directory_is_refused(workspace):
    from realtime.tools.commands import CallRefused, CommandContext, _workdir
    from realtime.tools.sandbox import SandboxPolicy

    context = CommandContext(
        thread_id="t", turn_id="u", cwd=str(workspace), policy=SandboxPolicy(), approval_policy="on-request",
        hidden_paths=(), protected_paths=(), notify=lambda *a: None, add_item=lambda record: None,
    )  # fmt: skip
    (workspace / "sub").mkdir()
    assert _workdir(context, {"workdir": "sub"}) == str(workspace / "sub")
    for escape in ("..", "/root", str(workspace / ".." / "..")):
        with pytest.raises(CallRefused, match="outside the thread's working directory"):
            _workdir(context, {"workdir": escape})
    (workspace / "link").symlink_to("/root")
    with pytest.raises(CallRefused, match="outside"):
        _workdir(context, {"workdir": "link"})


async def test_a_turn_interrupted_mid_command_leaves_a_history_the_api_takes(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    turn_id = await start(client, thread, "exec[sleep 30]")
    await client.wait_for(lambda m: m.get("method") == "item/started" and m["params"]["item"]["type"] == "commandExecution")
    await client.call("turn/interrupt", {"threadId": thread, "turnId": turn_id})
    await client.notification("turn/completed", threadId=thread)
    after = await turn(client, thread, "what happened?")  # the upstream refuses a call without its output (400)
    assert after["turn"]["status"] == "completed"
    replayed = upstream.model_requests()[-1].body["input"]
    assert [item["type"] for item in replayed[1:3]] == ["function_call", "function_call_output"]
    assert replayed[2]["output"] == "aborted: the turn was stopped"


def test_only_commands_that_cannot_write_or_run_anything_count_as_reading():
    from realtime.tools.approvals import known_to_only_read

    for reading in ("ls -la", "cat notes.txt", "git status", "git log -3", "grep -rn TODO .", "find . -name '*.py'"):
        assert known_to_only_read(reading), reading
    for writing in (
        "sed -n '1e touch x' f", "rg --pre=bash x", "sort -o out in", "tree -o out", "git branch -D main",
        "git diff --output=x", "find . -delete", "ls > out", "cat a | sh", "echo $(touch x)", "touch x",
    ):  # fmt: skip
        assert not known_to_only_read(writing), writing


async def test_a_sessions_unread_output_and_life_are_bounded(workspace, monkeypatch):
    from realtime.tools import exec_sessions
    from realtime.tools.commands import model_output
    from realtime.tools.sandbox import SandboxPolicy, bwrap_binary, sandboxed_argv

    monkeypatch.setattr(exec_sessions, "MAX_UNREAD_OUTPUT", 100_000)
    policy = SandboxPolicy("workspace-write", (str(workspace),))
    argv = sandboxed_argv(["/bin/bash", "-c", "yes"], str(workspace), str(workspace), policy, (), bwrap_binary())
    session = await exec_sessions.SessionRegistry().start(
        argv, thread_id="t", turn_id="u", item_id="i", command="yes", cwd=str(workspace), timeout=1.5
    )
    await asyncio.sleep(0.5)
    assert session.unread_size <= 100_000 + exec_sessions.READ_CHUNK
    await session.wait(5)  # killed at its timeout, polled or not
    assert not session.running and session.wall_seconds < 4
    assert session.take_unread().startswith("[… ")
    # The model is told why it ended (it would take -9 for the command's own failure).
    told = model_output(session, "", session.wall_seconds, 100)
    assert "Process exited with code -9 (killed: it ran past this server's 1.5 s command timeout)" in told


async def test_a_client_that_subscribes_while_an_approval_is_pending_is_asked_too(connect, upstream, workspace):
    desktop, started = await agent(connect, workspace, approvalPolicy="untrusted")
    thread = started["thread"]["id"]
    await start(desktop, thread, "exec[touch late.txt]")
    first = await approval_request(desktop)
    phone = await connect()
    await phone.initialize("codex_ios", "1.4.0")
    await phone.call("thread/resume", {"threadId": thread})
    late = await approval_request(phone)
    assert late["id"] == first["id"]
    await answer(phone, late, "accept")
    assert (await desktop.notification("turn/completed", threadId=thread))["turn"]["status"] == "completed"
    assert (workspace / "late.txt").exists()


# --- apply_patch ---------------------------------------------------------------------

PATCH = """*** Begin Patch
*** Add File: hello.txt
+Hello
*** Update File: app.py
@@ def main():
-    return 1
+    return 2
*** Delete File: old.txt
*** End Patch"""


async def test_a_patch_is_applied_by_the_server_as_a_file_change_with_its_diff(connect, upstream, workspace):
    (workspace / "app.py").write_text("def main():\n    return 1\n")
    (workspace / "old.txt").write_text("bye\n")
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    completed = await turn(client, thread, PATCH)
    assert (workspace / "hello.txt").read_text() == "Hello\n" and not (workspace / "old.txt").exists()
    assert (workspace / "app.py").read_text() == "def main():\n    return 2\n"
    [change] = [item for item in completed["turn"]["items"] if item["type"] == "fileChange"]
    assert change["status"] == "completed"
    assert [(c["path"], c["kind"]["type"]) for c in change["changes"]] == [("hello.txt", "add"), ("app.py", "update"), ("old.txt", "delete")]
    assert "-    return 1\n+    return 2" in change["changes"][1]["diff"]
    diff = await client.notification("turn/diff/updated", threadId=thread)
    assert "+Hello" in diff["diff"] and "+    return 2" in diff["diff"]
    output = upstream.model_requests()[-1].body["input"][-1]["output"]
    assert output == "Success. Updated the following files:\nA hello.txt\nM app.py\nD old.txt\n"
    assert commands_of(completed) == []  # never run through a shell


async def test_a_patch_the_sandbox_would_not_allow_asks_first(connect, upstream, workspace):
    client, started = await agent(connect, workspace, sandbox="read-only")
    thread = started["thread"]["id"]
    await start(client, thread, "*** Begin Patch\n*** Add File: asked.txt\n+yes\n*** End Patch")
    request = await client.wait_for(lambda m: m.get("method") == "item/fileChange/requestApproval" and "id" in m)
    assert not (workspace / "asked.txt").exists()
    await answer(client, request, "accept")
    await client.notification("turn/completed", threadId=thread)
    assert (workspace / "asked.txt").read_text() == "yes\n"

    await start(client, thread, "*** Begin Patch\n*** Add File: refused.txt\n+no\n*** End Patch")
    request = await client.wait_for(lambda m: m.get("method") == "item/fileChange/requestApproval" and "id" in m)
    await answer(client, request, "decline")
    ended = await client.notification("turn/completed", threadId=thread)
    assert not (workspace / "refused.txt").exists()
    assert [item["status"] for item in ended["turn"]["items"] if item["type"] == "fileChange"] == ["declined"]


async def test_a_patch_through_a_link_out_of_the_workspace_writes_nothing_there(connect, upstream, workspace):
    outside = workspace.parent / f"{workspace.name}-outside"
    outside.mkdir()
    try:
        (outside / "target.txt").write_text("untouched\n")
        (workspace / "link").symlink_to(outside)
        client, started = await agent(connect, workspace)
        thread = started["thread"]["id"]
        await start(client, thread, "*** Begin Patch\n*** Update File: link/target.txt\n-untouched\n+changed\n*** End Patch")
        request = await client.wait_for(lambda m: m.get("method") == "item/fileChange/requestApproval" and "id" in m)
        await answer(client, request, "accept")  # even approved, the sandbox keeps the write in the workspace
        ended = await client.notification("turn/completed", threadId=thread)
        assert (outside / "target.txt").read_text() == "untouched\n"
        assert [item["status"] for item in ended["turn"]["items"] if item["type"] == "fileChange"] == ["failed"]
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_the_patch_parser_refuses_what_does_not_apply():
    from realtime.tools.patches import PatchError, extract_patch, parse, updated_lines

    assert extract_patch("apply_patch <<'EOF'\n*** Begin Patch\n*** End Patch\nEOF") == (None, "*** Begin Patch\n*** End Patch")
    assert extract_patch("cd 'sub dir' && apply_patch <<EOF\n*** Begin Patch\n*** End Patch\nEOF") == (
        "sub dir", "*** Begin Patch\n*** End Patch"
    )
    assert extract_patch('cd "a b" && apply_patch <<EOF\n*** Begin Patch\n*** End Patch\nEOF')[0] == "a b"
    assert extract_patch("cd sub; apply_patch <<EOF\n*** Begin Patch\n*** End Patch\nEOF") is None
    assert extract_patch('cd "$(id)" && apply_patch <<EOF\n*** Begin Patch\n*** End Patch\nEOF') is None
    assert extract_patch("cat <<'EOF'\nx\nEOF") is None
    with pytest.raises(PatchError, match="starts with"):
        parse("*** Add File: x\n+y")
    [update] = parse("*** Begin Patch\n*** Update File: a\n-missing\n+new\n*** End Patch")
    with pytest.raises(PatchError, match="were not found"):
        updated_lines(["present"], update)


def test_patches_apply_as_codex_models_write_them(tmp_path, monkeypatch):
    from realtime.tools.patches import PatchError, apply

    monkeypatch.chdir(tmp_path)
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    (tmp_path / "ends.txt").write_text("end\nmiddle\nend\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "twice.txt").write_text("a\nb\n")
    changes = apply(
        "*** Begin Patch\n"
        "*** Update File: crlf.txt\n-two\n+TWO\n"
        "*** Update File: ends.txt\n-end\n+END\n*** End of File\n"
        "*** Update File: empty.txt\n+hello\n"
        "*** Update File: twice.txt\n-a\n+A\n\n"  # a blank line before the next operation is not context
        "*** Update File: twice.txt\n-b\n+B\n"
        "*** Update File: crlf.txt\n*** Move to: moved/crlf.txt\n-one\n+ONE\n"
        "*** End Patch"
    )
    assert (tmp_path / "moved" / "crlf.txt").read_bytes() == b"ONE\r\nTWO\r\n" and not (tmp_path / "crlf.txt").exists()
    assert (tmp_path / "ends.txt").read_text() == "end\nmiddle\nEND\n"
    assert (tmp_path / "empty.txt").read_text() == "hello\n"
    assert (tmp_path / "twice.txt").read_text() == "A\nB\n"
    assert "+++ b/moved/crlf.txt" in changes[-1]["diff"]
    assert not list(tmp_path.glob("**/*.apply_patch.tmp"))
    (tmp_path / "f.py").write_text("def f():\n    return 1\n")
    with pytest.raises(PatchError, match="'def g\\(\\):' was not found"):
        apply("*** Begin Patch\n*** Update File: f.py\n@@ def g():\n-    return 1\n+    return 2\n*** End Patch")
    with pytest.raises(PatchError, match="no such file"):
        apply("*** Begin Patch\n*** Add File: new.txt\n+x\n*** Delete File: missing.txt\n*** End Patch")
    assert not (tmp_path / "new.txt").exists()  # nothing of a refused patch is written


async def test_the_model_asks_the_user_a_question_and_gets_the_first_answer(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    await start(client, thread, "ask[Which colour?]")
    asked = await client.wait_for(lambda m: m.get("method") == "item/tool/requestUserInput" and "id" in m)
    [question] = asked["params"]["questions"]
    assert question["question"] == "Which colour?" and [o["label"] for o in question["options"]] == ["Red", "Blue"]
    await client.send({"id": asked["id"], "result": {"answers": {"choice": {"answers": ["Blue"]}}}})
    await client.notification("serverRequest/resolved", threadId=thread)
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "completed"
    output = upstream.model_requests()[-1].body["input"][-1]["output"]
    assert json.loads(output) == {"answers": {"choice": {"answers": ["Blue"]}}}


async def test_binary_output_is_stored_and_replayed_on_either_database(connect, upstream, workspace):
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    completed = await turn(client, thread, "exec[printf 'a\\000b\\377c']")  # NUL and invalid UTF-8
    assert completed["turn"]["status"] == "completed"
    [command] = commands_of(completed)
    assert command["aggregatedOutput"] == "a\ufffdb\ufffdc"
    assert (await turn(client, thread, "next"))["turn"]["status"] == "completed"  # the thread is free, its history good
    read = await client.call("thread/read", {"threadId": thread, "includeTurns": True})
    assert [t["status"] for t in read["thread"]["turns"]] == ["completed", "completed"]


LOOKUP_TOOLS = [
    {
        "type": "namespace",
        "name": "notes",
        "description": "The user's notes, kept by the client.",
        "tools": [{"type": "function", "name": "lookup", "description": "Find a note.", "inputSchema": {"type": "object", "properties": {}}}],
    },
    {"type": "function", "name": "clock", "description": "The client's time.", "inputSchema": {"type": "object", "properties": {}}},
]


async def test_a_clients_dynamic_tools_are_offered_and_called_on_the_client_that_declared_them(connect, upstream, workspace):
    client, started = await agent(connect, workspace, dynamicTools=LOOKUP_TOOLS)
    thread = started["thread"]["id"]
    watcher = await connect()  # a second subscriber: it sees the item, it is never asked
    await watcher.initialize("codex_ios", "1.0.0")
    await watcher.call("thread/resume", {"threadId": thread})
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "call:notes/lookup call:clock"}]})

    asked = [await client.wait_for(lambda m: m.get("method") == "item/tool/call" and "id" in m) for _ in range(2)]
    by_tool = {request["params"]["tool"]: request for request in asked}
    assert by_tool["lookup"]["params"]["namespace"] == "notes" and by_tool["clock"]["params"]["namespace"] is None
    assert by_tool["lookup"]["params"]["arguments"] == {} and by_tool["lookup"]["params"]["threadId"] == thread
    await client.send({"id": by_tool["lookup"]["id"], "result": {"contentItems": [{"type": "inputText", "text": "milk"}], "success": True}})
    await client.send({"id": by_tool["clock"]["id"], "error": {"code": -32000, "message": "no clock"}})
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "completed"

    read = await client.call("thread/read", {"threadId": thread, "includeTurns": True})
    calls = {item["tool"]: item for item in read["thread"]["turns"][-1]["items"] if item["type"] == "dynamicToolCall"}
    assert calls["lookup"]["status"] == "completed" and calls["lookup"]["success"] is True
    assert calls["lookup"]["contentItems"] == [{"type": "inputText", "text": "milk"}] and calls["lookup"]["namespace"] == "notes"
    assert calls["clock"]["status"] == "failed" and calls["clock"]["success"] is False

    first, second = upstream.model_requests()[-2:]
    offered = {tool.get("name"): tool for tool in first.body["tools"]}
    assert offered["notes"]["type"] == "namespace" and offered["notes"]["tools"][0]["name"] == "lookup"
    assert offered["notes"]["tools"][0]["parameters"] == {"type": "object", "properties": {}}
    assert offered["clock"]["type"] == "function"
    [lookup_call] = [item for item in second.body["input"] if item.get("type") == "function_call" and item["name"] == "lookup"]
    assert lookup_call["namespace"] == "notes"  # replayed as the model made it
    outputs = {item["call_id"]: item["output"] for item in second.body["input"] if item.get("type") == "function_call_output"}
    assert outputs[lookup_call["call_id"]] == "milk"
    # The watcher saw the calls as items, and was never asked to run them.
    assert not [m for m in watcher.inbox if m.get("method") == "item/tool/call"]


async def test_a_dynamic_tool_of_a_client_that_left_fails_and_the_model_is_told(connect, upstream, workspace):
    declarer, started = await agent(connect, workspace, dynamicTools=LOOKUP_TOOLS)
    thread = started["thread"]["id"]
    other = await connect()
    await other.initialize("codex_ios", "1.0.0")
    await other.call("thread/resume", {"threadId": thread})
    await declarer.communicator.disconnect()
    completed = await other.run_turn(thread, "call:clock")
    assert completed["turn"]["status"] == "completed"
    output = [item for item in upstream.model_requests()[-1].body["input"] if item.get("type") == "function_call_output"][-1]
    assert output["output"] == "clock: the client that provides it has disconnected"


@pytest.mark.parametrize(
    "tools, why",
    [
        ("not a list", "dynamicTools must be an array"),
        ([{"type": "function", "name": "exec_command", "description": "", "inputSchema": {}}], "is a tool of this server"),
        ([{"type": "function", "name": "has space", "description": "", "inputSchema": {}}], "letters, digits"),
        ([{"type": "function", "name": "x", "description": "", "inputSchema": "no"}], "inputSchema"),
        ([LOOKUP_TOOLS[1], LOOKUP_TOOLS[1]], "twice"),
    ],
)
async def test_bad_dynamic_tools_are_refused_with_invalid_params(connect, workspace, tools, why):
    client = await connect()
    await client.initialize("codex_vscode", "1.0.0")
    error = (await client.request("thread/start", {"cwd": str(workspace), "dynamicTools": tools}))["error"]
    assert error["code"] == -32602 and why in error["message"]


async def test_an_interrupted_dynamic_tool_call_is_resolved_for_its_client(connect, upstream, workspace):
    client, started = await agent(connect, workspace, dynamicTools=LOOKUP_TOOLS)
    thread = started["thread"]["id"]
    turn_id = (await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "call:clock"}]}))["turn"]["id"]
    asked = await client.wait_for(lambda m: m.get("method") == "item/tool/call" and "id" in m)
    await client.call("turn/interrupt", {"threadId": thread, "turnId": turn_id})
    resolved = await client.notification("serverRequest/resolved", threadId=thread)
    assert resolved["requestId"] == asked["id"]
    ended = await client.notification("turn/completed", threadId=thread)
    assert ended["turn"]["status"] == "interrupted"
    read = await client.call("thread/read", {"threadId": thread, "includeTurns": True})
    [call] = [item for item in read["thread"]["turns"][-1]["items"] if item["type"] == "dynamicToolCall"]
    assert call["status"] == "failed" and call["tool"] == "clock"


# The smallest PNG there is: one transparent pixel.
PIXEL_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63000100000500010d0a2db40000000049454e44ae426082"
)


async def test_view_image_shows_a_workspace_image_to_the_model_and_never_a_hidden_one(connect, upstream, workspace, settings, tmp_path):
    (workspace / "pixel.png").write_bytes(PIXEL_PNG)
    (workspace / "notes.txt").write_text("not an image")
    (workspace / "big.png").write_bytes(PIXEL_PNG + b"\0" * (720 * 1024))
    home = tmp_path / "codex-home"  # the server's own: hidden from every command
    home.mkdir()
    (home / "secret.png").write_bytes(PIXEL_PNG)
    settings.CODEX_HOME = str(home)
    client, started = await agent(connect, workspace, sandbox="read-only")
    thread = started["thread"]["id"]

    completed = await turn(client, thread, "view[pixel.png]")
    [viewed] = [item for item in completed["turn"]["items"] if item["type"] == "imageView"]
    assert viewed["path"] == str(workspace / "pixel.png")
    [output] = [item["output"] for item in upstream.model_requests()[-1].body["input"] if item.get("type") == "function_call_output"]
    assert output == [{"type": "input_image", "image_url": "data:image/png;base64," + base64.b64encode(PIXEL_PNG).decode()}]

    for path, why in [
        (home / "secret.png", "No such file"),
        ("notes.txt", "is not a PNG, JPEG, GIF or WebP image"),
        ("big.png", "is larger than 720 KiB"),
        ("missing.png", "No such file"),
    ]:
        completed = await turn(client, thread, f"view[{path}]")
        assert not [item for item in completed["turn"]["items"] if item["type"] == "imageView"]
        output = upstream.model_requests()[-1].body["input"][-1]["output"]
        assert why in output, output


async def test_a_background_terminal_ends_once_nobody_has_followed_its_thread_for_the_idle_time(
    connect, upstream, workspace, settings
):
    settings.CODEX_SESSION_IDLE_SECONDS = 0.5  # read when the process's sweep starts, at the first connection
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    await turn(client, thread, "bg[sleep 302]")
    await asyncio.sleep(1.5)  # followed: it lives on past the idle time
    assert len((await client.call("thread/backgroundTerminals/list", {"threadId": thread}))["data"]) == 1
    assert _processes("sleep 302") == 1

    await client.call("thread/unsubscribe", {"threadId": thread})
    assert await _none_left("sleep 302", within=4.0)  # its whole sandbox ended
    await client.call("thread/resume", {"threadId": thread})
    assert (await client.call("thread/backgroundTerminals/list", {"threadId": thread}))["data"] == []


async def test_turn_start_policies_apply_to_this_turn_and_stick_for_later_ones(connect, upstream, workspace, settings):
    client, started = await agent(connect, workspace, sandbox="workspace-write")
    thread = started["thread"]["id"]
    refused = await client.request(
        "turn/start", {"threadId": thread, "input": [{"type": "text", "text": "hi"}], "sandboxPolicy": {"type": "dangerFullAccess"}}
    )
    assert refused["error"]["code"] == -32602 and "CODEX_ALLOW_FULL_ACCESS" in refused["error"]["message"]

    read_only = {"threadId": thread, "input": [{"type": "text", "text": "exec[touch one.txt]"}], "sandboxPolicy": {"type": "readOnly"}}
    await client.call("turn/start", read_only)
    assert (await client.notification("turn/completed", threadId=thread, timeout=20))["turn"]["status"] == "completed"
    await turn(client, thread, "exec[touch two.txt]")  # no policy given: still read-only
    assert not (workspace / "one.txt").exists() and not (workspace / "two.txt").exists()
    assert "environment_context" in upstream.model_requests()[-1].body["instructions"]
    assert "<sandbox_mode>read-only</sandbox_mode>" in upstream.model_requests()[-1].body["instructions"]

    # Back to workspace-write with network access, and never asking: an escalation is refused, not asked.
    writable = {
        "threadId": thread, "approvalPolicy": "never",
        "input": [{"type": "text", "text": f"exec[touch three.txt; echo > /dev/tcp/127.0.0.1/{upstream.port} && echo reached] escalate[touch four.txt]"}],
        "sandboxPolicy": {"type": "workspaceWrite", "networkAccess": True, "writableRoots": ["/"]},
    }  # fmt: skip
    await client.call("turn/start", writable)
    assert (await client.notification("turn/completed", threadId=thread, timeout=20))["turn"]["status"] == "completed"
    assert (workspace / "three.txt").exists() and not (workspace / "four.txt").exists()
    outputs = [item["output"] for item in upstream.model_requests()[-1].body["input"] if item.get("type") == "function_call_output"][-2:]
    assert "reached" in outputs[0] and "not available under this thread's approval policy" in outputs[1]

    from asgiref.sync import sync_to_async

    from realtime.models import StoredThread

    row = await sync_to_async(StoredThread.objects.get)(thread_id=thread)  # stored with the lock: any process finds it
    assert (row.sandbox_mode, row.network_access, row.approval_policy) == ("workspace-write", True, "never")
    resumed = await client.call("thread/resume", {"threadId": thread})
    assert resumed["approvalPolicy"] == "never"
    assert resumed["sandbox"] == {
        "type": "workspaceWrite", "writableRoots": [str(workspace)], "networkAccess": True,
        "excludeTmpdirEnvVar": False, "excludeSlashTmp": False,
    }  # fmt: skip

    # Another process's turn/start made it read-only: the next turn here runs under that, and an
    # override of the approval policy alone keeps it (this process's copy is not written back).
    await sync_to_async(StoredThread.objects.filter(thread_id=thread).update)(sandbox_mode="read-only", network_access=False)
    untrusted = {"threadId": thread, "approvalPolicy": "on-request", "input": [{"type": "text", "text": "exec[touch five.txt]"}]}
    await client.call("turn/start", untrusted)
    assert (await client.notification("turn/completed", threadId=thread, timeout=20))["turn"]["status"] == "completed"
    assert not (workspace / "five.txt").exists()
    row = await sync_to_async(StoredThread.objects.get)(thread_id=thread)
    assert (row.sandbox_mode, row.network_access, row.approval_policy) == ("read-only", False, "on-request")


async def test_a_patch_after_cd_applies_in_that_directory_and_never_outside_the_thread(connect, upstream, workspace):
    (workspace / "sub").mkdir()
    client, started = await agent(connect, workspace)
    thread = started["thread"]["id"]
    completed = await turn(client, thread, "cd sub && *** Begin Patch\n*** Add File: inner.txt\n+in sub\n*** End Patch")
    assert (workspace / "sub" / "inner.txt").read_text() == "in sub\n"
    [change] = [item for item in completed["turn"]["items"] if item["type"] == "fileChange"]
    assert change["status"] == "completed" and change["changes"][0]["path"] == "inner.txt"

    await turn(client, thread, "cd .. && *** Begin Patch\n*** Add File: escaped.txt\n+out\n*** End Patch")
    assert not (workspace.parent / "escaped.txt").exists()
    assert "outside the thread's working directory" in upstream.model_requests()[-1].body["input"][-1]["output"]


def test_a_dynamic_tool_is_found_by_its_exact_namespace_first_and_an_image_is_never_cut():
    from realtime.tools.dynamic_tools import MAX_OUTPUT_CHARS, DeclaredTools, _answer, parse_dynamic_tools

    tools, namespaces = parse_dynamic_tools([
        {"type": "function", "name": "search", "description": "", "inputSchema": {}},
        {"type": "namespace", "name": "docs", "description": "", "tools": [
            {"type": "function", "name": "search", "description": "", "inputSchema": {}},
            {"type": "function", "name": "open", "description": "", "inputSchema": {}},
        ]},
    ])  # fmt: skip
    declared = DeclaredTools(tools, namespaces, ask=None)
    assert declared.find(None, "search").namespace is None and declared.find("docs", "search").namespace == "docs"
    assert declared.find(None, "open").namespace == "docs" and declared.find("other", "search") is None

    huge = "data:image/png;base64," + "A" * MAX_OUTPUT_CHARS
    content, success = _answer({"contentItems": [{"type": "inputText", "text": "x"}, {"type": "inputImage", "imageUrl": huge}]})
    assert success and content == [{"type": "inputText", "text": "x"}, {"type": "inputText", "text": "[an image too large to keep was left out]"}]


async def test_view_image_on_a_full_access_thread_still_never_shows_a_hidden_file(connect, upstream, workspace, settings, tmp_path):
    settings.CODEX_ALLOW_FULL_ACCESS = True
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "secret.png").write_bytes(PIXEL_PNG)
    settings.CODEX_HOME = str(home)
    client, started = await agent(connect, workspace, sandbox="danger-full-access")
    completed = await turn(client, started["thread"]["id"], f"view[{home / 'secret.png'}]")
    assert not [item for item in completed["turn"]["items"] if item["type"] == "imageView"]
    assert "No such file" in upstream.model_requests()[-1].body["input"][-1]["output"]


async def test_a_client_answer_nested_too_deep_is_taken_as_an_error_answer_and_the_turn_goes_on(connect, upstream, workspace):
    client, started = await agent(connect, workspace, dynamicTools=LOOKUP_TOOLS)
    thread = started["thread"]["id"]
    await client.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "call:clock"}]})
    asked = await client.wait_for(lambda m: m.get("method") == "item/tool/call" and "id" in m)
    deep = '{"a": ' * 100 + "{}" + "}" * 100
    await client.send_raw('{"id": "%s", "result": {"contentItems": [], "success": true, "extra": %s}}' % (asked["id"], deep))
    ended = await client.notification("turn/completed", threadId=thread, timeout=10)
    assert ended["turn"]["status"] == "completed"
    output = [i for i in upstream.model_requests()[-1].body["input"] if i.get("type") == "function_call_output"][-1]
    assert output["output"] == "the client answered the tool call with an error"
