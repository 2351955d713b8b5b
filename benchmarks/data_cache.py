"""What the kept parse of a dataset saves: `normlab train` as users run it, with the splits
torchvision parsed kept in --data-dir/.normlab-cache (every run after the first), against the
same command with that cache removed first (the first run: torchvision imported, the files
parsed, the cache written), alternately, in one invocation.

    python benchmarks/data_cache.py --data-dir DATA --repeats 5

Prints each way's median wall time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from processes import ROOT, isolated_store, timed, train_benchmark_args

sys.path.insert(0, str(ROOT))

from normlab.engine.data import parsed_cache_path  # noqa: E402
from normlab.engine.registry import DATASETS


def main() -> None:
    args = train_benchmark_args(__doc__)
    data_dir = Path(args.data_dir).resolve()
    cache = parsed_cache_path(data_dir, DATASETS["mnist"])
    work, env = isolated_store("normlab-data-cache-")
    train = [sys.executable, "-m", "normlab", "train", "--norm", "ln", "--data-dir", str(data_dir),
             "--epochs", str(args.epochs)]
    subprocess.run(train, env=env, cwd=work, capture_output=True, check=True)  # the store, and the cache
    times: dict[str, list[float]] = {"kept parse": [], "parsed by torchvision": []}
    for _ in range(args.repeats):
        for way in times:
            if way == "parsed by torchvision":
                cache.unlink()
            times[way].append(timed(train, env, work)[0])
    assert cache.is_file(), "the runs after a removal keep the parse again"
    for way, measured in times.items():
        print(f"{way:<22} wall {statistics.median(measured):6.2f} s   (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in measured)})")
    kept, parsed = (statistics.median(times[w]) for w in times)
    print(f"saved {parsed - kept:.2f} s per command ({parsed / kept:.2f}x)")


if __name__ == "__main__":
    main()
