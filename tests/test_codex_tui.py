"""The real Codex TUI (npm @openai/codex 0.169.0), unchanged, chats through a
real ``manage.py serve`` process to the recording upstream (PROTOCOL §8)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from codexserver.devtools.server_process import PROJECT_DIR
from tests.codex_cli import CODEX_VERSION, CONFIG_TOML, Terminal, codex_binary

pytestmark = pytest.mark.e2e

READY = "Ask Codex to do anything"


@pytest.fixture
def codex_home(tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG_TOML)
    return home


@pytest.fixture
def terminals():
    opened: list[Terminal] = []

    def open_terminal() -> Terminal:
        opened.append(Terminal())
        return opened[-1]

    yield open_terminal
    for terminal in opened:
        terminal.close()


def run_tui(terminals, server, codex_home, *arguments: str, ready: str = READY) -> Terminal:
    command = f"{codex_binary()} --remote ws://127.0.0.1:{server.port} {' '.join(arguments)}"
    terminal = terminals().start(command, cwd=codex_home.parent, env={"CODEX_HOME": codex_home})
    terminal.wait_for_text(ready, timeout=60)
    return terminal


def send_prompt(terminal: Terminal, text: str) -> None:
    terminal.type(text)
    # The TUI reads keys arriving together as a paste, where Enter is a newline.
    time.sleep(0.6)
    terminal.press("Enter")


def assert_no_error_banner(screen: str) -> None:
    assert not re.search(r"\berror\b|\bfailed\b", screen, re.IGNORECASE), screen


async def test_the_codex_tui_chats_interrupts_and_is_attributed_as_itself(daphne_server, upstream, codex_home, terminals):
    server = daphne_server()
    terminal = run_tui(terminals, server, codex_home)

    send_prompt(terminal, "slow:3")
    terminal.wait_for_text("d0 d1 d2")
    send_prompt(terminal, "second prompt")
    terminal.wait_for_text("Hello world")

    send_prompt(terminal, "slow:300")
    terminal.wait_for_text("d3 d4")  # streaming
    terminal.press("Escape")
    screen = terminal.wait_for_text("Conversation interrupted")
    upstream.wait_for(lambda records: any(r.kind == "closed" and r.path.endswith("/responses") for r in records), timeout=2)
    assert "d299" not in screen
    assert_no_error_banner(screen)

    models = upstream.model_requests()
    assert len(models) >= 3
    for request in models:
        assert request.originator == "codex-tui"
        assert request.user_agent.startswith("codex-tui/") and request.user_agent.endswith(f"(codex-tui; {CODEX_VERSION})")
    # The second turn replayed the first: the model saw the conversation.
    second = next(r for r in models if "second prompt" in str(r.body["input"][-1]))
    assert "slow:3" in str(second.body["input"])


async def test_the_codex_tui_starts_a_new_thread_quits_and_resumes(daphne_server, upstream, codex_home, terminals):
    server = daphne_server()
    terminal = run_tui(terminals, server, codex_home)
    send_prompt(terminal, "remember the word tangerine")
    terminal.wait_for_text("Hello world")
    send_prompt(terminal, "/new")
    terminal.wait_for(lambda screen: "tangerine" not in screen, what="a new, empty thread")
    send_prompt(terminal, "slow:2")
    terminal.wait_for_text("d0 d1")
    terminal.press("C-c", "C-c")  # quit
    terminal.wait_for(lambda screen: READY not in screen, what="the TUI to exit")

    # The picker lists the earlier threads, from the server's store.
    resumed = run_tui(terminals, server, codex_home, "resume", ready="remember the word tangerine")
    assert "slow:2" in resumed.screen()
    resumed.press("Down")  # newest first: the /new thread, then the first one
    resumed.press("Enter")
    resumed.wait_for(lambda screen: READY in screen and "tangerine" in screen, what="the resumed conversation")
    send_prompt(resumed, "what was the word?")
    screen = resumed.wait_for(lambda s: s.count("Hello world") >= 2, what="the reply after resuming")
    assert_no_error_banner(screen)

    replayed = next(r for r in upstream.model_requests() if "what was the word?" in str(r.body["input"][-1]))
    assert "tangerine" in str(replayed.body["input"])  # the earlier turn, replayed from the store
    assert replayed.originator == "codex-tui"


async def test_the_codex_tui_connects_with_an_issued_token_and_sees_only_its_principals_threads(
    daphne_server, upstream, codex_home, terminals
):
    server = daphne_server()
    issued = {}
    for principal in ("alice", "bob"):
        done = subprocess.run(
            [sys.executable, "manage.py", "issue_token", principal],
            cwd=PROJECT_DIR, env=server.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        issued[principal] = done.stdout.splitlines()[-1]

    def tui_of(principal: str, *arguments: str, ready: str = READY) -> Terminal:
        command = f"{codex_binary()} --remote ws://127.0.0.1:{server.port} --remote-auth-token-env CODEX_REMOTE_TOKEN"
        terminal = terminals().start(
            f"{command} {' '.join(arguments)}",
            cwd=codex_home.parent,
            env={"CODEX_HOME": codex_home, "CODEX_REMOTE_TOKEN": issued[principal]},
        )
        terminal.wait_for_text(ready, timeout=60)
        return terminal

    alice = tui_of("alice")
    send_prompt(alice, "alice remembers tangerine")
    assert_no_error_banner(alice.wait_for_text("Hello world"))
    alice.close()

    # bob's picker lists none of alice's threads; alice's lists hers
    bob = tui_of("bob", "resume", ready="No sessions yet")
    assert "tangerine" not in bob.screen()
    tui_of("alice", "resume", ready="alice remembers tangerine")
    assert all(request.originator == "codex-tui" for request in upstream.model_requests())


async def test_the_codex_tui_shows_a_command_asks_to_approve_it_and_shows_a_declined_one(
    daphne_server, upstream, codex_home, terminals
):
    workspace = Path(tempfile.mkdtemp(prefix="codexserver-tui-"))  # outside the server's checkout
    try:
        server = daphne_server(CODEX_WORKSPACE_ROOTS=str(workspace))
        terminal = run_tui(terminals, server, codex_home)
        send_prompt(terminal, "exec[echo sandboxed-output]")  # runs in the sandbox without asking
        terminal.wait_for_text("sandboxed-output", timeout=30)
        terminal.wait_for_text("got: ", timeout=30)

        send_prompt(terminal, "escalate[touch approved.txt]")  # the model asks to leave the sandbox
        screen = terminal.wait_for(lambda s: "touch approved.txt" in s and "Yes" in s, timeout=30, what="the approval prompt")
        terminal.press("y")
        terminal.wait_for(lambda s: s.count("got: ") >= 2, timeout=30, what="the reply after the approved command")
        assert (workspace / "approved.txt").exists()

        send_prompt(terminal, "escalate[touch declined.txt]")
        terminal.wait_for(lambda s: "touch declined.txt" in s and "Yes" in s, timeout=30, what="the second approval prompt")
        terminal.press("d")  # "No, continue without running it"
        screen = terminal.wait_for(lambda s: "the user declined" in s, timeout=30, what="the model told of the decline")
        assert not (workspace / "declined.txt").exists()
        assert_no_error_banner(screen.split("declined.txt")[-1])
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


async def test_the_codex_tui_runs_its_own_dynamic_tool_when_the_model_calls_it(daphne_server, upstream, codex_home, terminals):
    workspace = Path(tempfile.mkdtemp(prefix="codexserver-tui-"))
    try:
        server = daphne_server(CODEX_WORKSPACE_ROOTS=str(workspace))
        terminal = run_tui(terminals, server, codex_home)
        # The TUI declares its codex_tui namespace in thread/start; the model calls one of them.
        send_prompt(terminal, "call:codex_tui/list_threads")
        terminal.wait_for_text("Called codex_tui.list_threads", timeout=30)
        screen = terminal.wait_for_text("got: ", timeout=30)
        assert_no_error_banner(screen)
        # (The TUI also names the thread in an ephemeral thread of its own: a request without tools.)
        first, second = [r for r in upstream.model_requests() if r.originator == "codex-tui" and "tools" in r.body][-2:]
        [namespace] = [tool for tool in first.body["tools"] if tool.get("name") == "codex_tui"]
        assert namespace["type"] == "namespace" and "list_threads" in [tool["name"] for tool in namespace["tools"]]
        [output] = [item["output"] for item in second.body["input"] if item.get("type") == "function_call_output"]
        assert '"threads"' in output  # what the TUI answered, from its own thread/list on this server
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
