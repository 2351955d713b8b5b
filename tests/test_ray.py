"""Sweeps on a real two-node Ray cluster on this machine: a head and a second node started
with `ray start` (one CPU each, their own temp folders), a real `mlflow server` as the
store, `normlab sweep --address` as a user runs it. A sweep spreads over both nodes; two
drivers of one sweep train each child once; Ctrl-C marks the running children KILLED, a second
aborts the runs of an actor that does not answer, and the same command resumes them; the
second node killed mid-run loses no child; a sqlite store is refused for a cluster of
two nodes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

try:
    import ray  # noqa: F401  (only whether it imports)
except ImportError:
    pytest.skip('Ray is not installed: pip install -e ".[test,ray]" (the ray extra) to run the cluster tests',
                allow_module_level=True)

from mlflow.tracking import MlflowClient

from normlab.errors import ConfigError
from normlab.sweep.executors import RayExecutor, WorkerSettings
from normlab.tracking import sweep_records as st
from tests.conftest import cli_env
from tests.mlflow_server import TokenProxy, free_port

RAY = str(Path(sys.executable).with_name("ray"))
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
# Ray's own processes kept small: CI has 2 cores (no dashboard, a 100 MB object store)
NODE_ARGS = ("--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats", "--block")


def test_address_auto_without_a_cluster_on_this_machine_is_refused_before_any_run(small_mnist_dir, tmp_path):
    """`normlab sweep --address auto` where no Ray runs: Ray's ConnectionError was a traceback.
    First in this file, before its tests start their cluster (auto finds any running one)."""
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine, and --address auto would find it")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "normlab", "sweep", "--address", "auto", "--epochs", "1",
                           "--data-dir", str(small_mnist_dir)], cwd=tmp_path, capture_output=True, text=True,
                          env=cli_env(MLFLOW_TRACKING_URI=uri), timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("Error: no Ray cluster answers at --address auto (Could not find any running Ray instance. "
            "Please specify the one to connect to by setting `--address` flag or `RAY_ADDRESS` environment "
            "variable.); start one with `ray start --head` (then --address auto, on a node of it) or give the "
            "head node's HOST:PORT") in proc.stderr
    assert "Traceback" not in proc.stderr
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def _tree(pid: int) -> list[int]:
    """pid and every process below it (Ray's workers start their own sessions, so a process
    group does not hold them; the tree from the `ray start` we ran does)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


class RayNode:
    """One `ray start --block` we ran, in its own session and temp folder."""

    def __init__(self, args: list[str], root: Path, env: dict[str, str]):
        self.temp = Path(tempfile.mkdtemp(prefix="nlray-"))  # short: Ray's socket paths must fit 107 bytes
        self.log = root / f"{self.temp.name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([RAY, "start", *args, f"--temp-dir={self.temp}", *NODE_ARGS],
                                         cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"ray start failed: {self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def pids(self) -> set[int]:
        return set(_tree(self.proc.pid)) if self.proc.poll() is None else set()

    def kill(self) -> None:
        """SIGKILL the node: its raylet, agents and workers (a machine that died)."""
        for pid in _tree(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = cli_env(RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the drivers pass theirs to the workers
        self.head = RayNode(["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                             "--include-dashboard=false"], root, self.env)
        self.second: RayNode | None = None
        try:
            self.ensure_two_nodes()
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> int:
        code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                             timeout=60, cwd=self.root)
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout.split()[-1])

    def ensure_two_nodes(self) -> None:
        """A second node alive (started again if a test killed it), and Ray counting both."""
        if self.second is not None and self.second.proc.poll() is None:
            return
        if self.second is not None:
            self.second.remove()
        self.second = RayNode([f"--address={self.address}", "--node-ip-address=127.0.0.1"], self.root, self.env)
        deadline = time.monotonic() + 60
        while (alive := self.alive_nodes()) != 2:
            assert time.monotonic() < deadline, f"Ray counts {alive} alive nodes, not 2"
            time.sleep(1)

    def stop(self) -> None:
        for node in (self.second, self.head):
            if node is not None:
                node.remove()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("ray"))
    yield cluster
    cluster.stop()


class Driver:
    """`normlab sweep --address` in a subprocess, its output read line by line as it comes."""

    def __init__(self, args: tuple[str, ...], cwd: Path, **env: str):
        self.lines: list[str] = []
        self.seen = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "normlab", *args], cwd=cwd, env=cli_env(**env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.seen:
                self.lines.append(re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n")))
                self.seen.notify_all()

    def wait_for(self, match, timeout: float) -> str:
        """The first line for which match(line) holds, waiting for it to come."""
        deadline = time.monotonic() + timeout
        with self.seen:
            checked = 0
            while True:
                for line in self.lines[checked:]:
                    if match(line):
                        return line
                checked = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError(f"no such line; the sweep printed:\n{self.output[-6000:]}")
                self.seen.wait(min(left, 1.0))

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _sweep_args(cluster, data_dir: Path, tmp_path: Path, *grid: str) -> tuple[str, ...]:
    """A sweep on the cluster, in an experiment of this test's own (named after its folder)."""
    return ("sweep", *grid, "--data-dir", str(data_dir), "--address", cluster.address,
            "--checkpoint-dir", str(tmp_path / "checkpoints"), "--experiment", tmp_path.name)


def _children(uri: str, experiment: str) -> dict[str, list]:
    """Every child run of the experiment by config hash (deleted ones left out)."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = [r for r in client.search_runs([experiment_id]) if st.CONFIG_HASH in r.data.tags]
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.data.tags[st.CONFIG_HASH], []).append(run)
    return found


def _check_complete(uri: str, run, epochs: int) -> None:
    client = MlflowClient(uri)
    for metric in METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(1, epochs + 1)), (run.info.run_name, metric, steps)


def _node_of(run) -> str:
    """The Ray node id a child's worker_device tag names ('cpu on Ray node 1a2b3c4d (ip)')."""
    device = run.data.tags[st.DEVICE]
    match = re.search(r"on Ray node (\w+)", device)
    assert match, device
    return match.group(1)


RUN_STARTED = re.compile(r"\[([\w.-]+)\] MLflow run (\w+) ")  # a child's name and run id, as its worker prints


def _wait_for_checkpoints(driver: Driver, run_ids, timeout: float) -> None:
    """Until each run's first checkpoint has reached the store (MLFLOW_TRACKING_URI) while the
    driver still runs."""
    deadline = time.monotonic() + timeout
    while not all(map(st.has_checkpoint, run_ids)):
        assert time.monotonic() < deadline and driver.proc.poll() is None, driver.output[-4000:]
        time.sleep(0.2)


def test_sqlite_store_refused_for_two_nodes_before_any_run(cluster, small_mnist_dir, tmp_path):
    cluster.ensure_two_nodes()
    store = tmp_path / "mlflow.db"
    result = subprocess.run([sys.executable, "-m", "normlab", *_sweep_args(cluster, small_mnist_dir, tmp_path,
                                                                          "--norms", "ln", "--epochs", "1")],
                            cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the Ray cluster has 2 nodes, but MLFLOW_TRACKING_URI is a local store" in result.stderr
    assert "start a tracking server" in result.stderr
    assert "Traceback" not in result.stderr
    if store.exists():  # the store may exist; no run may (the sweep's parent included)
        client = MlflowClient(f"sqlite:///{store}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_an_address_where_no_cluster_answers_fails_at_once(tmp_path):
    """ray.init would wait for it without end: the executor refuses it before connecting."""
    port = free_port()
    settings = WorkerSettings(str(tmp_path), "normlab", str(tmp_path), "http://127.0.0.1:5000")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"no Ray cluster answers at --address 127.0.0.1:{port} .*"
                                          rf"`ray start --head --port {port}`"):
        RayExecutor(f"127.0.0.1:{port}", settings, print)
    assert time.monotonic() - started < 30


def test_two_drivers_of_one_sweep_train_each_child_once(cluster, server, small_mnist_dir, tmp_path):
    """The same command twice at once: the cluster's two CPUs go to either driver's actors
    or to both, and either way MLflow (leases, creation order) gives each config one child.

    The store demands a token (a proxy in front of the server refuses any request without
    MLFLOW_TRACKING_TOKEN's bearer header), set for the drivers only: the children finish
    only if the actors send it too, and no file Ray writes on its two nodes may hold it (its
    session logs print a job's runtime environment in full: "Creating runtime env: ...")."""
    cluster.ensure_two_nodes()
    token = f"tok-{os.urandom(8).hex()}"
    proxy = TokenProxy(server.uri, token)
    try:
        args = _sweep_args(cluster, small_mnist_dir, tmp_path, "--norms", "gn,ln", "--epochs", "1")
        drivers = [Driver(args, tmp_path, MLFLOW_TRACKING_URI=proxy.uri, MLFLOW_TRACKING_TOKEN=token)
                   for _ in range(2)]
        for driver in drivers:
            assert driver.finish() == 0, driver.output[-6000:]
            assert token not in driver.output
    finally:
        proxy.close()
    assert proxy.refused == 0  # every request of the drivers and the actors carried it
    written = [path for node in (cluster.head, cluster.second) for path in node.temp.rglob("*")
               if path.is_file() and token.encode() in path.read_bytes()]
    assert written == [], written
    finished_lines = [line for driver in drivers for line in driver.lines if line.startswith("finished ")]
    assert len(finished_lines) == 2, finished_lines  # each child trained to its end by one driver

    client = MlflowClient(server.uri)
    experiment_id = client.get_experiment_by_name(tmp_path.name).experiment_id
    parents = client.search_runs([experiment_id], filter_string=f"tags.{st.SWEEP_ROLE} = 'parent'")
    assert len(parents) == 1  # the later driver's parent gave way to the earlier one
    children = _children(server.uri, tmp_path.name)
    assert sorted(runs[0].info.run_name for runs in children.values()) == ["gn2-s1", "ln-s1"]
    for runs in children.values():
        assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
        assert runs[0].data.tags[st.SWEEP_PARENT] == parents[0].info.run_id
        _check_complete(server.uri, runs[0], epochs=1)


def test_ctrl_c_marks_the_running_children_killed_a_second_aborts_and_the_same_command_resumes_them(
        cluster, server, small_mnist_dir, tmp_path, monkeypatch):
    """Ctrl-C of a sweep on Ray (SIGINT to the driver alone: a terminal's does not reach the
    actors, which Ray's own processes started): the actors stop their runs after the current
    step and record them KILLED, interrupted, with the epochs they completed. One actor here
    does not answer (frozen with SIGSTOP, as a hung node or device would be): the driver
    waits for it until a second Ctrl-C, which aborts at once: the driver records that run
    KILLED with the abort's reason itself, ends its lease, kills the actor, marks the parent
    KILLED and exits 130. The same command again resumes each child in its own run from its
    checkpoint artifact, and every epoch is logged once."""
    cluster.ensure_two_nodes()
    epochs = 12
    args = _sweep_args(cluster, small_mnist_dir, tmp_path, "--norms", "gn,ln", "--epochs", str(epochs))
    driver = Driver(args, tmp_path, MLFLOW_TRACKING_URI=server.uri)
    run_ids, pids = {}, {}
    while len(run_ids) < 2:  # one actor per node's CPU: both children train at once
        line = driver.wait_for(lambda x: (m := RUN_STARTED.search(x)) is not None and m.group(1) not in run_ids,
                               timeout=240)
        name, run_id = RUN_STARTED.search(line).groups()
        run_ids[name] = run_id
        pids[name] = int(re.match(r"\(RayWorker pid=(\d+)", line).group(1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    answering, frozen = sorted(run_ids)
    try:
        _wait_for_checkpoints(driver, run_ids.values(), timeout=120)  # an epoch of each is in the store
        os.kill(pids[frozen], signal.SIGSTOP)
        driver.proc.send_signal(signal.SIGINT)
        driver.wait_for(lambda x: x.startswith(f"KILLED   {answering} "), timeout=60)
        time.sleep(1)
        assert driver.proc.poll() is None  # still waiting for the actor that does not answer
        driver.proc.send_signal(signal.SIGINT)
        assert driver.finish() == 130, driver.output[-6000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # ray.kill has ended it, or will: never leave it frozen
            os.kill(pids[frozen], signal.SIGKILL)
    assert "sweep interrupted; run the same command again to resume" in driver.output
    client = MlflowClient(server.uri)
    stopped_at = {}
    for name, run_id in run_ids.items():
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["normlab.status"]) == ("KILLED", "interrupted"), (name, run.data.tags)
        steps = [m.step for m in client.get_metric_history(run_id, "test_acc")]
        stopped_at[name] = len(steps)
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < epochs, (name, steps)
    assert "SIGINT received" in client.get_run(run_ids[answering]).data.tags[st.ERROR]
    aborted = client.get_run(run_ids[frozen]).data.tags
    assert aborted["normlab.reason"] == "the sweep was aborted by a second Ctrl-C; run it again to resume"
    assert aborted["normlab.lease_until"] == "0"  # the same command need not wait for the lease to lapse
    [parent] = client.search_runs([client.get_experiment_by_name(tmp_path.name).experiment_id],
                                  filter_string=f"tags.{st.SWEEP_ROLE} = 'parent'")
    assert parent.info.status == "KILLED"

    again = Driver(args, tmp_path, MLFLOW_TRACKING_URI=server.uri)
    assert again.finish() == 0, again.output[-6000:]
    assert "0 finished already, 2 to resume, 0 to start" in again.output
    for name, run_id in run_ids.items():
        assert re.search(rf"\[{re.escape(name)}\] resuming run {run_id} after epoch {stopped_at[name]}",
                         again.output), again.output[-6000:]
    children = _children(server.uri, tmp_path.name)
    assert sorted(r.info.run_id for runs in children.values() for r in runs) == sorted(run_ids.values())
    for runs in children.values():
        assert runs[0].info.status == "FINISHED"
        _check_complete(server.uri, runs[0], epochs=epochs)


def test_second_node_killed_mid_run_loses_no_child(cluster, server, small_mnist_dir, tmp_path, monkeypatch):
    """One actor per CPU of the two nodes: the two children start at once, one on each node.
    The run on the lost node is FAILED with the reason, then resumed from its checkpoint
    artifact on the node that is left; every child FINISHED once, every epoch logged once."""
    cluster.ensure_two_nodes()
    args = _sweep_args(cluster, small_mnist_dir, tmp_path, "--norms", "gn,in", "--epochs", "3")
    driver = Driver(args, tmp_path, MLFLOW_TRACKING_URI=server.uri)

    def started_on(node):
        def started(line: str) -> bool:  # Ray prefixes each line with its worker's pid
            match = re.match(r"\(RayWorker pid=(\d+).*\] MLflow run \w+ ", line)
            return bool(match) and int(match.group(1)) in node.pids()
        return started

    line = driver.wait_for(started_on(cluster.second), timeout=240)
    first_node_line = driver.wait_for(started_on(cluster.head), timeout=60)
    assert "Ray: up to 2 worker actor(s), one per CPU of 2 node(s)" in driver.output
    assert re.search(r"\[([\w.-]+)\]", first_node_line).group(1) != re.search(r"\[([\w.-]+)\]", line).group(1)
    name, run_id = RUN_STARTED.search(line).groups()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    _wait_for_checkpoints(driver, [run_id], timeout=60)  # its first epoch's checkpoint has reached the store
    cluster.second.kill()
    assert driver.finish() == 0, driver.output[-6000:]
    assert "2 of 2 children finished" in driver.output
    died = re.search(rf"\[{re.escape(name)}\] its Ray worker \(cpu on Ray node (\w+) .*\) died: .*; trying it "
                     rf"again \(resuming run {run_id}\)", driver.output)
    assert died, driver.output[-6000:]

    children = _children(server.uri, tmp_path.name)
    assert sorted(runs[0].info.run_name for runs in children.values()) == sorted(["gn2-s1", "in-s1"])
    for config_hash, runs in children.items():
        assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
        _check_complete(server.uri, runs[0], epochs=3)
    resumed = MlflowClient(server.uri).get_run(run_id)
    assert resumed.info.status == "FINISHED"
    reason = resumed.data.tags["normlab.resumed"]  # why it had stopped: the FAILED attempt's reason
    assert re.match(r"after epoch \d \(it had ended failed: its Ray worker \(cpu on Ray node \w+ .*\) died", reason), \
        reason
    assert _node_of(resumed) != died.group(1)  # finished on the node that is left
