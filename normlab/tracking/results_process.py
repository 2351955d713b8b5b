"""Processes beside the command's that save each run's model and draw its misclassified
grid, so that the command's one interpreter is left to tracking.

Beside an engine process (a GPU run: engine/fast/engine_process.py) the command's process
trains nothing, yet it was what a short run waited for: the results' first-time costs
(torch.export's tracer, MLflow's scan of the installed packages, matplotlib: about 4.5 s on
an H200), paid on a thread while the run trained, took its interpreter from the epochs'
logging, and `normlab train` printed `done` 0.9-2.8 s after the GPU had trained
(docs/speed.md, twelfth session). This helper pays them in a process of its own from the
command's start, traces each run's architecture ahead, and at a run's end saves the model
where MLflow's ``Model.log`` asks its flavor to, and draws the grid, into the command's
temporary folders: the command logs them, and a run's model and artifacts are what they
are without it (results_log runs the same functions in the command's process then).

Used where the engine has a process of its own (``NORMLAB_RESULTS_PROCESS``: auto, always,
never); on a CPU the cores are the training's. A helper that dies leaves the rest of the
work to the command's process, which says so.

Measured end to end on an H200 against the code before it, alternately in one invocation
(benchmarks/results/h200-2026-12-01c-*): `normlab train` 1.09x (9.8 s against 10.7 s),
`mlflow run` 1.11x (13.5 s against 15.1 s), the classic sweep 1.14x (15.7 s against 17.9 s),
ten seeds 1.00x (their GPU is the bound). A short run's results are now logged 0.3-0.4 s
after its engine has trained it.

Two such processes, one per kind of work (ROLES), warm up side by side. With one, the models'
warm-up (torch, MLflow, torch.export's tracer, MLflow's package scan; 6.75 s on a slow H200
host) paid matplotlib's import and first figure after it, then the export ahead, and a short
run's engine, trained 7.3 s after the command's start there, waited for it: the results were
logged 1.26 s later. With two, on another H200, the figures' process was warm at 1.1 s, the
models' at 5.8 s, and the results were logged 0.26 s after the engine had trained; with the
command's faster exit, `normlab train` 1.35x and `mlflow run` 1.05x against the one process,
alternately (docs/speed.md, nineteenth session).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Iterator

from normlab.errors import ConfigError

CHOICES = ("auto", "always", "never")
# Each helper's role: the work it does, as its messages name it.
ROLES = {"models": "the models", "figures": "the misclassified grids"}
PROCESS_NAMES = {role: f"normlab-{role}" for role in ROLES}  # as ps and top show them


def wanted(engine_in_own_process: bool) -> bool:
    """Whether the command starts a results process: beside an engine process (auto), or as
    NORMLAB_RESULTS_PROCESS says."""
    choice = os.environ.get("NORMLAB_RESULTS_PROCESS", "auto")
    if choice not in CHOICES:
        raise ConfigError(f"NORMLAB_RESULTS_PROCESS={choice!r}; valid choices: {', '.join(CHOICES)}")
    return engine_in_own_process if choice == "auto" else choice == "always"


class ResultsProcessDied(RuntimeError):
    """The results process ended (killed, out of memory): its work is the command's now."""


class ResultsProcess:
    """The helper: ``run(function, *args)`` calls a module-level function there and returns
    its result (or raises its error), one call at a time."""

    def __init__(self, role: str):
        self.role = role
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs, role), name=PROCESS_NAMES[role], daemon=True)
        self._process.start()
        theirs.close()
        self._lock = threading.Lock()
        self.died: str | None = None
        self.closed = False
        self._death_told = False

    def run(self, function: Callable, *args):
        # plain pickle: tensors travel as bytes, not through multiprocessing's shared-memory handles
        with self._lock:
            if self.died is None:
                try:
                    self._conn.send_bytes(pickle.dumps((function, args)))
                    ok, value = pickle.loads(self._conn.recv_bytes())
                except (EOFError, OSError):
                    self._process.join(timeout=1)
                    self.died = f"exit code {self._process.exitcode}"
            if self.died is not None:
                raise ResultsProcessDied(f"the results process for {ROLES[self.role]} ended ({self.died})")
        if not ok:
            raise value
        return value

    def tell_death_once(self) -> bool:
        """True for the first caller only: one message, however many calls (a sweep's runs
        finishing together) met the death."""
        with self._lock:
            first, self._death_told = not self._death_told, True
        return first

    def close(self) -> None:
        """End it at once: nothing it holds outlives a call (each writes where its caller reads);
        a call still waiting (an export ahead) raises ResultsProcessDied, for nobody to take over."""
        self.closed = True
        self._process.kill()
        self._process.join()
        self._conn.close()


_current: dict[str, ResultsProcess] = {}  # role -> this command's helper


@contextlib.contextmanager
def started(wanted_here: bool) -> Iterator[None]:
    """The command's results processes, one per role, from now (their warm-ups under way) to
    the block's end, if ``wanted_here``."""
    if not wanted_here:
        yield
        return
    for role in ROLES:
        _current[role] = ResultsProcess(role)
    try:
        yield
    finally:
        while _current:
            _current.popitem()[1].close()


def current(role: str = "models") -> ResultsProcess | None:
    """This process's results process for ``role``, while there is one alive."""
    helper = _current.get(role)
    return helper if helper is not None and helper.died is None else None


def _serve(conn, role: str) -> None:
    """A results process: its role's warm-up, then each call in turn until the command has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the command's to handle
    with contextlib.suppress(OSError):  # its name in ps and top, on Linux
        Path("/proc/self/comm").write_text(PROCESS_NAMES[role])
    if role == "models":
        _warm_up_models()
    else:
        _warm_up_figures()
    while True:
        try:
            function, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)
        try:
            reply = pickle.dumps((True, function(*args)))
        except BaseException as exc:
            try:
                reply = pickle.dumps((False, exc))
            except Exception:  # an error that does not pickle: its traceback
                reply = pickle.dumps((False, RuntimeError(traceback.format_exc())))
        conn.send_bytes(reply)


def _warm_up_models() -> None:
    from normlab.tracking import results_log

    results_log.warm_up_model_saving()
    gc.freeze()  # torch's and MLflow's objects, left out of the collector's walks (as cli.entry does)


def _warm_up_figures() -> None:
    from normlab.analysis import plots

    plots.warm_up()
    gc.freeze()  # matplotlib's objects, likewise


def draw_misclassified(path: Path, *grid) -> None:
    """plots.save_misclassified_grid(path, *grid), for call(..., role="figures"): defined here
    so that naming it does not import matplotlib (0.6-0.8 s) into the command."""
    from normlab.analysis import plots

    plots.save_misclassified_grid(path, *grid)


def call(function: Callable, *args, role: str = "models"):
    """``function(*args)`` in the results process for ``role`` while there is one, otherwise
    (or once it has died, which is said) in this process."""
    helper = current(role)
    if helper is not None:
        try:
            return helper.run(function, *args)
        except ResultsProcessDied as exc:
            if helper.closed:
                raise
            if helper.tell_death_once():
                print(f"normlab: {exc}; this process does that work from now", file=sys.stderr, flush=True)
    return function(*args)
