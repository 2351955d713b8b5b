"""What logging a run's model costs, with the exported graph of an earlier run of the same
architecture reused (results_log._exports_reusing_graphs, what every run after a process's first
does) and with a new trace each time, alternately, in one process.

    python benchmarks/model_logging.py --data-dir /tmp/mnist1k --repeats 7

Prints each way's median seconds for `results_log.log_model` (torch.export, saving, MLflow's
model files) into a temporary sqlite store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.processes import scratch_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    work = scratch_folder("normlab-logging-")
    os.chdir(work)  # a sqlite store keeps the Default experiment's artifacts in ./mlruns
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    import mlflow

    from normlab.engine.config import TrainConfig, architecture_key
    from normlab.engine.data import DeviceData, load_raw
    from normlab.engine.train import Trainer
    from normlab.tracking import results_log

    data = DeviceData(load_raw("mnist", data_dir), "cpu")
    config = TrainConfig(norm=args.norm, epochs=1)
    model = Trainer(config, data).model
    architecture = architecture_key(config)
    results_log.warm_up_results_logging()  # the first call's one-time imports
    times: dict[str, list[float]] = {"reusing the graph": [], "tracing anew": []}
    with mlflow.start_run():
        results_log.log_model(model, data, architecture=architecture)  # keeps the program
        for _ in range(args.repeats):
            for way in times:
                if way == "tracing anew":
                    results_log._EXPORTED.clear()
                start = time.perf_counter()
                results_log.log_model(model, data, architecture=architecture)
                times[way].append(time.perf_counter() - start)
    medians = {way: statistics.median(t) for way, t in times.items()}
    for way, median in medians.items():
        print(f"log_model, {way:<18} {median:5.2f} s  (median of {args.repeats})")
    print(f"ratio: {medians['tracing anew'] / medians['reusing the graph']:.2f}x")


if __name__ == "__main__":
    main()
