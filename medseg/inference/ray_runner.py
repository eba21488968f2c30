"""Batch prediction spread over Ray actors: the same batch, outcomes and files as serial predict.

The driver prepares the batch (:func:`~medseg.inference.runner.prepare_batch`), each actor loads the
model once and runs :func:`~medseg.inference.runner.predict_one` per scan, and the driver merges the
outcomes (:func:`~medseg.inference.runner.finish_batch`): one ``failures.csv``, resume by skipping
existing masks, per-scan claims. Ray is imported only here, and only when a Ray batch is run.

Every node must see the inputs, the model and the output folder at the same paths as the driver (a
shared file system) and have the same medseg installed; actors work in the driver's folder, so
relative paths mean the same everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medseg.errors import MedsegError
from medseg.inference.pipeline import PredictBatch, ScanOutcome, ScanReporter, predict_one
from medseg.inference.runner import PredictSummary, finish_batch, model_channels, prepare_batch
from medseg.io.scans import Scan

log = logging.getLogger(__name__)

#: Scans queued on one actor at a time: the next scan is waiting when one finishes, and a dead actor
#: takes few scans with it.
IN_FLIGHT_PER_ACTOR = 2
#: Times a scan is sent to an actor before an actor death while predicting it counts as its failure.
ATTEMPTS = 2
WORKER_DIED = "WorkerDied"


class _PredictWorker:
    """One Ray actor: loads the model once, then predicts scans of one batch by their index.

    Errors while loading are kept, not raised, so the driver can report them as the user error they are.
    """

    def __init__(self, model: Path | Sequence[Path], device: str, mirror: bool | None, threads: int,
                 batch: PredictBatch, cwd: str, options: dict[str, Any] | None = None) -> None:
        import torch

        from medseg.inference.predictor import Predictor

        self.batch = batch
        self.predictor: Predictor | None = None
        self.error: BaseException | None = None
        try:
            # The driver's paths (inputs, model, outputs) may be relative to its working folder.
            os.chdir(cwd)
        except OSError as exc:
            self.error = MedsegError(f"{cwd}: the driver's working folder is not reachable on a Ray node "
                                     f"({exc.strerror or exc}); inputs, model and outputs must be on a file "
                                     "system every node mounts at the same path")
            return
        torch.set_num_threads(threads)
        try:
            self.predictor = Predictor.from_checkpoint(model, device, mirror=mirror, **(options or {}))
        except Exception as exc:  # reported by the driver (ready) or as each scan's failure
            self.error = exc

    def ready(self) -> tuple[str, str, bool] | None:
        """None once the model is loaded, else the error that stopped it: class name, message, and
        whether it is a user error (sent as text: not every exception survives pickling)."""
        if self.error is None:
            return None
        return type(self.error).__name__, str(self.error), isinstance(self.error, MedsegError)

    def predict(self, index: int) -> ScanOutcome:
        """Predict the batch's scan ``index`` and write its outputs (never raises for a bad scan)."""
        scan = self.batch.scans[index]
        if self.predictor is None:
            return ScanOutcome(scan.path, self.batch.target(scan), "failed", type(self.error).__name__,
                               f"the Ray worker could not load the model: {self.error}")
        return predict_one(self.predictor, scan, self.batch)


@dataclass
class RayPlan:
    """How the batch is spread: actors, and what each asks of the cluster."""

    actors: int
    num_cpus: int
    num_gpus: int
    device: str


def plan_actors(resources: dict[str, float], device: str | None, actors: int | None, cpus_per_actor: int,
                scans: int) -> RayPlan:
    """One GPU per actor when the cluster has GPUs (unless ``device`` is cpu), else ``cpus_per_actor`` CPUs.

    ``actors`` None: as many as the cluster's GPUs (or CPUs / ``cpus_per_actor``), never more than scans.
    """
    if cpus_per_actor < 1:
        raise MedsegError(f"--ray-cpus-per-actor must be at least 1, not {cpus_per_actor}")
    if actors is not None and actors < 1:
        raise MedsegError(f"--ray-actors must be at least 1, not {actors}")
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        raise MedsegError("--device cuda, but the Ray cluster has no GPUs; use --device auto or cpu")
    use_gpu = gpus > 0 and device != "cpu"
    if actors is None:
        actors = gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // cpus_per_actor)
        actors = max(1, min(actors, scans))
    plan = RayPlan(actors, cpus_per_actor, 1 if use_gpu else 0, "cuda" if use_gpu else "cpu")
    for name, need, have in (("CPU", plan.actors * plan.num_cpus, resources.get("CPU", 0)),
                             ("GPU", plan.actors * plan.num_gpus, resources.get("GPU", 0))):
        if need > have:  # the extra actors would never start, and the scans queued on them never finish
            raise MedsegError(f"{plan.actors} Ray actor(s) need {need} {name}, the cluster has {have:g}: lower "
                              "--ray-actors or --ray-cpus-per-actor")
    return plan


def import_ray() -> Any:
    """The ``ray`` module, or a MedsegError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MedsegError("--ray needs Ray: pip install 'medseg[ray]'") from None
    return ray


def connect(address: str) -> bool:
    """Join a Ray cluster; True when this call started (and so must stop) a local one.

    ``auto``: the cluster named by ``RAY_ADDRESS`` or started on this machine with ``ray start``, else a
    new local one with this machine's CPUs and GPUs. Anything else is a cluster address (``host:6379``,
    ``ray://host:10001``). An already initialised Ray (a notebook, a test) is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address != "auto" or os.environ.get("RAY_ADDRESS"):  # a named cluster: never a local one instead
        where = address if address != "auto" else f"{os.environ['RAY_ADDRESS']} (RAY_ADDRESS)"
        try:
            ray.init(address=address, include_dashboard=False)
        except (ConnectionError, ValueError) as exc:
            raise MedsegError(f"cannot connect to the Ray cluster at {where}: {exc}") from None
        return False
    try:
        ray.init(address="auto", include_dashboard=False)
        return False
    except ConnectionError:
        log.info("no running Ray cluster found: starting a local one")
    ray.init(address="local", include_dashboard=False)
    return True


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def _failed(batch: PredictBatch, index: int, error: str, message: str) -> ScanOutcome:
    scan = batch.scans[index]
    return ScanOutcome(scan.path, batch.target(scan), "failed", error, message)


def run_on_actors(batch: PredictBatch, model: Path | Sequence[Path], plan: RayPlan, mirror: bool | None = None,
                  name_prefix: str = "medseg-predict", options: dict[str, Any] | None = None) -> list[ScanOutcome]:
    """Predict the batch's scans that are not done on ``plan.actors`` actors; outcomes in scan order.

    An actor that dies (a crash, out of memory, a lost node) is replaced once per actor of the plan; the
    scans it held are sent again, and one whose second attempt also meets a dying actor is a failure.
    """
    outcomes: dict[int, ScanOutcome] = {}
    todo = deque(i for i, scan in enumerate(batch.scans) if not batch.done(scan))
    for i, scan in enumerate(batch.scans):
        if batch.done(scan):
            outcomes[i] = ScanOutcome(scan.path, batch.target(scan), "skipped")
    if not todo:
        return [outcomes[i] for i in range(len(batch.scans))]

    import ray
    from ray.exceptions import RayActorError, RayError

    worker = ray.remote(_PredictWorker)
    batch_ref = ray.put(batch)  # sent to each actor once, not with every scan
    cwd = os.getcwd()
    token = os.urandom(4).hex()
    actors: dict[int, Any] = {}  # slot -> live actor handle
    made = 0

    def start_actor() -> int:
        nonlocal made
        # Named, so an operator (or a test) can find this run's actors: ray.util.list_named_actors().
        actors[made] = worker.options(name=f"{name_prefix}-{token}-{made}", num_cpus=plan.num_cpus,
                                      num_gpus=plan.num_gpus, max_restarts=0).remote(
            model, plan.device, mirror, plan.num_cpus, batch_ref, cwd, options)
        made += 1
        return made - 1

    for _ in range(plan.actors):
        start_actor()
    replacements = plan.actors
    deaths = dict.fromkeys(todo, 0)  # times an actor died while running the scan
    inflight: dict[Any, tuple[int, int]] = {}  # object ref -> (slot, scan index), in submission order
    load = dict.fromkeys(actors, 0)

    resent: set[int] = set()  # scans sent again after their actor died

    def record(index: int, outcome: ScanOutcome) -> None:
        if index in resent and outcome.status == "claimed" and outcome.target.is_file():
            # The dead actor held this scan's claim until it died: a mask that appeared since the start is the
            # one it wrote just before dying (complete: writes are atomic), not another run's.
            outcome = dataclasses.replace(outcome, status="written")
        outcomes[index] = outcome
        bar.update(1)

    def actor_died(slot: int, refs: list[Any], exc: Exception) -> None:
        """Replace a dead actor and send its scans again; only the one it was running is charged."""
        nonlocal replacements
        log.warning("a Ray predict worker died (%s); its scans are sent again", type(exc).__name__)
        ray.kill(actors.pop(slot))  # it may be unreachable rather than dead: make sure
        if replacements > 0:
            replacements -= 1
            load[start_actor()] = 0
        charged = False
        retry: list[int] = []
        for ref in refs:  # in submission order: an actor runs its scans one after another
            index = inflight.pop(ref)[1]
            try:
                record(index, ray.get(ref))  # finished before the death
                continue
            except RayActorError:
                pass
            except RayError as err:
                record(index, _failed(batch, index, type(err).__name__, _first_line(err)))
                continue
            if not charged:  # the first unfinished scan was running; the later ones were only queued
                charged = True
                deaths[index] += 1
                if deaths[index] >= ATTEMPTS:
                    record(index, _failed(batch, index, WORKER_DIED,
                                          f"the Ray worker predicting this scan died {ATTEMPTS} times (a crash, out "
                                          "of memory or a lost node?); see the Ray logs of its node"))
                    continue
            retry.append(index)
        resent.update(retry)
        todo.extendleft(reversed(retry))

    bar = tqdm(total=len(batch.scans), initial=len(outcomes), desc="predict (ray)", unit="scan", disable=None)
    try:
        for error in ray.get([actor.ready.remote() for actor in actors.values()]):
            if error is not None:
                name, message, user_error = error
                if user_error:
                    raise MedsegError(message)
                raise RuntimeError(f"a Ray worker could not load the model: {name}: {message}")
        while todo or inflight:
            for slot in list(actors):
                while todo and load[slot] < IN_FLIGHT_PER_ACTOR:
                    index = todo.popleft()
                    inflight[actors[slot].predict.remote(index)] = (slot, index)
                    load[slot] += 1
            if not inflight:
                break  # every actor died and none may be started: the rest is failed below
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, index = inflight[ref]
            try:
                outcome = ray.get(ref)
            except RayActorError as exc:
                actor_died(slot, [r for r, (s, _) in inflight.items() if s == slot], exc)
                continue
            except RayError as exc:
                outcome = _failed(batch, index, type(exc).__name__, _first_line(exc))
            del inflight[ref]
            load[slot] -= 1
            record(index, outcome)
        for index in todo:
            outcomes[index] = _failed(batch, index, WORKER_DIED,
                                      "not predicted: every Ray worker died and no more replacements were allowed")
    finally:
        bar.close()
        for actor in actors.values():
            ray.kill(actor)  # frees its CPUs/GPU now; an interrupted run leaves only temporaries, cleaned later
    return [outcomes[i] for i in range(len(batch.scans))]


def predict_paths_ray(model: Path | Sequence[Path], inputs: Sequence[Path], output_dir: Path, overwrite: bool = False,
                      device: str | None = "auto", mirror: bool | None = None, address: str = "auto",
                      actors: int | None = None, cpus_per_actor: int = 1, statistics: bool = True,
                      preview: bool = False, output_format: str = "auto", backend: str = "torch",
                      model_file: Path | None = None, precision: str = "float32",
                      max_memory_gib: float | None = None, reporter: ScanReporter | None = None,
                      scans: Sequence[Scan] | None = None) -> PredictSummary:
    """:func:`~medseg.inference.runner.predict_paths` with the scans spread over Ray actors (``scans``: as there).

    Same masks (bit for bit), ``failures.csv``, resume and claims as serial predict. ``address``: ``auto``
    or a cluster address (:func:`connect`). ``actors`` None: one per GPU of the cluster, or one per
    ``cpus_per_actor`` CPUs (each actor's torch threads). ``output_format``: see :mod:`medseg.io.output_formats`.
    """
    import_ray()  # before reading anything: without Ray, say how to install it
    options = {"statistics": statistics, "preview": preview, "output_format": output_format,
               "max_memory_gib": max_memory_gib, "reporter": reporter}  # memory: each actor's own budget, checked per scan
    # outputs refused before any actor reads the model; channels from the bundle spec (weights not read)
    batch = prepare_batch(inputs, output_dir, overwrite, channels=model_channels(model), scans=scans, **options)
    pending = sum(not batch.done(scan) for scan in batch.scans)
    if pending == 0:  # a finished batch needs no cluster
        return finish_batch(batch, run_on_actors(batch, model, RayPlan(0, 0, 0, "cpu"), mirror))
    started = connect(address)
    try:
        import ray

        plan = plan_actors(ray.cluster_resources(), device, actors, cpus_per_actor, pending)
        log.info("predicting %d scan(s) on %d Ray actor(s) (%s)", pending, plan.actors, plan.device)
        outcomes = run_on_actors(batch, model, plan, mirror,
                                 options={"backend": backend, "model_file": model_file, "precision": precision})
    finally:
        if started:
            ray.shutdown()
    return finish_batch(batch, outcomes)
