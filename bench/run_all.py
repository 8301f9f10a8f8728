"""``make bench``: every benchmark, one after another, each with its own defaults.

Each writes its figures to bench/results/<name>.json (and prints them); BENCHMARKS.md is where they are
read and compared by hand. A benchmark that fails is reported at the end and the others still run.
Some need root, network namespaces or QEMU and say so when they cannot run. Ctrl-C or SIGTERM stops the
one running after it has stopped what it started, and runs no other.

Run: ``.venv/bin/python -m bench.run_all [NAME ...]`` (default: all of :data:`BENCHMARKS`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

BENCHMARKS = ("store", "three_tiers", "placement", "scale", "load", "tls", "containers", "runtimes", "overlay",
              "rollout", "partition", "chaos", "metrics")


def main() -> None:
    names = sys.argv[1:] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    failed = []
    running: subprocess.Popen[bytes] | None = None
    stopped: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        """Let the benchmark running now clean up and end (Ctrl-C reaches it from the terminal too; a SIGTERM
        is passed on), then run no other. subprocess.run would kill it 0.25 s after a Ctrl-C, fleet and all."""
        stopped.append(signum)
        if running is not None and signum == signal.SIGTERM:
            running.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for n, name in enumerate(names, 1):
        print(f"[{n}/{len(names)}] bench.{name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        running = subprocess.Popen([sys.executable, "-m", f"bench.{name}"])
        code = running.wait()
        print(f"[{n}/{len(names)}] bench.{name}: {'ok' if code == 0 else 'FAILED'} in "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if code != 0:
            failed.append(name)
        if stopped:
            sys.exit(f"stopped by {signal.Signals(stopped[0]).name} during bench.{name}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
