"""Where a sweep's runs train: warm worker processes on this machine, or Ray actors on a cluster.

Both start one normlab.worker.Worker per device (per GPU; one on a machine without one),
hand it RunRequests and report each RunResult as it comes back. Neither decides what to
train: the sweep does, from MLflow. A worker that dies (a crash, a lost node) fails the
runs it held with the reason, and they are tried again, resumed from their last
checkpoint, up to MAX_ATTEMPTS times.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import traceback
from dataclasses import dataclass, replace
from typing import Callable

from normlab.worker import CONCURRENT_ON_GPU, RunRequest, RunResult

MAX_ATTEMPTS = 3  # tries per run when workers die under it
OnResult = Callable[[RunResult], None]


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker of a sweep is started with."""

    data_dir: str
    experiment: str
    checkpoint_dir: str
    tracking_uri: str


def local_devices(device: str, cpu_workers: int = 1) -> list[tuple[str, dict[str, str]]]:
    """(device, environment) of each local worker: one per visible GPU, pinned to it with
    CUDA_VISIBLE_DEVICES, for auto/cuda when there is a GPU; else ``cpu_workers`` on the
    CPU, sharing its cores (OMP_NUM_THREADS), or the one device asked for."""
    import torch

    from normlab.train import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda" and device in ("auto", "cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible is not None \
            else [str(i) for i in range(torch.cuda.device_count())]
        return [("cuda", {"CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus]
    if resolved.type == "cpu" and cpu_workers > 1:
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cpu_workers))
        return [("cpu", {"OMP_NUM_THREADS": threads}) for _ in range(cpu_workers)]
    return [(str(resolved), {})]


def local_executor(device: str, cpu_workers: int, settings: WorkerSettings, echo: Callable[[str], None]):
    """Worker processes, one per device; the sweep's own process when there is one device."""
    devices = local_devices(device, cpu_workers)
    if len(devices) == 1:
        return InProcessExecutor(devices[0][0], settings, echo)
    return LocalExecutor(devices, settings, echo)


def _retry(request: RunRequest, result: RunResult, attempts: dict[str, int],
           checkpoint_dir: str | None = None) -> RunRequest | None:
    """The request that tries a run again after its worker died, or None when out of tries:
    a resume of its run when it has a checkpoint (the artifact, or a local copy in
    ``checkpoint_dir`` on this machine), else a new run (it died before its first epoch)."""
    key = request.config.config_hash()
    attempts[key] = attempts.get(key, 1) + 1
    if attempts[key] > MAX_ATTEMPTS:
        return None
    if result.run_id and _has_checkpoint(result.run_id, checkpoint_dir):
        return replace(request, run_id=result.run_id, resume=True)
    return replace(request, run_id=None, resume=False)


def _has_checkpoint(run_id: str, checkpoint_dir: str | None) -> bool:
    from normlab.sweep_tracking import has_checkpoint
    from normlab.tracking import local_checkpoint_path

    if checkpoint_dir and local_checkpoint_path(checkpoint_dir, run_id).exists():
        return True
    return has_checkpoint(run_id)


def _worker_died(request: RunRequest, run_id: str | None, why: str, device: str) -> RunResult:
    """Its run FAILED with the reason and its lease broken, so a retry may resume it at once."""
    from normlab.lease import break_lease
    from normlab.tracking import fail_run_if_open

    if run_id:
        break_lease(run_id)
        fail_run_if_open(run_id, why)
    return RunResult(request.config, run_id, "FAILED", why, device=device)


# -- on this machine --------------------------------------------------------------------

class InProcessExecutor:
    """The worker in the sweep's own process, for a machine with one device: the command has
    imported torch and MLflow and read the data already, so no second process pays that again."""

    def __init__(self, device: str, settings: WorkerSettings, echo: Callable[[str], None]):
        from normlab.worker import Worker

        self.worker = Worker(device, settings.data_dir, settings.experiment, settings.checkpoint_dir)
        self.echo = echo
        self.stopping = False
        self.workers = 1

    def describe(self) -> str:
        return f"1 worker in this process ({self.worker.device_name}), {self.worker.concurrent} run(s) at once"

    def run(self, requests: list[RunRequest], on_result: OnResult) -> None:
        from normlab.interrupts import stop_on_signals

        tasks: queue.Queue = queue.Queue()
        for request in requests:
            tasks.put(request)
        lock = threading.Lock()

        def serve() -> None:
            with self.worker.stream():
                while True:
                    try:
                        request = tasks.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        result = self.worker.train(request)
                    except Exception:  # a bug outside the run: fail this run, not the ones after it
                        result = RunResult(request.config, request.run_id, "FAILED", traceback.format_exc(),
                                           device=self.worker.device_name)
                    with lock:
                        on_result(result)

        def stop(reason: str) -> None:
            self.stopping = True
            self.worker.request_stop(reason)

        with stop_on_signals(stop):
            threads = [threading.Thread(target=serve, daemon=True) for _ in range(min(self.worker.concurrent, len(requests)))]
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.2)


def _local_worker(index: int, device: str, settings: WorkerSettings, tasks, results) -> None:
    """A worker process: ``concurrent`` threads take requests from the shared queue until a
    None; the first SIGINT/SIGTERM stops the running runs at their next step."""
    from normlab import tracking
    from normlab.interrupts import stop_on_signals
    from normlab.worker import Worker

    os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    tracking.use_bounded_http_retries()
    worker = Worker(device, settings.data_dir, settings.experiment, settings.checkpoint_dir,
                    name=f"worker {index + 1}" if device == "cpu" else None)

    def serve() -> None:
        with worker.stream():
            while (request := tasks.get()) is not None:
                key = request.config.config_hash()
                results.put(("started", index, key, None))
                result = worker.train(request, on_run=lambda run_id: results.put(("run", index, key, run_id)))
                results.put(("done", index, key, result))

    with stop_on_signals(worker.request_stop):
        threads = [threading.Thread(target=serve, daemon=True) for _ in range(worker.concurrent)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)


class LocalExecutor:
    """One worker process per device of this machine, fed from one queue (so a worker that
    finishes early takes the next run), with no service to start."""

    def __init__(self, devices: list[tuple[str, dict[str, str]]], settings: WorkerSettings,
                 echo: Callable[[str], None]):
        self.devices = devices
        self.workers = len(devices)
        self.settings = settings
        self.echo = echo
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.tasks = self.context.Queue()
        self.results = self.context.Queue()
        self.processes: dict[int, multiprocessing.Process] = {}
        self.stopping = False

    @property
    def concurrent(self) -> int:
        return CONCURRENT_ON_GPU if self.devices[0][0].startswith("cuda") else 1

    def describe(self) -> str:
        where = ", ".join(self._where(i) for i in range(len(self.devices)))
        return f"{len(self.devices)} local worker process(es) ({where}), {self.concurrent} run(s) at once each"

    def _start(self, index: int) -> None:
        device, env = self.devices[index]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned process starts with the environment of this moment
        try:
            process = self.context.Process(target=_local_worker, name=f"normlab-worker-{index}", daemon=True,
                                           args=(index, device, self.settings, self.tasks, self.results))
            process.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        self.processes[index] = process

    def _where(self, index: int) -> str:
        device, env = self.devices[index]
        return f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else f"{device} worker {index + 1}"

    def run(self, requests: list[RunRequest], on_result: OnResult) -> None:
        """Train every request; returns when each has a result (or the sweep is stopped)."""
        if not requests:
            return
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        by_key = {r.config.config_hash(): r for r in requests}
        held: dict[int, dict[str, str | None]] = {}  # worker -> config hash -> run id
        attempts: dict[str, int] = {}
        outstanding = len(requests)
        try:
            for index in range(len(self.devices)):
                self._start(index)
            for request in requests:
                self.tasks.put(request)
            while outstanding:
                try:
                    kind, index, key, value = self.results.get(timeout=0.5)
                except queue.Empty:
                    outstanding -= self._reap_dead(held, by_key, attempts, on_result)
                    continue
                if kind == "started":
                    held.setdefault(index, {})[key] = None
                    self.echo(f"[{by_key[key].config.run_name}] started on {self._where(index)} "
                              f"(pid {self.processes[index].pid})")
                elif kind == "run":
                    held.setdefault(index, {})[key] = value
                else:
                    held.get(index, {}).pop(key, None)
                    on_result(value)
                    outstanding -= 1
        finally:
            for _ in range(sum(self.concurrent for p in self.processes.values() if p.is_alive())):
                self.tasks.put(None)
            for process in self.processes.values():
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _reap_dead(self, held, by_key, attempts, on_result) -> int:
        """Fail (and retry) the runs of workers that died; returns how many runs ended."""
        ended = 0
        for index, process in list(self.processes.items()):
            if process.is_alive():
                continue
            why = f"its worker process ({self._where(index)}, pid {process.pid}) died with exit code {process.exitcode}"
            for key, run_id in held.pop(index, {}).items():
                result = _worker_died(by_key[key], run_id, why, self._where(index))
                retry = None if self.stopping else _retry(by_key[key], result, attempts,
                                                          self.settings.checkpoint_dir)
                if retry is not None:
                    self.echo(f"[{retry.config.run_name}] {why}; trying it again ({'resuming' if retry.resume else 'anew'})")
                    by_key[key] = retry
                    self.tasks.put(retry)
                else:
                    on_result(result)
                    ended += 1
            if self.stopping:
                del self.processes[index]
            else:
                self._start(index)
        return ended

    def _stop(self, signum, frame) -> None:
        """Ctrl-C reaches the workers too (one process group); SIGTERM to this process alone
        is passed on. Each stops its runs, which record themselves KILLED."""
        if self.stopping:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.stopping = True
        self.echo(f"{signal.Signals(signum).name} received: stopping the running children after their "
                  f"current step (Ctrl-C again to abort now)")
        for process in self.processes.values():
            if process.is_alive() and signum != signal.SIGINT:
                os.kill(process.pid, signal.SIGTERM)


# -- on a Ray cluster -------------------------------------------------------------------

class RayExecutor:
    """One Ray actor per GPU of the cluster (per CPU on a cluster without GPUs), each a
    Worker; Ray places them, and reports an actor whose process or node died."""

    def __init__(self, address: str, settings: WorkerSettings, echo: Callable[[str], None]):
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError('--address needs Ray: pip install "normlab[ray]"') from exc
        self.ray = ray
        self.settings = settings
        self.echo = echo
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": settings.tracking_uri}})
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        check_store_for_cluster(settings.tracking_uri, len(nodes))
        gpus = int(resources.get("GPU", 0))
        if gpus:
            self.concurrent, options = CONCURRENT_ON_GPU, {"num_gpus": 1}
            count = gpus
        else:
            self.concurrent, options = 1, {"num_cpus": 1}
            count = int(resources.get("CPU", 1))
        actor_class = ray.remote(RayWorker).options(max_concurrency=self.concurrent, **options)
        self.actors = [actor_class.remote(settings) for _ in range(count)]
        self.workers = count
        self.nodes = len(nodes)

    def describe(self) -> str:
        return (f"Ray: {len(self.actors)} worker actor(s) on {self.nodes} node(s), "
                f"{self.concurrent} run(s) at once each")

    def run(self, requests: list[RunRequest], on_result: OnResult) -> None:
        ray = self.ray
        waiting = list(requests)
        attempts: dict[str, int] = {}
        in_flight: dict = {}  # ObjectRef -> (actor, request)
        load = {actor: 0 for actor in self.actors}
        try:
            while waiting or in_flight:
                for actor in list(load):
                    while waiting and load[actor] < self.concurrent:
                        request = waiting.pop(0)
                        in_flight[actor.train.remote(request)] = (actor, request)
                        load[actor] += 1
                if not load:
                    raise RuntimeError("every Ray worker actor died; the sweep cannot go on (run it again "
                                       "to resume once the cluster has resources)")
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    actor, request = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                        load[actor] -= 1
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError) as exc:
                        load.pop(actor, None)  # dead for good: its other runs fail the same way
                        run_id = _run_of(request)
                        result = _worker_died(request, run_id, f"its Ray worker died ({type(exc).__name__}: "
                                                               f"{str(exc).splitlines()[0]})", "ray")
                        retry = _retry(request, result, attempts)
                        if retry is not None:
                            self.echo(f"[{request.config.run_name}] {result.reason}; trying it again")
                            waiting.append(retry)
                            continue
                    on_result(result)
        except KeyboardInterrupt:
            for actor in load:
                actor.request_stop.remote("the sweep was interrupted")
            for ref, (_, request) in in_flight.items():
                try:
                    on_result(ray.get(ref, timeout=60))
                except Exception as exc:
                    on_result(RunResult(request.config, _run_of(request), "KILLED", f"interrupted ({exc})"))
            raise


def _run_of(request: RunRequest) -> str | None:
    """The run a request trains, when it was made beforehand or found in MLflow by its tags."""
    if request.run_id:
        return request.run_id
    from normlab.sweep_tracking import newest_child

    return newest_child(request.experiment_id, request.tags)


class RayWorker:
    """A Worker as a Ray actor (threaded: ``max_concurrency`` runs at once)."""

    def __init__(self, settings: WorkerSettings):
        from normlab import tracking
        from normlab.worker import Worker

        os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
        tracking.use_bounded_http_retries()
        self.worker = Worker("auto", settings.data_dir, settings.experiment, settings.checkpoint_dir)

    def train(self, request: RunRequest) -> RunResult:
        with self.worker.stream():
            return self.worker.train(request)

    def request_stop(self, reason: str) -> None:
        self.worker.request_stop(reason)


def check_store_for_cluster(tracking_uri: str, nodes: int) -> None:
    """A cluster of several nodes needs a tracking server: sqlite and file stores live on
    one machine's disk, which the other nodes' workers cannot reach."""
    from normlab.models import ConfigError

    local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    if nodes > 1 and local:
        raise ConfigError(f"the Ray cluster has {nodes} nodes, but MLFLOW_TRACKING_URI is a local store "
                          f"({tracking_uri.split('://')[0]}), which workers on the other nodes cannot reach; "
                          f"start a tracking server (mlflow server --host 0.0.0.0 ...) and set "
                          f"MLFLOW_TRACKING_URI=http://HOST:PORT on the driver")
