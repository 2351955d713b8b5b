"""Ctrl-C and SIGTERM as a request to stop after the current training step.

The first SIGINT or SIGTERM calls `request_stop`; training then ends its step and raises
TrainingStopped, so completed epochs, their metrics and the checkpoint stay intact. A
second Ctrl-C aborts at once (KeyboardInterrupt) for when stopping cleanly hangs; a
second SIGTERM (as `mlflow run` sends after passing on Ctrl-C) changes nothing. The
KeyboardInterrupt can be lost (raised inside a garbage-collector callback, Python prints
"Exception ignored" and goes on), so callers also count the SIGINTs received. Whoever catches
the abort lets go of what it interrupted (`release_interrupted`) before recording the ending.
"""

from __future__ import annotations

import gc
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[list[int]]:
    """Within: SIGINT/SIGTERM ask to stop; yields the list of signals received so far."""
    received: list[int] = []

    def handle(signum, frame) -> None:
        first = not received
        received.append(signum)
        name = signal.Signals(signum).name
        if first:
            print(f"\n{name} received: stopping after the current step (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)
            request_stop(f"{name} received")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + signum


def release_interrupted(abort: BaseException) -> None:
    """Free what the code an abort interrupted still holds through the abort's traceback.

    A second Ctrl-C can land inside an MLflow store call, between a query and the reading of
    its rows. The traceback's frames then keep that query's cursor open (in their variables,
    and in the closures of the functions they run), and on sqlite an open read is a lock:
    recording the run's ending waited 20 s for it, failed with "database is locked" and left
    the run RUNNING (one abort in about 20 during model logging). Dropping the tracebacks, of
    the abort and of what it interrupted, closes the cursor.
    """
    while abort is not None:
        traceback.clear_frames(abort.__traceback__)
        abort.__traceback__ = None
        abort = abort.__context__
    gc.collect()  # what the frames held in reference cycles
