"""Processes that draw a sweep's comparison figures side by side.

Drawing a figure is interpreter work, so one process draws one figure at a time: on the
2-core CPU, the seven figures of a 30-run comparison took 1.6-2.1 s of its 2.0-2.4 s (reading
the runs 0.3 s, logging the files 0.02 s). A sweep that trains on a GPU leaves the host's cores
idle, so it starts these processes while its runs train (spawned, their modules imported), and
its comparison hands each figure to one of them (compare.write_outputs). On an H200 the
classic sweep's comparison took 0.8-1.2 s instead of 2.3-2.6 s, the sweep 1.06x end to end
(docs/speed.md). A CPU sweep draws them itself: its cores train.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

PROCESSES = 8  # a figure each: the classic study's comparison draws 4 curve and summary figures and 3 galleries


@contextlib.contextmanager
def figure_renderers(processes: int = PROCESSES) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``processes`` for plots.save jobs, all started now, leaving two cores to the
    command and its engine; shut down on the way out, unfinished drawings cancelled."""
    count = max(1, min(processes, (os.cpu_count() or 1) - 2))
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"), initializer=_ready)
    try:
        for _ in range(count):  # the pool spawns a process for each job that finds none idle: all, now
            pool.submit(int)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ready() -> None:
    """A renderer's start: Ctrl-C is the command's to handle (a terminal sends it to the whole
    process group). The figures' modules, scipy's statistics among them, are imported and a
    first figure drawn (plots.warm_up) before the first job. Then they are left out of garbage
    collection, whose last walk over them took the pool's shutdown from 0.04 to 0.19 s on the
    2-core CPU (as cli.entry does for the command)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import pandas  # noqa: F401  (the jobs' frames)

    from normlab.analysis import plots, statistics  # noqa: F401  (statistics: scipy's, for the bands)

    plots.warm_up()
    gc.freeze()
