"""The admin in a real headless Chromium against a real daphne process."""

import asyncio
import os
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from codexserver.devtools.rpc_client import SocketClient
from codexserver.devtools.server_process import PROJECT_DIR

pytestmark = pytest.mark.e2e

SCREENSHOT = PROJECT_DIR / "docs" / "admin-connection-identities.png"
TURNS_SCREENSHOT = PROJECT_DIR / "docs" / "admin-turns.png"
RECORDED = "fixture:openai-phase.1"  # a real recorded stream, with its usage
PASSWORD = "operator-password-for-tests"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1920,650",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(0)  # absence checks must not wait; navigation uses WebDriverWait
    yield driver
    driver.quit()


@contextmanager
def connected_clients(server, names=("codex-backend", "codex_ios", "codex_vscode"), gone=("acme_editor",)):
    """``names`` stay connected (on a loop in another thread) until the block
    ends; ``gone`` connect, initialize and leave first."""
    ready, leave = threading.Event(), asyncio.Event()
    loop = asyncio.new_event_loop()

    async def hold() -> None:
        for name in gone:
            async with ws_connect(server.ws_url) as websocket:
                await SocketClient(websocket).initialize(name, "1.4.0")
        async with AsyncExitStack() as stack:
            for name in names:
                websocket = await stack.enter_async_context(ws_connect(server.ws_url))
                await SocketClient(websocket).initialize(name, "1.4.0")
            ready.set()
            await leave.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(hold(),))
    thread.start()
    try:
        assert ready.wait(20), "the clients did not connect"
        time.sleep(0.3)  # the closed row's disconnect is written
        yield
    finally:
        loop.call_soon_threadsafe(leave.set)
        thread.join(10)
        loop.close()


def test_operator_logs_in_filters_by_originator_and_cannot_edit(daphne_server, browser, tmp_path):
    server = daphne_server()
    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "operator", "--email", "op@example.com"],
        cwd=PROJECT_DIR, env={**server.env, "DJANGO_SUPERUSER_PASSWORD": PASSWORD}, check=True,
    )
    with connected_clients(server):
        browse_the_changelist(server, browser, tmp_path)


def browse_the_changelist(server, browser, tmp_path):
    browser.get(server.http_url + "/admin/login/?next=/admin/identity/connectionidentity/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(browser, 10).until(expected_conditions.title_contains("Select connection identity to view"))

    originator_filter = browser.find_element(By.XPATH, "//details[@data-filter-title='originator']")
    if originator_filter.get_attribute("open") is None:
        originator_filter.find_element(By.TAG_NAME, "summary").click()
    originator_filter.find_element(By.LINK_TEXT, "codex_ios").click()
    WebDriverWait(browser, 10).until(expected_conditions.url_contains("originator=codex_ios"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1 and "codex_ios" in rows[0].text and "open" in rows[0].text
    assert "codex-backend" not in browser.find_element(By.ID, "result_list").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#content a.addlink")  # the sidebar has other models
    assert not browser.find_elements(By.NAME, "action")  # no bulk delete action
    browser.save_screenshot(str(tmp_path / "changelist.png"))

    rows[0].find_element(By.CSS_SELECTOR, "th a").click()
    WebDriverWait(browser, 10).until(expected_conditions.title_contains("View connection identity"))
    assert "codex_ios/" in browser.find_element(By.ID, "content").text  # the User-Agent, read-only
    assert not browser.find_elements(By.NAME, "_save")
    assert not browser.find_elements(By.CSS_SELECTOR, "a.deletelink")
    assert Path(tmp_path / "changelist.png").stat().st_size > 10_000

    # Who is connected now: the default view, every column on a 1920 px screen.
    browser.get(server.http_url + "/admin/identity/connectionidentity/")
    listed = browser.find_element(By.ID, "result_list").text
    assert all(name in listed for name in ("codex-backend", "codex_ios", "codex_vscode")) and "acme_editor" not in listed
    overflow = browser.execute_script(
        "return document.getElementById('result_list').getBoundingClientRect().right - window.innerWidth"
    )
    assert overflow <= 0, f"the table is {overflow}px wider than the window"
    if os.environ.get("CODEX_UPDATE_SCREENSHOTS"):  # refresh the README's picture
        browser.save_screenshot(str(SCREENSHOT))


async def _share_a_thread(server) -> None:
    """codex_vscode starts a thread and runs a turn; codex_ios resumes it and runs two."""
    async with ws_connect(server.ws_url) as desktop_socket, ws_connect(server.ws_url) as phone_socket:
        desktop, phone = SocketClient(desktop_socket), SocketClient(phone_socket)
        await desktop.initialize("codex_vscode", "1.0.0")
        await phone.initialize("codex_ios", "1.4.0")
        thread = await desktop.start_thread()
        await desktop.run_turn(thread, RECORDED)
        await phone.call("thread/resume", {"threadId": thread})
        for _ in range(2):
            await phone.run_turn(thread, RECORDED)


def test_operator_sees_who_ran_each_turn_and_token_usage_per_originator(daphne_server, browser, tmp_path):
    server = daphne_server()
    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "operator", "--email", "op@example.com"],
        cwd=PROJECT_DIR, env={**server.env, "DJANGO_SUPERUSER_PASSWORD": PASSWORD}, check=True,
    )
    asyncio.run(_share_a_thread(server))
    browser.get(server.http_url + "/admin/login/?next=/admin/realtime/storedturn/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(browser, 10).until(expected_conditions.title_contains("Select turn to view"))

    usage = {
        cells[0]: cells[1:]
        for row in browser.find_elements(By.CSS_SELECTOR, "#usage-by-originator tbody tr")
        if (cells := [cell.text for cell in row.find_elements(By.TAG_NAME, "td")])
    }
    assert set(usage) == {"codex_ios", "codex_vscode"}
    assert usage["codex_ios"][0] == "codex_ios"  # the client's name beside its originator
    ios_turns, ios_total = int(usage["codex_ios"][1]), int(usage["codex_ios"][-1])
    vscode_turns, vscode_total = int(usage["codex_vscode"][1]), int(usage["codex_vscode"][-1])
    assert (ios_turns, vscode_turns) == (2, 1) and ios_total == 2 * vscode_total > 0
    turns = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(turns) == 3 and all("completed" in row.text for row in turns)
    assert not browser.find_elements(By.CSS_SELECTOR, "#content a.addlink")
    if os.environ.get("CODEX_UPDATE_SCREENSHOTS"):
        browser.save_screenshot(str(TURNS_SCREENSHOT))

    browser.get(server.http_url + "/admin/realtime/storedthread/")
    threads = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(threads) == 1 and "codex_vscode" in threads[0].text  # the thread's starter; turns carry their own


PRINCIPALS_SCREENSHOT = PROJECT_DIR / "docs" / "admin-principals.png"


def _manage(server, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_DIR, env=server.env, capture_output=True, text=True, check=True
    ).stdout


async def _turns_of(server, token: str, name: str, count: int) -> None:
    async with ws_connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as websocket:
        client = SocketClient(websocket)
        await client.initialize(name, "1.0.0")
        thread = await client.start_thread()
        for _ in range(count):
            await client.run_turn(thread, RECORDED)


async def _upgrade_status(server, token: str) -> int:
    try:
        async with ws_connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def test_operator_sees_usage_per_principal_issues_a_token_and_revokes_it(daphne_server, browser, tmp_path):
    server = daphne_server()
    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "operator", "--email", "op@example.com"],
        cwd=PROJECT_DIR, env={**server.env, "DJANGO_SUPERUSER_PASSWORD": PASSWORD}, check=True,
    )
    alice = _manage(server, "issue_token", "alice", "--name", "desktop").splitlines()[-1]
    bob = _manage(server, "issue_token", "bob", "--name", "phone").splitlines()[-1]
    _manage(server, "configure_principal", "bob", "--budget", "100000")
    asyncio.run(_turns_of(server, alice, "codex_vscode", 2))
    asyncio.run(_turns_of(server, bob, "codex_ios", 1))

    browser.get(server.http_url + "/admin/login/?next=/admin/identity/principal/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(browser, 10).until(expected_conditions.title_contains("Select principal to view"))
    assert browser.find_element(By.ID, "usage-per-principal").text == "Token usage per principal"
    headers = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#result_list thead th")]
    rows = {
        cells[0]: dict(zip(headers[1:], cells[1:]))
        for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
        if (cells := [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")])
    }
    assert set(rows) == {"alice", "bob"}
    assert (rows["alice"]["TURNS"], rows["bob"]["TURNS"]) == ("2", "1")
    assert int(rows["alice"]["TOTAL TOKENS"]) == 2 * int(rows["bob"]["TOTAL TOKENS"]) > 0
    assert rows["bob"]["BUDGET"] == f"{rows['bob']['TOTAL TOKENS']} of 100,000" and rows["alice"]["BUDGET"] == "none"
    if os.environ.get("CODEX_UPDATE_SCREENSHOTS"):
        browser.save_screenshot(str(PRINCIPALS_SCREENSHOT))

    # alice's page: her token by its prefix, never whole, and her usage per originator
    browser.find_element(By.LINK_TEXT, "alice").click()
    WebDriverWait(browser, 10).until(expected_conditions.title_contains("View principal"))
    page = browser.find_element(By.ID, "content").text
    assert alice[:12] in page and alice not in page and "desktop" in page
    assert "codex_vscode" in browser.find_element(By.ID, "principal-usage-by-originator").text

    # a token issued here is shown once and works; revoked here, it is refused
    browser.get(server.http_url + "/admin/identity/principal/")
    browser.find_element(By.CSS_SELECTOR, "ul.object-tools a[href$=\"/issue-token/\"]").click()
    browser.find_element(By.NAME, "principal").send_keys("carol")
    browser.find_element(By.NAME, "name").send_keys("tablet")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    issued = WebDriverWait(browser, 10).until(expected_conditions.presence_of_element_located((By.ID, "issued-token"))).text
    assert asyncio.run(_upgrade_status(server, issued)) == 101
    browser.get(server.http_url + "/admin/identity/accesstoken/?q=carol")
    browser.find_element(By.CSS_SELECTOR, "#result_list tbody input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("revoke_tokens")
    browser.find_element(By.NAME, "index").click()
    WebDriverWait(browser, 10).until(expected_conditions.text_to_be_present_in_element((By.CSS_SELECTOR, "ul.messagelist"), "Revoked 1 token"))
    assert asyncio.run(_upgrade_status(server, issued)) == 401
    assert asyncio.run(_upgrade_status(server, alice)) == 101
    assert issued not in server.log() and alice not in server.log()
