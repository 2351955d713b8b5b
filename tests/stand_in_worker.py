"""A stand-in for the local executor's worker process (executors._local_worker) that trains
nothing and imports nothing heavy, so that a test can start, kill and restart worker
processes in seconds. It speaks the worker's protocol: requests from its own task queue
until a None, and ("started" | "done", config hash, value) messages on its pipe; each
request "trains" by sleeping for its config's seconds, on a thread of its own. The real
worker under the same executor is tested with real runs in tests/test_sweep.py."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    run_name: str
    seconds: float

    def config_hash(self) -> str:
        return self.run_name


@dataclass(frozen=True)
class Request:
    config: Config
    run_id: str | None = None
    resume: bool = False


@dataclass(frozen=True)
class Settings:
    checkpoint_dir: str | None = None


@dataclass(frozen=True)
class Result:
    config: Config
    status: str
    pid: int


def serve(index: int, device: str, settings: Settings, tasks, results) -> None:
    """Each request on a thread of its own, as a GPU worker trains several runs at once (the
    executor gives a CPU worker one at a time)."""
    sending = threading.Lock()

    def send(message: tuple) -> None:
        with sending:
            results.send(message)

    def run(request: Request) -> None:
        key = request.config.config_hash()
        send(("started", key, None))
        time.sleep(request.config.seconds)
        send(("done", key, Result(request.config, "FINISHED", os.getpid())))

    threads = []
    while (request := tasks.get()) is not None:
        threads.append(threading.Thread(target=run, args=(request,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
