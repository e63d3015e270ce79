"""The admin in a real headless Chromium against a real daphne process."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from websockets.asyncio.client import connect as ws_connect

from codexserver.devtools.rpc_client import SocketClient
from codexserver.devtools.server_process import PROJECT_DIR

pytestmark = pytest.mark.e2e

SCREENSHOT = PROJECT_DIR / "docs" / "admin-connection-identities.png"
PASSWORD = "operator-password-for-tests"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1700,650",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(0)  # absence checks must not wait; navigation uses WebDriverWait
    yield driver
    driver.quit()


async def connect_clients(server) -> None:
    async with ws_connect(server.ws_url) as a, ws_connect(server.ws_url) as b, ws_connect(server.ws_url) as c:
        for websocket, name in ((a, "codex-backend"), (b, "codex_ios"), (c, "codex_vscode")):
            await SocketClient(websocket).initialize(name, "1.4.0")
        await asyncio.sleep(0.1)


def test_operator_logs_in_filters_by_originator_and_cannot_edit(daphne_server, browser, tmp_path):
    server = daphne_server()
    subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "operator", "--email", "op@example.com"],
        cwd=PROJECT_DIR, env={**server.env, "DJANGO_SUPERUSER_PASSWORD": PASSWORD}, check=True,
    )
    asyncio.run(connect_clients(server))

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
    assert len(rows) == 1 and "codex_ios" in rows[0].text
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

    if os.environ.get("CODEX_UPDATE_SCREENSHOTS"):  # refresh the README's picture
        browser.get(server.http_url + "/admin/identity/connectionidentity/")
        browser.save_screenshot(str(SCREENSHOT))
