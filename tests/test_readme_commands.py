"""The README's commands, run as a user would type them.

Every command in the ```bash blocks of README.md, then of the pages it links in docs/
(docs/*.md, where its longer parts moved), runs in order, each in a fresh copy of this
checkout (the folder a user has cloned), with two things supplied: a real-digit MNIST folder
at ./data (the tests' 1,000/500-digit split, in torchvision's layout) and
MLFLOW_TRACKING_URI pointing at one sqlite store for the whole test, so later commands see
what earlier ones made (and a sweep run again resumes). About 2.5-3.5 minutes on 2 cores
(146-213 s in the suite, 2026-12-04). The only change to a command is a shorter training:
`--epochs 1` appended to `normlab train|sweep`, `-P epochs=1` to `mlflow run` of the `main`
and `sweep` entry points (the last value given wins).

Setup before `&&` (creating and activating a virtual environment, `pip install`) is dropped:
the tests run in an environment made the same way (.ci/run), and what follows is run.
Placeholders are filled from the runs earlier commands made (PLACEHOLDERS). A command that
cannot run here is skipped by a rule in SKIPPED, which says why; the test reads the README
when it runs, so edited commands are run as they are then.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, cli_env

README = ROOT / "README.md"


def documented() -> list[Path]:
    """README.md, then the pages in docs/ it points to for the longer parts."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


# (pattern searched in the command, or in the environment its block exported, and why it is skipped)
SKIPPED = [
    (r"^mlflow run \.(?!.*--env-manager local)",
     "builds a conda environment from conda.yaml (needs conda and internet); the same run with "
     "--env-manager local runs here"),
    (r"python -m pytest", "the test suite itself: CI runs it (.ci/run)"),
    (r"^mlflow ui\b|^mlflow server\b",
     "starts a server that runs until stopped; tests/test_ui_browser.py starts `mlflow server` over "
     "real runs and checks its pages in Chromium"),
    (r"\bjupyter\b",
     "opens an interactive notebook server; tests/test_compare.py executes analysis.ipynb with nbclient"),
    (r"MLFLOW_TRACKING_URI=https?://|tracking-host|postgresql://|s3://",
     "needs a tracking server at that address (tests/test_tracking_server.py runs sweeps against a real "
     "`mlflow server`)"),
    (r"--address|SLURM|JOB_COMPLETION_INDEX|\bray\b", "needs a cluster (Ray, SLURM or Kubernetes)"),
    (r"benchmarks/(conv_tiles|compile_rule|stacked_seeds|concurrency|chunk_steps|first_compile)\.py|--device cuda",
     "needs a CUDA GPU"),
    (r"benchmarks/e2e\.py",
     "times the study's commands as processes at full size (60,000 images, 20 epochs, 10 seeds): an "
     "H200 benchmark; its output is committed in benchmarks/results/"),
    (r"--seeds ([4-9]|\d\d+)\b",
     "more than 3 seeds: 12 runs or more, minutes on CI's 2 cores; the same sweep with --seeds 3 runs"),
    (r"--batch-sizes [^ ]*\b2,",
     "the batch-size study: 36 runs, and batch 2 is 500 steps an epoch even on the test split: "
     "over 10 minutes on CI's 2 cores (normlab sweep with one batch size runs the same code)"),
    (r"benchmarks/speed\.py.*--tiny", "tests/test_benchmark.py runs this smoke test"),
    (r"benchmarks/(exit_cost|data_cache|commands|mlflow_run_share)\.py",
     "a benchmark of fresh processes (`normlab` commands repeated, alternately): minutes on CI's 2 cores; "
     "the CLI tests run the same commands"),
    (r"benchmarks/process_split\.py",
     "a benchmark of fresh processes (a run's engine and tracking sides four ways, repeated): a minute or "
     "more on CI's 2 cores; the training tests run the same engine and tracking calls"),
    (r"benchmarks/model_logging\.py", "tests/test_benchmark.py runs it with --repeats 1"),
    (r"benchmarks/stamped\.py", "tests/test_benchmark.py runs it over `normlab train` and `mlflow run`"),
    (r"benchmarks/(engine|results)_start\.py", "tests/test_benchmark.py runs it on the CPU against a baseline folder"),
    (r"benchmarks/step_profile\.py",
     "a profile of whole epochs and steps, each variant in turn: it reports, and checks nothing a test "
     "does not (tests/test_step.py and tests/test_train.py train the same steps)"),
    (r"benchmarks/(speed|cpu_step)\.py",
     "a benchmark: minutes of full-size epochs (60,000 images) or of fresh processes per variant; "
     "tests/test_benchmark.py runs its --tiny form"),
]
SETUP = re.compile(r"^(python3? -m venv |\. \S*activate$|source \S*activate$|pip install )")
# Placeholders and what fills them: a kind of run made by an earlier command, newest first
# (the second newest for the second of two runs), or a fixed value.
PLACEHOLDERS = {
    "RUN_ID": ("training", 0), "TRAINING_RUN_ID": ("training", 0), "RUN_A": ("training", 0),
    "RUN_B": ("training", 1), "SWEEP_RUN_ID": ("parent", 0), "PARENT_RUN_ID": ("parent", 0),
    "COMPARISON_RUN_ID": ("comparison", 0), "DATA": "data",
}
PLACEHOLDER = re.compile(r"\b(?:[A-Z]+_)*(?:RUN_ID|RUN_[A-Z])\b|(?<=--data-dir )DATA\b")
TRAINING = re.compile(r"^(normlab (train|sweep)\b|mlflow run \.(?!.* -e (?!main\b|sweep\b)))")


@dataclass
class Command:
    text: str  # as written, continuation lines joined, comment dropped
    line: int  # line of its file where it starts
    exports: list[str] = field(default_factory=list)  # `export` lines above it in its block

    def skip_reason(self) -> str | None:
        if not self.to_run().split("; ")[-1]:
            return "only sets up an environment (virtual environment, pip install): CI makes its own (.ci/run)"
        for pattern, reason in SKIPPED:
            if any(re.search(pattern, line) for line in [self.text, *self.exports]):
                return reason
        return None

    def to_run(self) -> str:
        """The command without its setup prefix, with training shortened to one epoch, after
        the `export` lines above it in its block."""
        parts = [p.strip() for p in self.text.split("&&")]
        while parts and SETUP.match(parts[0]):
            parts.pop(0)
        command = " && ".join(parts)
        if TRAINING.match(command):
            command += " -P epochs=1" if command.startswith("mlflow run") else " --epochs 1"
        return "; ".join([*self.exports, command])


def strip_comment(line: str) -> str:
    """The line without a shell comment: a # that starts a word outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    commands = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first_line = text[:block.start()].count("\n") + 2
        exports: list[str] = []
        pending, start = "", 0
        for offset, raw in enumerate(block.group(1).splitlines()):
            line = strip_comment(raw)
            if not pending:
                start = first_line + offset
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            line, pending = (pending + line.strip()).strip(), ""
            if not line:
                continue
            if line.startswith("export "):
                exports.append(line)
                continue
            commands.append(Command(line, start, list(exports)))
    return commands


def test_readme_parsing_joins_continuations_drops_comments_and_setup():
    text = ("```bash\npython3 -m venv .venv && . .venv/bin/activate && pip install -e . && normlab sweep --out r\n"
            "# a comment\nmlflow server --host 0.0.0.0 \\\n  --workers 4   # trailing\n"
            "export MLFLOW_TRACKING_URI=http://tracking-host:5000\nnormlab compare --filter \"a # b\"\n```\n"
            "```bash\nexport OMP_NUM_THREADS=1\nnormlab train\n```\n"
            "```text\nnormlab train\n```\n```bash\nmlflow run . -e compare --env-manager local -P out=x\nmlflow run . -P norm=ln\n```\n")
    sweep, server, compare, train, run_compare, conda_run = readme_commands(text)
    assert sweep.to_run() == "normlab sweep --out r --epochs 1" and sweep.line == 2
    assert server.text == "mlflow server --host 0.0.0.0 --workers 4" and server.line == 4
    assert "server" in server.skip_reason()
    assert compare.text == 'normlab compare --filter "a # b"'
    assert compare.to_run() == "export MLFLOW_TRACKING_URI=http://tracking-host:5000; " + compare.text
    assert "tracking server" in compare.skip_reason()  # it follows the export in its block
    assert train.to_run() == "export OMP_NUM_THREADS=1; normlab train --epochs 1" and train.skip_reason() is None
    assert run_compare.to_run() == run_compare.text and run_compare.skip_reason() is None
    assert "conda" in conda_run.skip_reason()
    assert Command("mlflow run . -P norm=ln --env-manager local", 1).to_run().endswith(" -P epochs=1")


class Runs:
    """The runs the commands made, by kind, newest first: what fills the placeholders."""

    def __init__(self, uri: str):
        self.client = MlflowClient(uri)

    def newest(self, kind: str) -> list[str]:
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(experiments, order_by=["attributes.start_time DESC"]) if experiments else []
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
        is_kind = {"training": lambda r: "variant" in r.data.tags,
                   "parent": lambda r: r.info.run_id in parents,
                   "comparison": lambda r: "compared_run_ids" in r.data.tags}[kind]
        return [r.info.run_id for r in runs if is_kind(r)]

    def fill(self, command: str) -> str:
        def value(match: re.Match) -> str:
            name = match.group(0)
            if name not in PLACEHOLDERS:
                pytest.fail(f"README command {command!r} has the placeholder {name}, which this test cannot "
                            f"fill: add it to PLACEHOLDERS")
            rule = PLACEHOLDERS[name]
            if isinstance(rule, str):
                return rule
            kind, index = rule
            found = self.newest(kind)
            if len(found) <= index:
                pytest.fail(f"README command {command!r} needs {name}, but the commands above it made "
                            f"{len(found)} {kind} run(s)")
            return found[index]
        return PLACEHOLDER.sub(value, command)


def fresh_checkout(dest: Path, data: Path) -> Path:
    """A copy of this checkout's files (tracked and new, not ignored), with ./data linked to `data`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / "data").symlink_to(data, target_is_directory=True)
    return dest


def test_readme_commands_run_as_written(small_mnist_dir, tmp_path):
    commands = [(path.relative_to(ROOT), c) for path in documented() for c in readme_commands(path.read_text())]
    assert len(commands) >= 20, [c.text for _, c in commands]  # the parser found the README's blocks
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    env = cli_env(MLFLOW_TRACKING_URI=uri)
    env.pop("PYTHONPATH")  # what the user has: the installed normlab, the checkout as the working folder
    runs, report, failures = Runs(uri), [], []
    for i, (path, command) in enumerate(commands):
        where = f"{path}:{command.line}"
        reason = command.skip_reason()
        if reason:
            report.append(f"{where} skipped: {command.text}\n    ({reason})")
            continue
        to_run = runs.fill(command.to_run())
        folder = fresh_checkout(tmp_path / f"command-{i}", small_mnist_dir)
        start = time.monotonic()
        proc = subprocess.run(["bash", "-c", to_run], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=600)
        report.append(f"{where} ran in {time.monotonic() - start:.0f} s: {to_run}")
        if proc.returncode != 0:
            failures.append(f"{where}: {to_run}\nexit {proc.returncode}\n"
                            f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    print("\n".join(report))
    assert not failures, "\n\n".join(failures)
