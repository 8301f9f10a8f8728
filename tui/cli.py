"""``oak tui`` (and ``python -m tui``): run the dashboard against the root named in credentials.json, in this
terminal or (``--web``) for browsers."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.cli.client import CliError, Profile, oak_home


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dashboard's flags (``oak tui`` and ``python -m tui`` share them)."""
    parser.add_argument("--data-dir", help="where credentials.json is (default: $OAK_HOME or ~/.oak)")
    parser.add_argument("--root", help="the root broker, HOST:PORT (default: from credentials.json)")
    web = parser.add_argument_group("in a browser")
    web.add_argument("--web", action="store_true",
                     help="serve the dashboard to browsers (log in with this user's name and password)")
    web.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    web.add_argument("--port", type=port_number, default=8080, help="the port to listen on (default: 8080)")
    web.add_argument("--public-url", help="the address browsers use, when not http(s)://HOST:PORT (a proxy)")
    web.add_argument("--tls-cert", type=Path, help="serve https with this certificate (PEM, chain first)")
    web.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")


def port_number(text: str) -> int:
    """A TCP port, 1-65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    """Run the dashboard as the parsed flags say."""
    if (args.tls_cert is None) != (args.tls_key is None):
        print("oak: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    data_dir = oak_home(args.data_dir)
    try:
        profile = Profile.load(data_dir, args.root)
    except CliError as exc:
        print(f"oak: {exc}", file=sys.stderr)
        return 1
    if args.web:
        from tui.web import WebOptions, serve

        options = WebOptions(args.host, args.port, args.public_url, args.tls_cert, args.tls_key)
        try:
            asyncio.run(serve(profile, data_dir, args.root, options))
        except OSError as exc:  # the port is taken, the certificate unreadable, ...
            print(f"oak: cannot serve the dashboard on {args.host}:{args.port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        return 0
    from tui.app import OakApp
    from tui.feed import MqttFeed

    OakApp(MqttFeed(profile)).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the dashboard."""
    parser = argparse.ArgumentParser(prog="oak tui", description="The Oakling dashboard.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
