"""Does compiling the step pay for a run? Per GPU technique set: what preparing a run costs
(compile and capture) and what each epoch costs, for the three study variants, in one process.

    python benchmarks/compile_rule.py            # run twice with the same TORCHINDUCTOR_CACHE_DIR:
                                                 # the first is a cold machine, the second a warm one

A technique pays for a run of E epochs when E x (epoch saved) exceeds its preparing cost;
the printed break-even epochs say that per variant.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.processes import scratch_folder  # noqa: E402
from benchmarks.speed import STUDY, prepare_mnist  # noqa: E402
from normlab.engine.data import DeviceData, load_raw  # noqa: E402
from normlab.engine.fast import Speedups  # noqa: E402
from normlab.engine.train import Callbacks, Trainer  # noqa: E402

SETS = {
    "eager": Speedups(eval_batch_size=2000),
    "graphs, cuDNN": Speedups(cuda_graphs=True, chunk_steps=64, eval_batch_size=2000),
    "graphs, Triton convs": Speedups(cuda_graphs=True, chunk_steps=64, triton_convs=True, eval_batch_size=2000),
    "compiled graphs, Triton convs": Speedups(cuda_graphs=True, chunk_steps=64, compile=True, triton_convs=True,
                                              eval_batch_size=2000),
}


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    digits = next(p for p in (ROOT / "tests" / "data" / "mnist-t10k", ROOT.parent / "shared" / "data" / "mnist-t10k")
                  if p.exists())
    folder = Path(scratch_folder("normlab-compile-rule-")) / "d"
    root, source = prepare_mnist(ROOT / "data", digits, folder, None, None, holdout=2000)
    data = DeviceData(load_raw("mnist", root, download=False), "cuda")
    report = []
    for name, speedups in SETS.items():
        for config in STUDY:
            config = replace(config, epochs=epochs)
            try:
                trainer = Trainer(config, data, speedups=speedups)
                prepare = trainer.prepare()
                seconds = []
                for _ in range(epochs):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    record = trainer.run_epoch(Callbacks())
                    torch.cuda.synchronize()
                    seconds.append(time.perf_counter() - start)
                row = {"set": name, "variant": config.label, "prepare_s": round(prepare, 2),
                       "epoch_s": round(statistics.median(seconds[1:]), 4), "test_acc": record.test_acc}
            except Exception as exc:  # a technique set that cannot run here is reported, not fatal
                row = {"set": name, "variant": config.label, "error": f"{type(exc).__name__}: {exc}"[:300]}
            report.append(row)
            print(json.dumps(row), flush=True)
    print(f"data: {source}")
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
