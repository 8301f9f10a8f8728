"""``python -m tui`` / ``oak tui``: run the dashboard against the root named in credentials.json."""

from __future__ import annotations

import argparse
import sys

from services.cli.client import CliError, Profile, oak_home
from tui.app import OakApp
from tui.feed import MqttFeed


def main(argv: list[str] | None = None) -> int:
    """Parse ``--data-dir``/``--root`` and run the dashboard."""
    parser = argparse.ArgumentParser(prog="oak tui", description="The Oakling dashboard.")
    parser.add_argument("--data-dir", help="where credentials.json is (default: $OAK_HOME or ~/.oak)")
    parser.add_argument("--root", help="the root broker, HOST:PORT (default: from credentials.json)")
    args = parser.parse_args(argv)
    try:
        profile = Profile.load(oak_home(args.data_dir), args.root)
    except CliError as exc:
        print(f"oak: {exc}", file=sys.stderr)
        return 1
    OakApp(MqttFeed(profile)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
