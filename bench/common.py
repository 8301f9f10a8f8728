"""Helpers for benchmarks: statistics and the results record."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    """The *q*-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    """n, median, p95, min and max of *values*."""
    return {"n": len(values), "median": statistics.median(values), "p95": percentile(values, 95),
            "min": min(values), "max": max(values)}


def machine() -> str:
    """A one-line description of this machine."""
    return (f"{platform.node()}: {psutil.cpu_count()} cpus, {psutil.virtual_memory().total // 2**30} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def record(name: str, result: dict[str, Any]) -> None:
    """Print *result* and keep it in bench/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
