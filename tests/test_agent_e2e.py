"""The agent across two real ``serve`` processes on this machine's PostgreSQL
and Redis (PROTOCOL §11): an approval asked by a turn on one process is
answered by a phone on the other."""

from __future__ import annotations

import pytest

from tests.test_scale_out import REDIS_URL, postgres_database  # noqa: F401 (a fixture)
from tests.test_shared_threads import client_of

pytestmark = pytest.mark.e2e


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "workspace"  # outside the server's checkout, which commands may never write
    root.mkdir()
    return root


async def test_a_phone_on_another_process_approves_the_desktops_command(
    postgres_database, daphne_server, upstream, workspace  # noqa: F811
):
    roots = {"REDIS_URL": REDIS_URL, "CODEX_WORKSPACE_ROOTS": str(workspace)}
    one = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="one", **roots)
    two = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="two", **roots)
    async with client_of(one, "codex_vscode") as desktop, client_of(two, "codex_ios") as phone:
        started = await desktop.call(
            "thread/start", {"cwd": str(workspace), "sandbox": "workspace-write", "approvalPolicy": "untrusted"}
        )
        thread = started["thread"]["id"]
        await phone.call("thread/resume", {"threadId": thread})
        await desktop.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "exec[touch approved.txt]"}]})

        def asked(message: dict) -> bool:
            return message.get("method") == "item/commandExecution/requestApproval" and "id" in message

        on_phone = await phone.wait_for(asked, timeout=10)
        assert on_phone["params"]["command"] == "/bin/bash -lc 'touch approved.txt'"
        assert not (workspace / "approved.txt").exists()
        await phone.send({"id": on_phone["id"], "result": {"decision": "accept"}})
        for client in (desktop, phone):
            resolved = await client.notification("serverRequest/resolved", threadId=thread, timeout=10)
            assert resolved["requestId"] == on_phone["id"]
        ended = await desktop.notification("turn/completed", threadId=thread, timeout=20)
        assert ended["turn"]["status"] == "completed" and (workspace / "approved.txt").exists()
        # the phone heard the command run, and the turn stayed the desktop's
        await phone.notification("turn/completed", threadId=thread, timeout=10)
    assert {request.originator for request in upstream.model_requests()} == {"codex_vscode"}


async def test_a_client_that_subscribes_on_another_process_while_an_approval_is_open_is_asked_too(
    postgres_database, daphne_server, upstream, workspace  # noqa: F811
):
    roots = {"REDIS_URL": REDIS_URL, "CODEX_WORKSPACE_ROOTS": str(workspace)}
    one = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="one", **roots)
    two = daphne_server(postgres_database, CODEX_SERVER_INSTANCE="two", **roots)

    def asked(message: dict) -> bool:
        return message.get("method") == "item/commandExecution/requestApproval" and "id" in message

    async with client_of(one, "codex_vscode") as desktop:
        started = await desktop.call("thread/start", {"cwd": str(workspace), "approvalPolicy": "untrusted"})
        thread = started["thread"]["id"]
        await desktop.call("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "exec[touch late.txt]"}]})
        on_desktop = await desktop.wait_for(asked, timeout=10)
        # Process two follows nobody on this thread yet: its first subscriber comes after the question.
        async with client_of(two, "codex_ios") as phone, client_of(two, "codex_ipad") as tablet:
            await phone.call("thread/resume", {"threadId": thread})
            on_phone = await phone.wait_for(asked, timeout=10)
            assert on_phone["id"] == on_desktop["id"] and on_phone["params"] == on_desktop["params"]
            await tablet.call("thread/resume", {"threadId": thread})  # process two already follows it
            on_tablet = await tablet.wait_for(asked, timeout=10)
            assert on_tablet["id"] == on_desktop["id"]
            await tablet.send({"id": on_tablet["id"], "result": {"decision": "decline"}})
            for client in (desktop, phone, tablet):
                resolved = await client.notification("serverRequest/resolved", threadId=thread, timeout=10)
                assert resolved["requestId"] == on_desktop["id"]
            ended = await desktop.notification("turn/completed", threadId=thread, timeout=20)
            assert ended["turn"]["status"] == "completed" and not (workspace / "late.txt").exists()
            assert not [m for m in phone.inbox if asked(m)]  # asked once each
