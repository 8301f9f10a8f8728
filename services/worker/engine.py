"""The NodeEngine core: make what runs on this node match the desired map from the cluster.

Each instance has a supervisor task that starts it through its runtime, waits for it to end,
reports how it ended and restarts it with exponential backoff, except a ``one_shot`` service that
exited 0 (COMPLETED). Handles are stored in TinyDB, so a restarted worker re-adopts instances that
are still running instead of starting them twice, and stops those no longer wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.common import models
from services.common.metrics import TierMetrics
from services.common.models import InstanceSpec, InstanceStatus
from services.common.plugin_api import Exit, Handle, LaunchSpec, Runtime
from services.common.sla import VM_VIRTUALIZATIONS, HealthCheck
from services.common.store import Store
from services.worker import gpus
from services.worker import secrets as secret_files
from services.worker.gpus import Gpu
from services.worker.health import Health, Target, probe
from services.worker.overlay import Attachment, Network

log = logging.getLogger(__name__)

TABLE = "instances"
STOP_GRACE = 5.0
# An instance behind a service IP keeps running this long after it is no longer wanted: the cluster
# took it out of every worker's net table in the same pass, so no new connection reaches it once it
# stops (an update replacing it fails no request).
DRAIN = 1.0
VOLUMES = "volumes"  # <data dir>/volumes/<owner>/<job name>/<volume>: kept until deleted
VOLUME_SIZES_EVERY = 10.0  # seconds between two measures of the volumes' sizes
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0


def backoff(restarts: int) -> float:
    """Seconds to wait before restart number *restarts* (1, 2, 4 ... up to 30)."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, restarts - 1)))


def ended_status(spec: InstanceSpec, end: Exit, restarts: int) -> InstanceStatus:
    """COMPLETED for a one_shot service that exited 0; DEAD for any other end."""
    if spec.service.one_shot and end.code == 0:
        return InstanceStatus(models.COMPLETED, end.reason, exit_code=0, restarts=restarts)
    return InstanceStatus(models.DEAD, end.reason, exit_code=end.code, restarts=restarts)


@dataclass
class Slot:
    """One instance on this node: what is wanted, its handle and status, and its supervisor."""

    spec: InstanceSpec
    status: InstanceStatus
    handle: Handle | None = None
    task: asyncio.Task[None] | None = None
    stats: dict[str, float] = field(default_factory=dict)
    ip: str = ""
    netns: str = ""  # the path of its network namespace on the overlay
    host: str = ""  # where its IP is reached from (the worker's side of the overlay; "": the worker's own)
    gpus: tuple[str, ...] = ()  # the UUIDs of the GPUs it holds (services/worker/gpus.py), kept across restarts


class Engine:
    """Reconciles desired instances with running ones."""

    def __init__(
        self,
        node: str,
        runtimes: dict[str, Runtime],
        store: Store,
        data_dir: Path,
        on_change: Callable[[], None] = lambda: None,
        stop_grace: float = STOP_GRACE,
        network: Network | None = None,
        drain: float = DRAIN,
        secrets: Callable[[str], Awaitable[dict[str, bytes]]] | None = None,
        gpus: Sequence[Gpu] = (),
    ) -> None:
        self.node = node
        self.drain = drain
        self.secrets = secrets  # fetches an instance's secrets (services/worker/secrets.py)
        self.network = network
        self.gpus = list(gpus)  # this node's GPUs
        self.gpu_holders: dict[str, str] = {}  # GPU UUID -> the instance holding it (until it has stopped)
        self.metrics: TierMetrics | None = None  # what it counts as it works, when the worker serves metrics
        self.stop_grace = stop_grace
        self.runtimes = runtimes
        self.store = store
        self.data_dir = data_dir
        self.on_change = on_change
        self.slots: dict[str, Slot] = {}
        self.desired: dict[str, InstanceSpec] | None = None  # the cluster's last map (None: none yet)
        self.fenced: frozenset[str] = frozenset()  # desired, but stopped while cut off (services/worker/fence.py)
        self._stopping: set[asyncio.Task[None]] = set()
        self.volume_sizes: dict[str, int] = {}  # owner/job/volume -> bytes, as last measured
        self._doomed: set[str] = set()  # volumes to delete once no instance here uses them
        self._sized_at = float("-inf")

    # ---- state -------------------------------------------------------------------------------

    def starting(self) -> bool:
        """Whether an instance is on its way to running (its start's report is still to come)."""
        return any(slot.status.status == models.CREATING for slot in self.slots.values())

    def statuses(self) -> dict[str, InstanceStatus]:
        """The observed status of every instance this node holds."""
        out = {}
        for iid, slot in self.slots.items():
            out[iid] = replace(
                slot.status,
                node=self.node,
                cpu_percent=slot.stats.get("cpu_percent", 0.0),
                memory_mb=slot.stats.get("memory_mb", 0.0),
                io_mb=slot.stats.get("io_mb", 0.0),
                ip=slot.ip,
            )
        return out

    @staticmethod
    def _doc(slot: Slot, status: InstanceStatus | None = None) -> dict[str, object]:
        """What the store keeps of *slot*, with *status* instead of its current one when given."""
        handle = models.dump(slot.handle) if slot.handle else None
        return {"spec": slot.spec.doc, "handle": handle, "status": models.dump(status or slot.status),
                "gpus": list(slot.gpus)}

    def _set(self, slot: Slot, status: InstanceStatus) -> None:
        slot.status = replace(status, since=round(time.time(), 3))
        self.on_change()

    async def _record(self, slot: Slot, status: InstanceStatus) -> None:
        """Store *status* (with the handle), and only then make it the slot's and report it: whatever the
        cluster hears of (in this report or any other made meanwhile) is on disk, so a worker killed right
        after still adopts what it reported."""
        status = replace(status, since=round(time.time(), 3))
        await self.store.put(TABLE, slot.spec.iid, self._doc(slot, status))
        slot.status = status
        self.on_change()

    # ---- reconciliation ----------------------------------------------------------------------

    async def restore(self) -> None:
        """Load the instances of a previous run; adopt the ones still running."""
        for iid, doc in (await self.store.load(TABLE)).items():
            try:
                spec = models.load(InstanceSpec, doc["spec"])
                status = models.load(InstanceStatus, doc["status"])
                handle = models.load(Handle, doc["handle"]) if doc.get("handle") else None
                held = tuple(doc.get("gpus") or ())
                if not all(isinstance(uuid, str) for uuid in held):
                    raise ValueError(f"bad GPU list {held!r:.80}")
            except (ValueError, KeyError) as exc:
                log.warning("dropping unreadable stored instance %s: %s", iid, exc)
                await self.store.delete(TABLE, iid)
                continue
            runtime = self.runtimes.get(spec.service.virtualization)
            adopted = bool(handle and runtime and await runtime.adopt(handle))
            slot = Slot(spec, status, handle if adopted else None, gpus=held)
            self.gpu_holders |= dict.fromkeys(held, iid)
            self.slots[iid] = slot
            if adopted:
                log.info("adopted %s (pid %s), still running", iid, handle.pid if handle else "?")
            if status.status != models.COMPLETED:
                slot.task = asyncio.create_task(self._supervise(slot, adopted=adopted))
        await self.measure_volumes()

    async def apply(self, desired: dict[str, InstanceSpec]) -> None:
        """Start what is newly desired and stop what no longer is (or is fenced)."""
        self.desired = desired
        await self._reconcile()

    async def fence(self, fenced: frozenset[str]) -> None:
        """Stop the instances *fenced* (they stay desired) and start again those no longer fenced."""
        if self.desired is None or fenced == self.fenced:
            return  # no map yet: nothing is known to stop or start
        for iid in sorted(fenced - self.fenced):
            log.warning("fencing %s: cut off from the cluster for longer than its stop_after", iid)
        for iid in sorted((self.fenced - fenced) & self.desired.keys()):
            log.info("%s is no longer fenced: starting it again", iid)
        self.fenced = fenced
        await self._reconcile()

    async def _reconcile(self) -> None:
        began = time.perf_counter()
        desired = {iid: spec for iid, spec in (self.desired or {}).items() if iid not in self.fenced}
        for iid in [iid for iid in self.slots if iid not in desired]:
            slot = self.slots.pop(iid)
            task = asyncio.create_task(self._remove(slot))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        new = {iid: Slot(spec, InstanceStatus(models.CREATING))
               for iid, spec in desired.items() if iid not in self.slots}
        self._doomed -= {key for slot in new.values() for key in slot.spec.volume_keys}  # wanted again
        self.slots.update(new)
        for slot in new.values():  # they start while their CREATING is written: what they store next (the
            # RUNNING with its handle, before any report of it) is written after it
            slot.task = asyncio.create_task(self._supervise(slot, adopted=False))
        if new:
            await self.store.put_many(TABLE, {iid: self._doc(slot) for iid, slot in new.items()})  # one write
        self.on_change()
        if self.metrics:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - began)

    async def _remove(self, slot: Slot) -> None:
        if slot.spec.rr_ip and slot.handle and self.network:
            await asyncio.sleep(self.drain)
        if slot.task:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slot.task
        runtime = self.runtimes.get(slot.spec.service.virtualization)
        if slot.handle and runtime:
            await runtime.stop(slot.handle, self.stop_grace)
        if self.network:
            await self.network.detach(slot.spec.iid)
        await self._clear_secrets(slot.spec)
        for uuid in slot.gpus:
            self.gpu_holders.pop(uuid, None)
        await self.store.delete(TABLE, slot.spec.iid)
        log.info("removed %s", slot.spec.iid)
        if self._doomed & set(slot.spec.volume_keys):
            await self._delete_doomed()

    async def _supervise(self, slot: Slot, *, adopted: bool) -> None:
        """Run one instance until it completes or is removed."""
        spec = slot.spec
        runtime = self.runtimes.get(spec.service.virtualization)
        if runtime is None:
            self._set(slot, InstanceStatus(models.FAILED, f"this node has no {spec.service.virtualization} runtime"))
            return
        restarts = slot.status.restarts
        while True:
            if adopted:
                await self._reattach(slot)
            else:
                try:
                    place = await self._attach(slot)
                    launch = replace(self._launch_spec(spec, place), on_progress=self._progress(slot))
                    if launch.volumes:
                        await asyncio.to_thread(self._make_volumes, launch)
                    if spec.service.secret_names:
                        launch = await self._with_secrets(launch, spec)
                    if spec.service.vgpus:
                        launch = self._with_gpus(slot, launch)
                    slot.handle = await _start(runtime, launch, slot)
                except Exception as exc:  # a runtime's failure is the instance's, never the worker's
                    if not isinstance(exc, RuntimeError):
                        log.exception("runtime %s failed to start %s", runtime.name, spec.iid)
                    slot.handle = None
                    restarts += 1
                    await self._record(slot, InstanceStatus(models.FAILED, str(exc), restarts=restarts))
                    await asyncio.sleep(backoff(restarts))
                    continue
                health = models.STARTING if spec.service.health else ""
                await self._record(slot, InstanceStatus(models.RUNNING, restarts=restarts, health=health))
                log.info("started %s (%s)", spec.iid, spec.job_name)
            adopted = False
            assert slot.handle is not None
            try:
                end = await self._watch(slot, runtime, slot.handle)
            except Exception as exc:  # keep supervising: report it and start again
                log.exception("runtime %s lost %s", runtime.name, spec.iid)
                end = Exit(None, f"lost track of the instance: {exc}")
            slot.handle = None
            status = ended_status(spec, end, restarts)
            await self._record(slot, status)
            log.info("%s ended: %s (%s)", spec.iid, status.status, end.reason)
            if status.status == models.COMPLETED:
                return
            restarts += 1
            await asyncio.sleep(backoff(restarts))

    async def _watch(self, slot: Slot, runtime: Runtime, handle: Handle) -> Exit:
        """Wait for the instance to end; with a health check, check it meanwhile and end it once it is
        unhealthy (the supervisor then restarts it, as after any other end)."""
        check = slot.spec.service.health
        if check is None:
            return await runtime.wait(handle)
        waiting = asyncio.ensure_future(runtime.wait(handle))
        checking = asyncio.ensure_future(self._check(slot, check, runtime, handle))
        try:
            await asyncio.wait((waiting, checking), return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                return waiting.result()
            reason = checking.result()
            log.warning("%s %s: restarting it", slot.spec.iid, reason)
            await runtime.stop(handle, self.stop_grace)
            end = await waiting
            return Exit(end.code, f"{reason}; stopped to start again")
        finally:
            for task in (waiting, checking):
                task.cancel()

    async def _check(self, slot: Slot, check: HealthCheck, runtime: Runtime, handle: Handle) -> str:
        """Try *check* now and every ``interval`` seconds, showing the verdict in the instance's status;
        return the reason once the instance is unhealthy."""
        vm = slot.spec.service.virtualization in VM_VIRTUALIZATIONS  # its namespace passes all to the guest
        target = Target(runtime, handle, slot.ip, slot.host if vm else slot.netns)
        started = time.monotonic()
        verdict = Health(slot.status.health or models.STARTING)
        while True:
            verdict = verdict.after(check, await probe(check, target), time.monotonic() - started)
            reason = verdict.describe(check)
            if (verdict.state, reason) != (slot.status.health, slot.status.reason):
                slot.status = replace(slot.status, health=verdict.state, reason=reason)
                self.on_change()
            if verdict.state == models.UNHEALTHY:
                return reason
            await asyncio.sleep(check.interval)

    def _secrets_dir(self, spec: InstanceSpec) -> Path:
        return self.data_dir / "secrets" / spec.iid

    async def _clear_secrets(self, spec: InstanceSpec) -> None:
        """Remove the instance's secret files (and their tmpfs), if it has secrets."""
        if spec.service.secret_names:
            await asyncio.to_thread(secret_files.clear, self._secrets_dir(spec))

    async def _with_secrets(self, launch: LaunchSpec, spec: InstanceSpec) -> LaunchSpec:
        """*launch* with the instance's secrets, fetched now (never stored: each start asks again)."""
        if self.secrets is None:
            raise RuntimeError("this worker cannot fetch secrets")
        values = await self.secrets(spec.iid)
        laid = await asyncio.to_thread(secret_files.lay_out, spec.service, values, self._secrets_dir(spec))
        return replace(launch, **dataclasses.asdict(laid))

    def _with_gpus(self, slot: Slot, launch: LaunchSpec) -> LaunchSpec:
        """*launch* with the GPUs the instance holds, given now if it holds none yet (RuntimeError when too
        few are free: the instance waits and tries again)."""
        wanted = slot.spec.service.vgpus
        if len(slot.gpus) != wanted or not set(slot.gpus) <= {g.uuid for g in self.gpus}:
            for uuid in slot.gpus:  # (a GPU that is gone since the instance was given it)
                self.gpu_holders.pop(uuid, None)
            slot.gpus = ()
            slot.gpus = tuple(g.uuid for g in gpus.assign(self.gpus, self.gpu_holders, wanted))
            self.gpu_holders |= dict.fromkeys(slot.gpus, slot.spec.iid)
        return replace(launch, gpus=tuple(g.device for g in self.gpus if g.uuid in slot.gpus))

    def _progress(self, slot: Slot) -> Callable[[str], None]:
        """A callback for the runtime (from any thread): CREATING with *reason*, e.g. an image pull."""
        loop = asyncio.get_running_loop()

        def show(reason: str) -> None:
            if slot.handle is None and self.slots.get(slot.spec.iid) is slot:
                self._set(slot, InstanceStatus(models.CREATING, reason, restarts=slot.status.restarts))

        def from_any_thread(reason: str) -> None:
            loop.call_soon_threadsafe(show, reason)

        return from_any_thread

    async def _attach(self, slot: Slot) -> Attachment | None:
        """The instance's place on the overlay (None without one)."""
        if self.network is None:
            return None
        place = await self.network.attach(slot.spec.iid, slot.spec.service.port)
        slot.ip, slot.netns, slot.host = place.ip, place.netns, place.host
        return place

    async def _reattach(self, slot: Slot) -> None:
        """Find an adopted instance's overlay IP again (its namespace outlived the worker)."""
        try:
            await self._attach(slot)
        except RuntimeError as exc:
            log.warning("adopted %s but cannot find its overlay address: %s", slot.spec.iid, exc)
        self.on_change()

    def _launch_spec(self, spec: InstanceSpec, place: Attachment | None = None) -> LaunchSpec:
        svc = spec.service
        return LaunchSpec(
            iid=spec.iid,
            job_name=spec.job_name,
            instance_number=spec.instance_number,
            virtualization=svc.virtualization,
            code=svc.code,
            cmd=tuple(svc.cmd),
            environment=tuple(svc.environment),
            memory_mb=int(svc.memory),
            vcpus=float(svc.vcpus),
            one_shot=svc.one_shot,
            log_path=str(self.data_dir / "logs" / f"{spec.iid}.log"),
            work_dir=str(self.data_dir / "work" / spec.iid),
            privileged=svc.privileged,
            port=svc.port,
            netns=place.netns if place else "",
            ip=place.ip if place else "",
            gateway=place.gateway if place else "",
            arch=tuple(svc.extra.get("arch", ())),  # a list of strings (checked with the SLA)
            volumes=tuple((str(self.data_dir / VOLUMES / key), ref.path)
                          for key, ref in zip(spec.volume_keys, svc.volumes, strict=True)),
            volume_sizes_mb=tuple(ref.size_mb for ref in svc.volumes),
        )

    def _make_volumes(self, launch: LaunchSpec) -> None:
        """Create the instance's volumes that do not exist yet (then measured and reported soon)."""
        for source, _ in launch.volumes:
            if not Path(source).is_dir():
                Path(source).mkdir(parents=True)
                self._sized_at = float("-inf")

    # ---- volumes -------------------------------------------------------------------------------

    async def measure_volumes(self) -> None:
        """Refresh :attr:`volume_sizes` (at most every VOLUME_SIZES_EVERY seconds: it walks the files)."""
        now = time.monotonic()
        if now - self._sized_at >= VOLUME_SIZES_EVERY:
            self._sized_at = now
            self.volume_sizes = await asyncio.to_thread(_volume_sizes, self.data_dir / VOLUMES)

    async def delete_volumes(self, keys: list[str]) -> list[str]:
        """Delete the volumes *keys* (``owner/job/volume``) once no instance here uses them (the instances
        of a deleted application may still be on their way out: their volumes go after them, unless the
        service is wanted here again meanwhile); return those deleted now."""
        self._doomed |= {k for k in keys if len(k.split("/")) == 3 and ".." not in k.split("/")}
        await asyncio.gather(*self._stopping, return_exceptions=True)
        return await self._delete_doomed()

    async def _delete_doomed(self) -> list[str]:
        used = {key for slot in self.slots.values() for key in slot.spec.volume_keys}
        deleted = []
        for key in sorted(self._doomed - used):
            self._doomed.discard(key)
            where = self.data_dir / VOLUMES / key
            if not where.is_dir():
                continue
            await asyncio.to_thread(shutil.rmtree, where, True)
            deleted.append(key)
            log.info("deleted volume %s", key)
        if deleted:
            self._sized_at = float("-inf")
            await self.measure_volumes()
            self.on_change()
        return deleted

    async def sample(self) -> None:
        """Refresh the resource use of every running instance (and the volumes' sizes, now and then)."""
        await self.measure_volumes()
        for slot in self.slots.values():
            runtime = self.runtimes.get(slot.spec.service.virtualization)
            stats = await runtime.stats(slot.handle) if runtime and slot.handle else None
            slot.stats = ({"cpu_percent": stats.cpu_percent, "memory_mb": stats.memory_mb, "io_mb": stats.io_mb}
                          if stats else {})

    async def close(self) -> None:
        """Stop supervising and stop every instance (they restart from the store on the next run).

        Only a graceful stop does this; after ``kill -9`` the instances keep running and the next
        run adopts them.
        """
        for slot in self.slots.values():
            if slot.task:
                slot.task.cancel()
        for slot in self.slots.values():
            if slot.task:
                with contextlib.suppress(BaseException):
                    await slot.task
        log.info("stopping %d instance(s)", sum(1 for slot in self.slots.values() if slot.handle))
        stops = [
            runtime.stop(slot.handle, self.stop_grace)
            for slot in self.slots.values()
            if slot.handle and (runtime := self.runtimes.get(slot.spec.service.virtualization))
        ]
        await asyncio.gather(*stops, *self._stopping, return_exceptions=True)
        for slot in self.slots.values():  # stopped: their next start fetches the secrets again
            await self._clear_secrets(slot.spec)


async def _start(runtime: Runtime, launch: LaunchSpec, slot: Slot) -> Handle:
    """*runtime*'s start, run to its end even when the supervisor is cancelled meanwhile (by a removal or the
    worker's stop): a start in a thread or a child process goes on regardless, so what it started becomes
    the slot's handle, for whoever cancelled to stop, instead of running on unknown to anyone."""
    starting = asyncio.ensure_future(runtime.start(launch))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        await asyncio.wait([starting])
        if not starting.cancelled() and starting.exception() is None:
            slot.handle = starting.result()
        raise


def _volume_sizes(root: Path) -> dict[str, int]:
    """The bytes in each ``<owner>/<job>/<volume>`` directory under *root*."""
    sizes: dict[str, int] = {}
    for volume in root.glob("*/*/*"):
        if volume.is_dir():
            total = 0
            for path in volume.rglob("*"):
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink():
                        total += path.stat().st_size
            sizes["/".join(volume.relative_to(root).parts)] = total
    return sizes
