"""``python -m tui``: the dashboard (what ``oak tui`` runs, and each browser session of ``oak tui --web``)."""

import sys

from tui.cli import main

sys.exit(main())
