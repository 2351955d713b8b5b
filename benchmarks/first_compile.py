"""A process's compiled steps, variant after variant, as a ten-seed sweep's engine prepares its
first runs: each trainer's build and prepare (compile from the caches, capture) in one fresh
process, in the sweep's order (BN + L1, LN, GN, then a second BN seed, which compiles nothing).
The first pays the process's imports of Dynamo and Inductor; run it under `python -X importtime`
to see them. GPU only; run it twice, the first fills the compile caches.

    python benchmarks/first_compile.py --data-dir DATA
    python benchmarks/first_compile.py --data-dir DATA --profile OUT   # OUT-bn-s1.prof, ... (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normlab.engine.config import TrainConfig  # noqa: E402
from normlab.engine.fast.trainer_pool import TrainerPool  # noqa: E402

ORDER = (TrainConfig(norm="bn", l1=1e-5), TrainConfig(norm="ln"), TrainConfig(norm="gn"),
         TrainConfig(norm="bn", l1=1e-5, seed=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--profile", help="dump each variant's cProfile to PROFILE-NORM-sSEED.prof")
    args = parser.parse_args()
    pool = TrainerPool("cuda", args.data_dir, 1)
    pool.data("mnist")
    torch.cuda.synchronize()
    print(f"torch imported and the data on the GPU: {time.perf_counter() - STARTED:.2f} s", flush=True)
    for config in ORDER:
        profile = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profile:
            profile.enable()
        trainer = pool.trainer(config, epochs_ahead=1000)  # as many epochs as compile pays for
        built = time.perf_counter()
        trainer.prepare()
        torch.cuda.synchronize()
        if profile:
            profile.disable()
            profile.dump_stats(f"{args.profile}-{config.norm}-s{config.seed}.prof")
        print(f"{config.run_name}: built {built - start:.2f} s, prepared {time.perf_counter() - built:.2f} s, "
              f"compiled {trainer.speedups.compile}", flush=True)
        pool.release(trainer, finished=False)


if __name__ == "__main__":
    main()
