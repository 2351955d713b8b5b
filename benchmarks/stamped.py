"""A command's events on one time line: where a short run's wall time goes, and what waits.

Runs a normlab command, or `mlflow run` of this project, as a process from a temporary copy
of this checkout in which the engine's, the tracking side's and the results processes' main
events (EVENTS) print `[seconds] event` to stderr, and prints every line of the command's
output stamped with the seconds since it started. On one GPU the engine and the results run
in processes of their own, so their events and the command's interleave, and the line that
waits for the other shows which side is the critical path (docs/speed.md, twelfth session).
The copy is made per call and thrown away; this checkout is not changed. A compiled step kept
on disk (precompiled.py) is keyed by the engine's source, which the stamps change: a sweep that
compiles (ten seeds) loads its steps only after a stamped warm-up, say
`NORMLAB_COMPILE=always python benchmarks/stamped.py normlab sweep --epochs 1 --data-dir DATA`.

    python benchmarks/stamped.py normlab train --norm ln --data-dir DATA
    python benchmarks/stamped.py mlflow run . --env-manager local -P norm=ln -P data_dir=DATA
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.processes import bytecode_as_installed  # noqa: E402

# (file, the line an event is stamped before, the event); each line must occur once in its file
EVENTS = [
    ("normlab/engine/fast/engine_process.py", "if on_gpu:", "engine: started"),
    ("normlab/engine/fast/engine_process.py", "pool = TrainerPool(device, data_dir, concurrent)",
     "engine: torch imported"),
    ("normlab/engine/fast/engine_process.py", 'send(None, "hello", pool.device_name, pool.concurrent)',
     "engine: data on the device, first steps being prepared"),
    ("normlab/engine/fast/engine_process.py", 'self._send_run(key, "prepared", trainer.prepare()',
     "engine: run built"),
    ("normlab/engine/train.py", "if self.speedups.triton_convs and self.last_evaluation is None:",
     "engine: steps set up and captured, evaluation's kernels next"),
    ("normlab/engine/fast/trainer_pool.py", "kernels = self._kernel_specs(planned)", "prepare: kernel specs next"),
    ("normlab/engine/fast/trainer_pool.py", "ready = 0", "prepare: kernels checked (or compiled side by side)"),
    ("normlab/engine/fast/trainer_pool.py", "trainer = Trainer(config, data, epochs_ahead=epochs_ahead, warm=warm)",
     "built: Triton's hash ready"),
    ("normlab/engine/fast/trainer_pool.py", "self.warm_ups.add(trainer)", "prepare: a warm-up ready"),
    ("normlab/engine/step.py", "run_and_undo(self, x, y, rates, steps=1)", "step: a compiled shape's first step"),
    ("normlab/engine/fast/precompiled.py", "compiled = torch.compiler.load_compiled_function(file)",
     "precompiled: loading a file"),
    ("normlab/engine/fast/precompiled.py", "if not compiled.guard_check(*args):", "precompiled: file loaded, guards next"),
    ("normlab/engine/fast/precompiled.py", "self.loads += 1", "precompiled: loaded"),
    ("normlab/engine/fast/precompiled.py", "with torch._dynamo.config.patch(enable_aot_compile=True):",
     "precompiled: no file, compiling"),
    ("normlab/engine/fast/chunked_steps.py", "if self.graphed:", "steps: compiled shapes ready (or none), capturing next"),
    ("normlab/engine/fast/engine_process.py", "result = fit(trainer, _Reporter(self._send_run, key, trainer))",
     "engine: run prepared, training"),
    ("normlab/engine/fast/engine_process.py", "indices = [m.index for m in result.mistakes]",
     "engine: run trained"),
    ("normlab/cli.py", "torch_device = resolve_device(device) if remote is None else None",
     "tracking: imports done"),
    ("normlab/cli.py", "connection.create_store_safely()", "tracking: opening the store"),
    ("normlab/tracking/lifecycle.py", "progress = Progress(config.epochs, echo, bars)",
     "tracking: run set up, training followed from here"),
    ("normlab/tracking/lifecycle.py", "results_log.log_results(config, data, result)",
     "tracking: training done, logging the results"),
    ("normlab/tracking/lifecycle.py", 'phases["artifacts and model"] = time.perf_counter() - started',
     "tracking: results logged"),
    ("normlab/engine/fast/engine_process.py", 'self.send(("close",))', "command: closing the engine process"),
    ("normlab/engine/fast/engine_process.py", "self.outbox.put(None)", "command: the engine process ended"),
    ("normlab/tracking/results_process.py", "while _current:", "command: ending the results processes"),
    ("normlab/cli.py", "threading._shutdown()", "command: exiting (threads joined, then atexit handlers)"),
    ("normlab/cli.py", "os._exit(code or 0)", "command: atexit handlers done, os._exit"),
    ("normlab/tracking/results_process.py", "from normlab.tracking import results_log", "models: started"),
    ("normlab/tracking/results_process.py", "gc.freeze()  # torch's", "models: warmed up"),
    ("normlab/tracking/results_process.py", "plots.warm_up()", "figures: matplotlib imported"),
    ("normlab/tracking/results_process.py", "gc.freeze()  # matplotlib's", "figures: warmed up"),
]

STAMP = ('__import__("sys").stderr.write("[%%7.2f] %%s\\n" %% (__import__("time").time() - '
         'float(__import__("os").environ.get("NORMLAB_T0", "0")), %r))')


def stamped_copy(folder: Path) -> Path:
    """This checkout's project (MLproject, conda.yaml, normlab/) in ``folder``, with EVENTS stamped."""
    for name in ("MLproject", "conda.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "normlab", folder / "normlab", ignore=shutil.ignore_patterns("__pycache__"))
    for file, anchor, event in EVENTS:
        path = folder / file
        lines = path.read_text().splitlines(keepends=True)
        found = [i for i, line in enumerate(lines) if line.strip().startswith(anchor)]
        if len(found) != 1:
            sys.exit(f"error: {file} has {len(found)} lines starting with {anchor!r}, not one: update EVENTS")
        line = lines[found[0]]
        lines.insert(found[0], line[:len(line) - len(line.lstrip())] + STAMP % event + "\n")
        path.write_text("".join(lines))
    return folder


USAGE = """usage: python benchmarks/stamped.py normlab COMMAND [OPTIONS]
       python benchmarks/stamped.py mlflow run PROJECT [OPTIONS]"""


def main() -> None:
    command = sys.argv[1:]
    if command[:1] != ["normlab"] and command[:2] != ["mlflow", "run"]:
        sys.exit(USAGE)
    with tempfile.TemporaryDirectory(prefix="normlab-stamped-") as folder:
        copy = stamped_copy(Path(folder))
        print(f"bytecode: {bytecode_as_installed([copy])}", file=sys.stderr, flush=True)  # before the time line
        if command[0] == "normlab":  # -P: the working folder's normlab (this checkout's, say) does not come first
            command = [sys.executable, "-P", "-m", "normlab", *command[1:]]
        else:  # the project's path, if given as this checkout, is the stamped copy
            command = [sys.executable, "-m", "mlflow", "run",
                       *(str(copy) if Path(part).resolve() == ROOT else part for part in command[2:])]
        start = time.time()
        env = dict(os.environ, NORMLAB_T0=repr(start), PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(copy) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            print(f"{time.time() - start:7.2f} {line.rstrip()}", flush=True)
        status = process.wait()
        print(f"{time.time() - start:7.2f} exit {status}", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
