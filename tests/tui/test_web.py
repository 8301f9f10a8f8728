"""`oak tui --web`: the dashboard served to a real headless Chromium, behind the user's credentials."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import pytest

from broker.ca import Authority, cert_pem
from services.cli.client import Profile
from services.common.mqtt import BrokerUrl
from tests.stack import REPO, Stack, eventually, free_port, oak
from tests.tui.test_dashboard_live import JOB, start
from tui.web import Login

pytestmark = pytest.mark.timeout(180)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

#: Keeps what the dashboard's websocket brings, so the test can read the screen's text (xterm.js draws it on a
#: canvas).
WATCH_WEBSOCKETS = """
window.__oakSeen = "";
const Native = window.WebSocket;
window.WebSocket = function (url, protocols) {
  const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
  const decoder = new TextDecoder();
  ws.addEventListener("message", (e) => {
    window.__oakSeen += typeof e.data === "string" ? e.data : decoder.decode(e.data, {stream: true});
  });
  return ws;
};
window.WebSocket.prototype = Native.prototype;
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
"""


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def serve(stack: Stack, port: int, *flags: str) -> subprocess.Popen[str]:
    """`oak tui --web` on *port*, once it says where it is."""
    server = subprocess.Popen(oak("tui", "--web", "--port", str(port), "--data-dir", str(stack.base / "root"),
                                  *flags), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    assert f"the dashboard is at http://127.0.0.1:{port}/" in line, line
    return server


def stop(server: subprocess.Popen[str]) -> list[psutil.Process]:
    """SIGTERM the server; the dashboard processes it had started (all should be gone)."""
    children = psutil.Process(server.pid).children(recursive=True)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def the_login_is_required(url: str, profile: Profile) -> None:
    """No credentials, a wrong password and a foreign page's websocket are refused; the user's are let in."""
    status, headers, body = get(url)
    assert status == 401, (status, headers)
    assert headers["WWW-Authenticate"].startswith("Basic ")
    assert "log in with your oak user name and password" in body
    began = time.monotonic()
    assert get(url, basic(profile.username, profile.password + "x"))[0] == 401
    assert time.monotonic() - began >= 0.9  # guessing is slow
    assert get(url, basic(profile.password, profile.username))[0] == 401
    assert get(url + "static/js/textual.js")[0] == 401
    status, headers, body = get(url, basic(profile.username, profile.password))
    assert status == 200
    assert "textual-terminal" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"]
    assert "SameSite=Strict" in headers["Set-Cookie"]
    assert get(url + "static/js/textual.js", {"Cookie": cookie})[0] == 200
    foreign = {"Cookie": cookie, "Origin": "http://evil.example", "Connection": "Upgrade", "Upgrade": "websocket",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    assert get(url + "ws", foreign)[0] == 403


async def test_the_dashboard_in_chromium(stack: Stack, api: Any, tmp_path: Path) -> None:
    """A logged-in headless Chromium shows the services screen with the RUNNING service (and a screenshot
    of it is kept), and its keys reach the dashboard (the events screen); a stranger is refused; stopping
    the server ends every browser's dashboard process."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    client = await start(stack, api)
    await client.request("services", "deploy", {"service": JOB})
    profile = stack.profile()
    port = free_port()
    server = serve(stack, port)
    browser = None
    try:
        the_login_is_required(f"http://127.0.0.1:{port}/", profile)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,800", f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_WEBSOCKETS})
        browser.get(f"http://{quote(profile.username)}:{quote(profile.password, safe='')}@127.0.0.1:{port}/")

        def screen() -> str:
            return str(browser.execute_script("return window.__oakSeen || ''"))

        await eventually(lambda: all(text in screen() for text in (JOB, "RUNNING", "Deploy")), 60, 0.5,
                         what="the services screen with the RUNNING service in Chromium")
        shot = tmp_path / "services.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 20_000
        if out := os.environ.get("OAK_TEST_SCREENSHOTS"):
            shutil.copy(shot, Path(out) / "web-dashboard-services.png")
        browser.find_element("css selector", ".textual-terminal").click()
        browser.switch_to.active_element.send_keys("3")  # keys reach the dashboard: its events screen
        await eventually(lambda: f"{JOB} #0: placed on cluster c1" in screen(), 30, 0.5,
                         what="the root's events on the dashboard's events screen")
        dashboards = [p for p in psutil.Process(server.pid).children(recursive=True) if "tui" in p.cmdline()]
        assert len(dashboards) == 1, dashboards  # this browser's session, as the user
    finally:
        if browser is not None:
            browser.quit()
        left = stop(server)
    assert left == []


def test_the_login_reads_only_the_users_name_and_password() -> None:
    login = Login(Profile("alice", "s3cret:with:colons", BrokerUrl("127.0.0.1", 1)))
    assert login.basic(basic("alice", "s3cret:with:colons")["Authorization"])
    assert login.basic("basic " + basic("alice", "s3cret:with:colons")["Authorization"].split()[1])
    for header in ("", "Basic", "Basic !!!", "Bearer abc", basic("alice", "s3cret")["Authorization"],
                   basic("bob", "s3cret:with:colons")["Authorization"], "Basic " + base64.b64encode(b"alice").decode()):
        assert not login.basic(header), header
    token = login.open_session()
    assert login.valid(token)
    assert not login.valid(None)
    assert not login.valid(token[:-1])
    login.sessions[token] = time.monotonic() - 1
    assert not login.valid(token)


def credentials(home: Path) -> Profile:
    """A data dir with a user's credentials.json (the web server reads it; it calls the root only per browser)."""
    home.mkdir(mode=0o700, exist_ok=True)
    (home / "credentials.json").write_text(json.dumps({"username": "alice", "password": "pw",
                                                       "root": "mqtts://127.0.0.1:1"}))
    return Profile.load(home)


def test_https_and_a_taken_port(tmp_path: Path) -> None:
    """With --tls-cert/--tls-key it speaks https (and its page points at wss://); a taken port is one clear
    line and exit status 1; half the TLS pair is refused."""
    credentials(tmp_path / "home")
    authority = Authority.create("test CA")
    chain, key = authority.server_chain("dashboard", hosts=("127.0.0.1",))
    (tmp_path / "cert.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(cert_pem(authority.cert))
    port = free_port()
    command = oak("tui", "--web", "--port", str(port), "--data-dir", str(tmp_path / "home"),
                  "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        assert f"https://127.0.0.1:{port}/" in server.stdout.readline()
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/", context=context, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(f"https://127.0.0.1:{port}/", headers=basic("alice", "pw"))
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            page = answer.read().decode()
            assert "Secure" in answer.headers["Set-Cookie"]
        assert f"wss://127.0.0.1:{port}/ws" in page
        taken = subprocess.run(oak("tui", "--web", "--port", str(port), "--data-dir", str(tmp_path / "home")),
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1
        assert f"oak: cannot serve the dashboard on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
        half = subprocess.run(oak("tui", "--web", "--data-dir", str(tmp_path / "home"), "--tls-cert", "x.pem"),
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert half.returncode == 2
        assert "--tls-cert and --tls-key go together" in half.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
