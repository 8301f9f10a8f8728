"""``oak tui --web``: the same dashboard in a browser (textual-serve), behind the user's credentials.

Each browser session runs its own ``oak tui`` process, logged in to the root as the user whose
credentials.json this is. The browser must prove it is that user: it logs in once with the same name and
password (HTTP Basic), and gets a session cookie (HttpOnly, SameSite=Strict) that the page's websocket
carries. A websocket opened by a page of another origin is refused, so a page elsewhere cannot drive the
dashboard with the cookie. The server listens on 127.0.0.1 unless ``--host`` says otherwise, and speaks
https with ``--tls-cert``/``--tls-key`` (Basic sends the password in the clear over plain http).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import secrets
import shlex
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
from aiohttp import web
from textual_serve.server import Server

from services.cli.client import Profile

COOKIE = "oak_session"
SESSION_SECONDS = 12 * 3600  # a browser logs in again after this
FAILED_LOGIN_DELAY = 1.0  # seconds before a wrong password is answered (guessing gets slow; others are not held)
REALM = 'Basic realm="oak dashboard", charset="UTF-8"'
QUIT_WAIT = 5.0  # seconds a dashboard process has to quit once told, before it is terminated

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class WebOptions:
    """Where and how the dashboard is served."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # what browsers call it, when not http(s)://host:port
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def url(self) -> str:
        """The address browsers use."""
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"{'https' if self.tls_cert else 'http'}://{self.host}:{self.port}"


class Login:
    """Who may use the dashboard (the profile's user), and the sessions of browsers that proved it."""

    def __init__(self, profile: Profile) -> None:
        self.username = profile.username.encode()
        self.password = profile.password.encode()
        self.sessions: dict[str, float] = {}  # cookie value -> when it expires (monotonic)

    def basic(self, header: str) -> bool:
        """Whether an ``Authorization`` header holds the user's name and password."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            username, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Both compared every time, in constant time: the answer tells nothing about which one was wrong.
        name_ok = hmac.compare_digest(username, self.username)
        password_ok = hmac.compare_digest(password, self.password)
        return bool(sep) and name_ok and password_ok

    def open_session(self) -> str:
        """A new session's cookie value."""
        now = time.monotonic()
        self.sessions = {k: t for k, t in self.sessions.items() if t > now}
        token = secrets.token_urlsafe(32)
        self.sessions[token] = now + SESSION_SECONDS
        return token

    def valid(self, token: str | None) -> bool:
        """Whether *token* is a live session's cookie."""
        expires = self.sessions.get(token or "")
        return expires is not None and expires > time.monotonic()


def same_origin(request: web.Request) -> bool:
    """Whether a request comes from a page of this server (browsers always send Origin on a websocket)."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


class WebDashboard(Server):
    """textual-serve's server with the login in front of every route (page, websocket, static, downloads)."""

    def __init__(self, command: str, login: Login, options: WebOptions) -> None:
        super().__init__(command, host=options.host, port=options.port, title="Oakling", public_url=options.url())
        self.login = login
        self.browsers: set[asyncio.Task[object]] = set()  # each open websocket's handler

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.middlewares.append(self.guard)
        return app

    async def on_shutdown(self, app: web.Application) -> None:
        """End every browser's session (aiohttp would wait a minute), and with it its dashboard process:
        textual-serve tells each to quit but does not wait for it to exit, so this does."""
        for task in list(self.browsers):
            task.cancel()
        await asyncio.gather(*self.browsers, return_exceptions=True)
        await asyncio.to_thread(end_children, QUIT_WAIT)

    async def on_startup(self, app: web.Application) -> None:
        """Nothing (textual-serve prints a banner here, before it listens): :func:`serve` speaks once it does."""

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let a browser with a session through, open one for the right name and password, refuse the rest."""
        if request.path == "/ws" and not same_origin(request):
            raise web.HTTPForbidden(text="oak: this dashboard's websocket is for its own page only\n")
        in_session = self.login.valid(request.cookies.get(COOKIE))
        if not in_session and not self.login.basic(request.headers.get("Authorization", "")):
            if "Authorization" in request.headers:
                await asyncio.sleep(FAILED_LOGIN_DELAY)
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": REALM},
                                       text="oak: log in with your oak user name and password\n")
        if request.path == "/ws":
            return await self.browse(request, handler)
        response = await handler(request)
        if not in_session:
            response.set_cookie(COOKIE, self.login.open_session(), httponly=True, samesite="Strict",
                                secure=request.secure, max_age=SESSION_SECONDS)
        return response

    async def browse(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run one browser's websocket (its dashboard process), known to :meth:`on_shutdown` while it runs."""
        task = asyncio.current_task()
        assert task is not None
        self.browsers.add(task)
        try:
            return await handler(request)
        finally:
            self.browsers.discard(task)


def session_command(data_dir: Path, root: str | None) -> str:
    """The shell command each browser session runs: this user's terminal dashboard (in the shell's place)."""
    return "exec " + shlex.join([sys.executable, "-m", "tui", "--data-dir", str(data_dir),
                                 *(["--root", root] if root else [])])


def end_children(grace: float) -> None:
    """Wait up to *grace* seconds for this process's children (the dashboards told to quit) to exit, then
    terminate the rest, then kill what still stays."""
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(alive, timeout=2)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def tls_context(options: WebOptions) -> ssl.SSLContext | None:
    """An https context from ``--tls-cert``/``--tls-key``, or None for plain http."""
    if options.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(options.tls_cert, options.tls_key)
    return context


async def serve(profile: Profile, data_dir: Path, root: str | None, options: WebOptions) -> None:
    """Serve the dashboard until SIGINT or SIGTERM; each open browser's dashboard process ends with it."""
    context = tls_context(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dashboard = WebDashboard(session_command(data_dir, root), Login(profile), options)
    runner = web.AppRunner(await dashboard._make_app())
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port, ssl_context=context).start()
        print(f"oak: the dashboard is at {dashboard.public_url}/ (log in as {profile.username}, with the "
              "password in credentials.json); Ctrl+C stops it", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
