"""How much of a run's start two processes could overlap: its engine side (torch, CUDA, the
data on the device, the Trainer built and prepared) and its tracking side (MLflow, its store,
a run with params) one after the other in one process, as `normlab train` does them on a
CPU, against each alone and against both as two processes at once. Every way is a fresh
process (or two), alternately, after one that creates the store.

    python benchmarks/process_split.py --data-dir DATA --repeats 4

Prints each way's wall time and its median: the most a split can gain. `normlab train` on a
GPU splits its run this way (normlab/engine/fast/engine_process.py); its end-to-end gain is
`benchmarks/e2e.py --rows train --baseline REV` against a commit before it (docs/speed.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from processes import isolated_store

ENGINE = """
import sys
from normlab.engine.config import TrainConfig
from normlab.engine.data import DeviceData, load_raw
from normlab.engine.train import Trainer, resolve_device
import torch
device = resolve_device("auto")
trainer = Trainer(TrainConfig(norm="ln"), DeviceData(load_raw("mnist", sys.argv[1]), device))
trainer.prepare()
if device.type == "cuda":
    torch.cuda.synchronize()
"""
TRACKING = """
import mlflow
from normlab.tracking import connection
connection.create_store_safely()
client = mlflow.MlflowClient()
experiment = client.get_experiment_by_name("split") or client.get_experiment(client.create_experiment("split"))
run = client.create_run(experiment.experiment_id)
client.log_batch(run.info.run_id, params=[mlflow.entities.Param(f"p{i}", str(i)) for i in range(12)])
"""
WAYS = {
    "engine side alone": [ENGINE],
    "tracking side alone": [TRACKING],
    "both in one process (now)": [ENGINE + TRACKING],
    "two processes at once": [ENGINE, TRACKING],
}


def wall(codes: list[str], data_dir: str, env: dict[str, str], cwd: str) -> float:
    """Seconds until every process of ``codes`` has exited; stops the benchmark if one fails."""
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", code, data_dir], cwd=cwd, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for code in codes]
    outputs = [process.communicate()[0] for process in processes]
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            sys.exit(f"a probe process exited with {process.returncode}:\n{output[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    work, env = isolated_store("normlab-split-")
    data_dir = str(Path(args.data_dir).resolve())
    wall(WAYS["both in one process (now)"], data_dir, env, work)  # the store, and warm file caches
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, codes in WAYS.items():
            times[way].append(wall(codes, data_dir, env, work))
            print(f"{way:<28} {times[way][-1]:5.2f} s", flush=True)
    now, split = (statistics.median(times[way]) for way in ("both in one process (now)", "two processes at once"))
    for way, measured in times.items():
        print(f"median {way:<28} {statistics.median(measured):5.2f} s (of {args.repeats})")
    print(f"two processes at once: {now - split:.2f} s sooner ({now / split:.2f}x)")


if __name__ == "__main__":
    main()
