"""What a worker holds, as Prometheus families read at scrape time (services/common/metrics.py serves them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.common.metrics import by_state, instance_families
from services.worker.engine import Engine


def reader(engine: Engine) -> Callable[[], Iterator[Metric]]:
    """The worker's instances by service and status, each running one's CPU, memory and disk I/O, and its GPUs."""

    def read() -> Iterator[Metric]:
        slots = dict(engine.slots)
        statuses = engine.statuses()
        yield instance_families((slots[iid].spec.service_key, s.status) for iid, s in statuses.items() if iid in slots)
        labels = ["instance", "service"]
        cpu = GaugeMetricFamily("oak_instance_cpu_percent", "CPU use of a running instance (100 = one core)",
                                labels=labels)
        memory = GaugeMetricFamily("oak_instance_memory_bytes", "Memory of a running instance", labels=labels)
        io = GaugeMetricFamily("oak_instance_io_bytes", "Disk bytes a running instance read and wrote",
                               labels=labels)
        for iid, status in sorted(statuses.items()):
            if iid in slots and slots[iid].handle is not None:
                key = [iid, slots[iid].spec.service_key]
                cpu.add_metric(key, status.cpu_percent)
                memory.add_metric(key, status.memory_mb * 2**20)
                io.add_metric(key, status.io_mb * 2**20)
        yield from (cpu, memory, io)
        held = len(set(engine.gpu_holders) & {g.uuid for g in engine.gpus})
        yield by_state("oak_gpus", "This worker's GPUs by state", {"held": held, "free": len(engine.gpus) - held})

    return read
