"""Where a sweep's runs train: warm worker processes on this machine, or Ray actors on a cluster.

Both start one normlab.sweep.worker.Worker per device (per GPU; one on a machine without one),
hand it RunRequests and report each RunResult as it comes back. Neither decides what to
train: the sweep does, from MLflow. A worker that dies (a crash, a lost node) fails the
runs it held with the reason, and they are tried again, resumed from their last
checkpoint, up to MAX_ATTEMPTS times.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable

from normlab.engine.fast.trainer_pool import runs_per_gpu
from normlab.engine.interrupts import release_interrupted
from normlab.sweep.worker import RunRequest, RunResult, retry_request
from normlab.tracking import connection

OnResult = Callable[[RunResult], None]


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker of a sweep is started with."""

    data_dir: str
    experiment: str
    checkpoint_dir: str
    tracking_uri: str
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # environment a Ray actor sets


def local_devices(device: str, cpu_workers: int = 1) -> list[tuple[str, dict[str, str]]]:
    """(device, environment) of each local worker: one per visible GPU, pinned to it with
    CUDA_VISIBLE_DEVICES, for auto/cuda when there is a GPU; else ``cpu_workers`` on the
    CPU, sharing its cores (OMP_NUM_THREADS), or the one device asked for."""
    import torch

    from normlab.engine.train import resolve_device

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


def local_executor(device: str, cpu_workers: int, settings: WorkerSettings, echo: Callable[[str], None],
                   engine=None):
    """Worker processes, one per device; the sweep's own process when there is one device,
    training in ``engine`` (an engine_process.EngineProcess) when the command started one."""
    if engine is not None:
        return InProcessExecutor(device, settings, echo, engine)
    devices = local_devices(device, cpu_workers)
    if len(devices) == 1:
        return InProcessExecutor(devices[0][0], settings, echo)
    return LocalExecutor(devices, settings, echo)


def _first_stop(executor, signum: int) -> bool:
    """Whether this is the first stop signal, which the caller passes on to its workers; a
    second Ctrl-C aborts at once (KeyboardInterrupt)."""
    if executor.stopping:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return False
    executor.stopping = True
    executor.echo(f"{signal.Signals(signum).name} received: stopping the running children after their "
                  f"current step (Ctrl-C again to abort now)")
    return True


def _worker_died(request: RunRequest, run_id: str | None, why: str, device: str) -> RunResult:
    """Its run FAILED with the reason and its lease broken, so a retry may resume it at once."""
    from normlab.tracking.lease import break_lease
    from normlab.tracking.run_ending import fail_run_if_open

    if run_id:
        break_lease(run_id)
        fail_run_if_open(run_id, why)
    return RunResult(request.config, run_id, "FAILED", why, device=device)


def _serve_in_threads(serve: Callable[[], None], threads: int) -> None:
    """Run ``serve`` in that many threads until each returns; the main thread waits in short
    joins, so the signal handlers (which run only there) are heard meanwhile."""
    started = [threading.Thread(target=serve, daemon=True) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        while thread.is_alive():
            thread.join(timeout=0.2)


# -- on this machine --------------------------------------------------------------------

class InProcessExecutor:
    """The worker in the sweep's own process, for a machine with one device: the command has
    imported torch and MLflow and read the data already, so no second process pays that again.
    With ``engine`` (one GPU) the runs train in that engine process, tracked here."""

    def __init__(self, device: str, settings: WorkerSettings, echo: Callable[[str], None], engine=None):
        from normlab.sweep.worker import Worker

        self.worker = Worker(device, settings.data_dir, settings.experiment, settings.checkpoint_dir, engine=engine)
        self.echo = echo
        self.stopping = False
        self.workers = 1

    def describe(self) -> str:
        where = ("in an engine process, tracked in this one" if self.worker.threads > self.worker.concurrent
                 else f"in this process ({self.worker.device_name})")
        return f"1 worker {where}, {self.worker.concurrent} run(s) at once"

    def run(self, requests: list[RunRequest], on_result: OnResult) -> None:
        from normlab.engine.interrupts import stop_on_signals

        turns = _TakenInOrder(requests)
        lock = threading.Lock()

        def serve() -> None:
            with self.worker.stream():
                while (turn := turns.next()) is not None:
                    request, handed_over = turn
                    try:
                        result = self.worker.train(request, handed_over=handed_over)
                    except Exception:  # a bug outside the run: fail this run, not the ones after it
                        result = RunResult(request.config, request.run_id, "FAILED", traceback.format_exc(),
                                           device=self.worker.device_name)
                    finally:
                        handed_over()
                    with lock:
                        on_result(result)

        def stop(reason: str) -> None:
            self.stopping = True
            self.worker.request_stop(reason)

        with stop_on_signals(stop):
            _serve_in_threads(serve, min(self.worker.threads, len(requests)))


class _TakenInOrder:
    """The requests, handed to the worker in the order they are taken. With an engine process
    twice as many threads as it has places hand runs over; without a turn each, a thread
    could hand over a later run before an earlier one (still looking for its checkpoint)
    and take its place: then runs train out of the sweep's order, and the first ones miss
    the steps the engine prepared ahead for them."""

    def __init__(self, requests: list[RunRequest]):
        self._requests = collections.deque(requests)
        self._turn = threading.Lock()

    def next(self) -> tuple[RunRequest, Callable[[], None]] | None:
        """The next request and the call that ends its turn (once the worker has its run;
        later calls do nothing); None when none is left. Waits while another thread's turn lasts."""
        self._turn.acquire()
        if not self._requests:
            self._turn.release()
            return None
        ended = False

        def handed_over() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._turn.release()

        return self._requests.popleft(), handed_over


def _local_worker(index: int, device: str, settings: WorkerSettings, tasks, results) -> None:
    """A worker process: ``concurrent`` threads take requests from this worker's own queue
    until a None and report on its own pipe; the first SIGINT/SIGTERM stops the running runs
    at their next step."""

    from normlab.engine.interrupts import stop_on_signals
    from normlab.sweep.worker import Worker

    os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    connection.use_command_defaults()
    worker = Worker(device, settings.data_dir, settings.experiment, settings.checkpoint_dir,
                    name=f"worker {index + 1}" if device == "cpu" else None)
    sending = threading.Lock()

    def report(kind: str, key: str, value) -> None:
        with sending:
            results.send((kind, key, value))

    def serve() -> None:
        with worker.stream():
            while (request := tasks.get()) is not None:
                key = request.config.config_hash()
                report("started", key, None)
                result = worker.train(request, on_run=lambda run_id: report("run", key, run_id))
                report("done", key, result)

    with stop_on_signals(worker.request_stop):
        _serve_in_threads(serve, worker.concurrent)


@dataclass
class _LocalWorker:
    """The driver's side of one worker process: its own task queue and result pipe, and what
    it was given. Nothing is shared between workers: a worker killed while it waits for a task
    holds its queue's lock, and a queue shared by all would then feed none of them."""

    process: multiprocessing.Process
    tasks: multiprocessing.Queue
    results: "multiprocessing.connection.Connection"
    given: dict[str, RunRequest] = field(default_factory=dict)  # config hash -> request not yet done
    started: dict[str, str | None] = field(default_factory=dict)  # config hash -> its run id, once known


class LocalExecutor:
    """One worker process per device of this machine, with no service to start. The next run
    goes to the worker with the fewest runs, while one has a free place: a sweep with fewer
    runs than places spreads over the GPUs (9 runs on two GPUs train 5 and 4 at once, not 6
    and 3; on four, 3, 2, 2 and 2), and a worker that finishes early takes the next run."""

    def __init__(self, devices: list[tuple[str, dict[str, str]]], settings: WorkerSettings,
                 echo: Callable[[str], None]):
        self.devices = devices
        self.workers = len(devices)
        self.settings = settings
        self.echo = echo
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.processes: dict[int, _LocalWorker] = {}
        self.stopping = False

    @property
    def concurrent(self) -> int:
        return runs_per_gpu() if self.devices[0][0].startswith("cuda") else 1

    def describe(self) -> str:
        where = ", ".join(self._where(i) for i in range(len(self.devices)))
        return f"{len(self.devices)} local worker process(es) ({where}), {self.concurrent} run(s) at once each"

    def _start(self, index: int) -> None:
        device, env = self.devices[index]
        tasks = self.context.Queue()
        results, sender = self.context.Pipe(duplex=False)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned process starts with the environment of this moment
        try:
            process = self.context.Process(target=_local_worker, name=f"normlab-worker-{index}", daemon=True,
                                           args=(index, device, self.settings, tasks, sender))
            process.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        sender.close()  # the worker holds the sending end: when it dies, the pipe reads EOF
        self.processes[index] = _LocalWorker(process, tasks, results)

    def _where(self, index: int) -> str:
        device, env = self.devices[index]
        return f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else f"{device} worker {index + 1}"

    def run(self, requests: list[RunRequest], on_result: OnResult) -> None:
        """Train every request; returns when each has a result (or the sweep is stopped)."""
        if not requests:
            return
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        waiting = collections.deque(requests)  # not yet given to a worker
        attempts: dict[str, int] = {}
        outstanding = len(requests)
        try:
            for index in range(len(self.devices)):
                self._start(index)
            while outstanding:
                if self.stopping:
                    while waiting:
                        request = waiting.popleft()
                        on_result(RunResult(request.config, request.run_id, "KILLED",
                                            "not started: the sweep was stopped"))
                        outstanding -= 1
                while waiting:  # to the living worker with the fewest runs, as RayExecutor does
                    free = [w for w in self.processes.values()
                            if len(w.given) < self.concurrent and w.process.is_alive()]
                    if not free:
                        break
                    worker = min(free, key=lambda w: len(w.given))
                    request = waiting.popleft()
                    worker.given[request.config.config_hash()] = request
                    worker.tasks.put(request)
                pipes = {w.results: index for index, w in self.processes.items()}
                for pipe in multiprocessing.connection.wait(list(pipes), timeout=0.5):
                    try:
                        message = pipe.recv()
                    except EOFError:  # its worker is gone: _reap_dead sees to its runs
                        self.processes[pipes[pipe]].process.join(timeout=5)
                        continue
                    outstanding -= self._handle(pipes[pipe], message, on_result)
                outstanding -= self._reap_dead(waiting, attempts, on_result)
        finally:
            for worker in self.processes.values():
                for _ in range(self.concurrent if worker.process.is_alive() else 0):
                    worker.tasks.put(None)
            for worker in self.processes.values():
                worker.process.join(timeout=30)
                if worker.process.is_alive():
                    worker.process.kill()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, index: int, message: tuple, on_result: OnResult) -> int:
        """Act on one message of a worker; returns 1 when a run ended."""
        worker = self.processes[index]
        kind, key, value = message
        if kind == "started":
            worker.started[key] = None
            self.echo(f"[{worker.given[key].config.run_name}] started on {self._where(index)} "
                      f"(pid {worker.process.pid})")
        elif kind == "run":
            worker.started[key] = value
        else:
            worker.given.pop(key)
            worker.started.pop(key, None)
            on_result(value)
            return 1
        return 0

    def _reap_dead(self, waiting: collections.deque, attempts: dict[str, int], on_result: OnResult) -> int:
        """Fail (and retry) the runs of workers that died, give back what they had not started,
        and start a new worker in each one's place; returns how many runs ended."""
        ended = 0
        for index, worker in list(self.processes.items()):
            if worker.process.is_alive():
                continue
            while True:  # what it reported before it died
                try:
                    message = worker.results.recv() if worker.results.poll() else None
                except EOFError:
                    message = None
                if message is None:
                    break
                ended += self._handle(index, message, on_result)
            why = (f"its worker process ({self._where(index)}, pid {worker.process.pid}) died with exit code "
                   f"{worker.process.exitcode}")
            for key, request in worker.given.items():
                if key not in worker.started:
                    waiting.appendleft(request)  # never began: not an attempt
                    continue
                result = _worker_died(request, worker.started[key], why, self._where(index))
                retry = None if self.stopping else retry_request(request, result, attempts,
                                                                 self.settings.checkpoint_dir)
                if retry is not None:
                    self.echo(f"[{retry.config.run_name}] {why}; trying it again "
                              f"({'resuming' if retry.resume else 'anew'})")
                    waiting.appendleft(retry)
                else:
                    on_result(result)
                    ended += 1
            worker.tasks.cancel_join_thread()  # nobody reads it any more: exit without flushing it
            worker.tasks.close()
            worker.results.close()
            if self.stopping:
                del self.processes[index]
            else:
                self._start(index)
        return ended

    def _stop(self, signum, frame) -> None:
        """Ctrl-C reaches the workers too (one process group); SIGTERM to this process alone
        is passed on. Each stops its runs, which record themselves KILLED."""
        if not _first_stop(self, signum):
            return
        for worker in self.processes.values():
            if worker.process.is_alive() and signum != signal.SIGINT:
                os.kill(worker.process.pid, signal.SIGTERM)


# -- on a Ray cluster -------------------------------------------------------------------

RAY_WORKER_TAG = "normlab.ray_worker"  # the Ray actor that created a child: found again if it dies
PLACEMENT_NOTE_S = 30.0  # say why nothing happens when Ray has placed no worker for this long


def _forwarded_environment() -> tuple[dict[str, str], dict[str, str]]:
    """What the actors need from the driver's environment, as (plain, secret): MLflow's and
    normlab's settings, credentials included (MLFLOW_TRACKING_PASSWORD or TOKEN: a worker
    without them gets HTTP 401). Ray starts actors in its nodes' environment, not the driver's.

    Only the plain part goes into the job's runtime environment: Ray writes that into its
    session logs (runtime_env_agent.log: "Creating runtime env: {env_vars: ...}") and shows it
    on its dashboard. The secrets travel as an argument of each actor's constructor, which
    sets them (WorkerSettings.secrets). The tracking URI, which may carry a password, is
    set by the actor from its settings too."""
    from normlab.tracking.redaction import is_secret_name

    env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "NORMLAB_"))}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):  # `mlflow run`'s run is the driver's
        env.pop(name, None)
    secrets = {k: env.pop(k) for k in list(env) if is_secret_name(k)}
    return env, secrets


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """ray.init waits without end for a HOST:PORT nobody answers at: fail at once instead."""
    import socket

    from normlab.errors import ConfigError

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # auto, or a ray:// client address: Ray reports those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at --address {address} ({exc.strerror or exc}); start one with "
                          f"`ray start --head --port {port}` or give the head node's HOST:PORT (or auto, "
                          f"on a node of the cluster)") from None


class RayExecutor:
    """One Ray actor per GPU of the cluster (per CPU on a cluster without GPUs), each a
    Worker; Ray places them, and reports an actor whose process or node died.

    Runs go to actors that Ray has placed and that have a free slot, so a run never waits
    behind an actor that cannot start (another job holds the cluster's resources). An actor
    that dies fails its run with the reason, which is then resumed from its checkpoint
    artifact (or started again when it has none) on another actor. The actors are ended
    as soon as the runs are, freeing the cluster for other jobs before the comparison."""

    def __init__(self, address: str, settings: WorkerSettings, echo: Callable[[str], None]):
        from normlab.errors import ConfigError

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every line names its run: keep them all
        try:
            import ray
        except ImportError:
            raise ConfigError(f'--address {address} runs the sweep on Ray, which is not installed: '
                              f'pip install -e ".[ray]" (or leave --address and RAY_ADDRESS out to train '
                              f'on this machine)') from None
        _check_reachable(address)
        self.ray = ray
        # the actors' working folder is their node's, not the driver's
        plain, secrets = _forwarded_environment()
        self.settings = replace(settings, data_dir=os.path.abspath(settings.data_dir),
                                checkpoint_dir=os.path.abspath(os.path.expanduser(settings.checkpoint_dir)),
                                secrets=secrets)
        self.echo = echo
        try:
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": plain})
        except ConnectionError as exc:  # auto with no cluster on this machine, a ray:// nobody serves
            raise ConfigError(f"no Ray cluster answers at --address {address} ({str(exc).splitlines()[0]}); start "
                              f"one with `ray start --head` (then --address auto, on a node of it) or give the "
                              f"head node's HOST:PORT") from None
        nodes = [n for n in ray.nodes() if n["Alive"]]
        check_store_for_cluster(settings.tracking_uri, len(nodes))
        # whole devices per node: 1.5 CPUs on each of two nodes is two workers, not three
        gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
        cpus = sum(int(n["Resources"].get("CPU", 0)) for n in nodes)
        if gpus:
            self.concurrent, self.options, self.workers, self.unit = runs_per_gpu(), {"num_gpus": 1}, gpus, "GPU"
        elif cpus:
            self.concurrent, self.options, self.workers, self.unit = 1, {"num_cpus": 1}, cpus, "CPU"
        else:
            raise ConfigError(f"the Ray cluster at {address} has no GPU and no whole CPU to place a worker on; "
                              f"start its nodes with --num-cpus or --num-gpus")
        self.nodes = len(nodes)
        self.stopping = False

    def describe(self) -> str:
        return (f"Ray: up to {self.workers} worker actor(s), one per {self.unit} of {self.nodes} node(s), "
                f"{self.concurrent} run(s) at once each")

    def run(self, requests: list[RunRequest], on_result: OnResult) -> None:
        """Train every request on the actors; returns when each has a result (or the sweep
        is stopped). The first Ctrl-C (or SIGTERM) asks the actors to stop their runs after
        the current step (they record themselves KILLED); a second Ctrl-C aborts at once."""
        ray = self.ray
        if not requests:
            ray.shutdown()
            return
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
        # max_concurrency one above the runs, so that request_stop is heard while they train
        actor_class = ray.remote(RayWorker).options(max_concurrency=self.concurrent + 1, **self.options)
        actors = [actor_class.remote(self.settings) for _ in range(min(self.workers, len(requests)))]
        starting = {actor.where.remote(): (index, actor) for index, actor in enumerate(actors, 1)}
        names: dict = {}  # placed actor -> its device and node
        load: dict = {}  # placed, living actor -> runs it trains now
        in_flight: dict = {}  # ObjectRef -> (actor, request)
        waiting = collections.deque(requests)
        attempts: dict[str, int] = {}
        idle_since = time.monotonic()
        previous = {s: signal.signal(s, self._stop_handler(load)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while in_flight or (waiting and not self.stopping):  # an actor never placed holds nothing up
                while waiting and not self.stopping:  # to the placed actor with the fewest runs
                    free = [actor for actor in load if load[actor] < self.concurrent]
                    if not free:
                        break
                    actor = min(free, key=load.get)
                    request = waiting.popleft()
                    in_flight[actor.train.remote(request)] = (actor, request)
                    load[actor] += 1
                if self.stopping:
                    for ref in list(starting):  # not placed yet: nothing of theirs to stop
                        ray.kill(starting.pop(ref)[1])
                if not starting and not load:  # every actor died: nobody is left to train these
                    while waiting:
                        request = waiting.popleft()
                        on_result(RunResult(request.config, request.run_id, "FAILED",
                                            "every Ray worker of the sweep died; run the same command again "
                                            "once the cluster has resources"))
                if not in_flight and not starting:
                    continue
                if not load and time.monotonic() - idle_since > PLACEMENT_NOTE_S:
                    self.echo(f"waiting for Ray to place the workers: each needs a free {self.unit} "
                              f"(other jobs may hold them; `ray status` shows the cluster)")
                    idle_since = float("inf")
                ready, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in starting:
                        index, actor = starting.pop(ref)
                        try:
                            names[actor] = ray.get(ref)
                            load[actor] = 0
                            self.echo(f"Ray worker {index} ready: {names[actor]}")
                        except ray.exceptions.RayError as exc:
                            self.echo(f"Ray worker {index} could not start: {_first_line(exc)}")
                        continue
                    actor, request = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                        load[actor] -= 1
                    except lost as exc:
                        if actor in load:  # dead for good: its other runs fail the same way
                            del load[actor]
                            ray.kill(actor)  # "unavailable" may be an actor cut off but running: end it
                        where = names.get(actor, "ray")
                        why = f"its Ray worker ({where}) died: {_first_line(exc)}"
                        result = _worker_died(request, _ray_run_of(actor, request), why, where)
                        retry = None if self.stopping else retry_request(request, result, attempts)
                        if retry is not None:
                            self.echo(f"[{request.config.run_name}] {why}; trying it again "
                                      f"({'resuming run ' + retry.run_id if retry.resume else 'as a new run'})")
                            waiting.appendleft(retry)  # ahead of the runs not started yet
                            continue
                    except ray.exceptions.RayTaskError as exc:  # a bug outside the run: this run fails
                        from normlab.tracking.redaction import redact

                        load[actor] = load.get(actor, 1) - 1
                        result = RunResult(request.config, _ray_run_of(actor, request), "FAILED", redact(str(exc)),
                                           device=names.get(actor, "ray"))
                    on_result(result)
        except KeyboardInterrupt as abort:  # a second Ctrl-C: the runs still training end KILLED here
            release_interrupted(abort)
            for actor, request in in_flight.values():
                _abandon(_ray_run_of(actor, request), "the sweep was aborted by a second Ctrl-C; run it again "
                                                      "to resume")
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for actor in actors:  # free the cluster now (before the comparison), not at exit
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
            ray.shutdown()

    def _stop_handler(self, load: dict):
        """SIGINT/SIGTERM: the first asks every placed actor to stop its runs; a second
        SIGINT raises KeyboardInterrupt (the actors' processes get no signal from a terminal)."""
        def stop(signum, frame) -> None:
            if not _first_stop(self, signum):
                return
            for actor in load:
                actor.request_stop.remote(f"{signal.Signals(signum).name} received")
        return stop


def _abandon(run_id: str | None, reason: str) -> None:
    """A run left behind by an aborted sweep: KILLED with the reason, its lease ended."""
    if not run_id:
        return
    from normlab.tracking.lease import break_lease
    from normlab.tracking.run_ending import record_ending
    from normlab.tracking.run_log import run_outcome

    try:
        if run_outcome(run_id) == "running":
            record_ending(run_id, "interrupted", reason)
        break_lease(run_id)
    except Exception:  # the store is down: the lease runs out by itself
        pass


def _first_line(exc: BaseException) -> str:
    from normlab.tracking.redaction import redact

    lines = [line for line in str(exc).splitlines() if line.strip()]
    return redact(f"{type(exc).__name__}: {lines[0] if lines else ''}")


def _ray_run_of(actor, request: RunRequest) -> str | None:
    """The run an actor trained for a request: the one it resumed, else the child it created
    (tagged with its actor id; never another driver's run of the same config)."""
    if request.run_id:
        return request.run_id
    if not request.tags:
        return None
    from normlab.tracking.sweep_records import child_made_by

    return child_made_by(request.experiment_id, request.tags, RAY_WORKER_TAG, actor._actor_id.hex())


class RayWorker:
    """A Worker as a Ray actor (threaded: up to ``concurrent`` runs at once, and a stop request)."""

    def __init__(self, settings: WorkerSettings):
        import ray

        from normlab.sweep.worker import Worker

        os.environ.update(settings.secrets)
        os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
        connection.use_command_defaults()
        context = ray.get_runtime_context()
        self.actor_id = context.get_actor_id()
        self.node = f"on Ray node {context.get_node_id()[:8]} ({ray.util.get_node_ip_address()})"
        self.worker = Worker("auto", settings.data_dir, settings.experiment, settings.checkpoint_dir,
                             name=self.node)

    def where(self) -> str:
        """The device and node this worker trains on (answers once the actor is up)."""
        return self.worker.device_name

    def train(self, request: RunRequest) -> RunResult:
        if request.tags:  # the child it creates says which actor: the driver finds it if this one dies
            request = replace(request, tags={**request.tags, RAY_WORKER_TAG: self.actor_id})
        with self.worker.stream():
            return self.worker.train(request)

    def request_stop(self, reason: str) -> None:
        self.worker.request_stop(reason)


def check_store_for_cluster(tracking_uri: str, nodes: int) -> None:
    """A cluster of several nodes needs a tracking server: sqlite and file stores live on
    one machine's disk, which the other nodes' workers cannot reach."""
    from normlab.errors import ConfigError

    scheme = tracking_uri.split("://", 1)[0] if "://" in tracking_uri else ""
    local = scheme in ("sqlite", "file") or (not scheme and tracking_uri not in ("databricks", "databricks-uc"))
    if nodes > 1 and local:
        raise ConfigError(f"the Ray cluster has {nodes} nodes, but MLFLOW_TRACKING_URI is a local store "
                          f"({tracking_uri}), which workers on the other nodes cannot reach; start a tracking "
                          f"server (mlflow server --host 0.0.0.0 ...) and set MLFLOW_TRACKING_URI=http://HOST:PORT "
                          f"on the driver (docs/sweeps.md)")
