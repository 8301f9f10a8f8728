"""``make bench``: every benchmark, one after another, each with its own defaults.

Each writes its figures to bench/results/<name>.json (and prints them); BENCHMARKS.md is where they are
read and compared by hand. A benchmark that fails is reported at the end and the others still run.
Some need root, network namespaces or QEMU and say so when they cannot run.

Run: ``.venv/bin/python -m bench.run_all [NAME ...]`` (default: all of :data:`BENCHMARKS`).
"""

from __future__ import annotations

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
    for n, name in enumerate(names, 1):
        print(f"[{n}/{len(names)}] bench.{name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", f"bench.{name}"])
        print(f"[{n}/{len(names)}] bench.{name}: {'ok' if done.returncode == 0 else 'FAILED'} in "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if done.returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
