"""Sweeps: the grid, the claim and liveness rules, and real sweeps as a user runs them:
subprocesses on a temporary sqlite store and against a real `mlflow server`, killed with
real signals and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from normlab import sweep_tracking as st
from normlab.cli import main
from normlab.models import ConfigError
from normlab.sweep import Grid, job_environment, shard
from normlab.train import TrainConfig
from tests.conftest import cli_env, run_cli
from tests.mlflow_server import MlflowServer

# one thread per training process: on a shared 2-core machine, oversubscribed threads
# make a 1,000-image epoch take 20-30 s instead of 4 s
FAST = {"OMP_NUM_THREADS": "1"}
SMALL = ("--norms", "bn,ln", "--seeds", "2", "--epochs", "1")
SMALL_GRID = Grid(norms=("bn", "ln"), seeds=(1, 2), epochs=1)
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


# -- the grid -----------------------------------------------------------------------------

def test_default_grid_is_the_classic_study():
    configs = Grid().validate()
    assert [(c.norm, c.l1, c.epochs, c.dataset) for c in configs] == [
        ("bn", 1e-5, 20, "mnist"), ("ln", 0.0, 20, "mnist"), ("gn", 0.0, 20, "mnist")]


def test_grid_axes_l1_everywhere_groups_only_for_gn():
    grid = Grid(norms=("bn", "gn"), l1_on=("bn", "gn"), groups=(1, 2, 5), batch_sizes=(32, 128), seeds=(1, 2))
    configs = grid.validate()
    assert len(configs) == (1 + 3) * 2 * 2
    assert {c.l1 for c in configs} == {1e-5}
    assert sorted({c.groups for c in configs if c.norm == "gn"}) == [1, 2, 5]
    assert len({c.config_hash() for c in configs}) == len(configs)
    # the same grid typed in another order is the same sweep (finds the same parent)
    assert Grid(norms=("gn", "bn"), l1_on=("bn", "gn"), groups=(5, 2, 1), batch_sizes=(128, 32),
                seeds=(2, 1)).sweep_hash() == grid.sweep_hash()
    assert Grid(norms=("bn", "gn"), seeds=(1, 2, 3)).sweep_hash() != grid.sweep_hash()


@pytest.mark.parametrize("grid, message", [
    (Grid(norms=("bn", "xn")), "unknown norm 'xn'; valid choices: bn, ln, gn, in, none"),
    (Grid(norms=("gn",), groups=(3,)), "child gn3-s1: "),
    (Grid(batch_sizes=(0,)), "--batch-size must be positive"),
    (Grid(seeds=()), "--seeds is empty"),
    (Grid(norms=("ln", "ln")), "--norms repeats a value"),
    (Grid(l1_on=("nb",)), "unknown norm 'nb'"),
])
def test_bad_grids_fail_with_the_reason(grid, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        grid.validate()


def test_shards_split_the_grid_exactly():
    configs = Grid(norms=("bn", "ln", "gn"), seeds=(1, 2, 3, 4)).configs()
    for n in (1, 2, 5, 12, 13):
        shares = [shard(configs, k, n) for k in range(1, n + 1)]
        flat = [c for s in shares for c in s]
        assert sorted(c.config_hash() for c in flat) == sorted(c.config_hash() for c in configs)
        assert len(flat) == len(configs)  # disjoint
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ConfigError, match="1 <= K <= N"):
        shard(configs, 0, 2)


def test_jobs_get_one_gpu_each_or_a_share_of_the_cpu_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [job_environment(s, 2, "auto", ["0", "1"], 16) for s in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert job_environment(5, 8, "cuda", ["2", "3", "6"], 16) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert job_environment(0, 1, "auto", ["0"], 16) == {}  # one GPU: nothing to split
    assert job_environment(1, 4, "cpu", [], 16) == {"OMP_NUM_THREADS": "4"}
    assert job_environment(1, 4, "cpu", [], 2) == {"OMP_NUM_THREADS": "1"}


def test_cli_rejects_bad_options_before_creating_anything(tmp_path, tracking_uri):
    runner = CliRunner()
    for args, message in [
        (("--shard", "3/2"), "need 1 <= K <= N"),
        (("--shard", "2"), "expected K/N"),
        (("--seeds", "two"), "give a count"),
        (("--batch-sizes", "32,x"), "comma-separated list of ints"),
        (("--norms", "bn,gn", "--groups", "3"), "child gn3-s1"),
    ]:
        result = runner.invoke(main, ["sweep", *args, "--data-dir", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert message in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_batch_size_figure_has_a_line_per_norm_over_batch_sizes():
    import pandas as pd

    from normlab import plots

    rows = []
    for norm, l1 in (("bn", 1e-5), ("gn", 0.0)):
        for batch in (2, 8, 128):
            for seed in (1, 2, 3):
                for epoch in (1, 2):  # only the last epoch counts
                    value = 50.0 if epoch == 1 else 90 + seed + (batch / 64 if norm == "bn" else 0)
                    rows.append(dict(run_id=f"{norm}{batch}-{seed}", variant=f"{norm.upper()}, batch {batch}",
                                     norm=norm, groups=2 if norm == "gn" else None, l1=l1, batch_size=batch, seed=seed,
                                     metric="test_acc", epoch=epoch, value=value))
    figure = plots.batch_size_figure(pd.DataFrame(rows))
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["BN + L1 (1e-05) (3 seeds)", "GN (2 groups) (3 seeds)"]
    means = {bars.get_label(): bars.lines[0].get_ydata() for bars in ax.containers}
    assert [list(bars.lines[0].get_xdata()) for bars in ax.containers] == [[2, 8, 128]] * 2
    assert list(means["GN (2 groups) (3 seeds)"]) == [92.0, 92.0, 92.0]
    assert list(means["BN + L1 (1e-05) (3 seeds)"]) == pytest.approx([92 + 2 / 64, 92 + 8 / 64, 94.0])


# -- the rules that decide what a worker does -----------------------------------------------

def child(status, attempt=1, **tags) -> st.Child:
    return st.Child(f"run{attempt}", "h", attempt, status, start_time=100.0,
                    end_time=None if status == "RUNNING" else 150.0, tags=tags)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_config_state_rules():
    now, here, me = 1000.0, "this-host", st.Worker("this-host", os.getpid(), "t")
    state = lambda claims, children, **kw: st.config_state(  # noqa: E731
        claims, children, commit=kw.get("commit", "abc"), now=now, started_at=kw.get("started_at", 500.0), host=here)
    claim1 = [st.Claim(1, me, 90.0)]
    assert state([], []).kind == st.OPEN and state([], []).next_attempt == 1
    assert state(claim1, [child("FINISHED", git_commit="abc")]).kind == st.DONE
    # finished with other code: trained again, as attempt 2
    assert (state(claim1, [child("FINISHED", git_commit="old")]).kind, state(
        claim1, [child("FINISHED", git_commit="old")]).next_attempt) == (st.OPEN, 2)
    # running under a live local worker: someone is on it
    assert state(claim1, [child("RUNNING", sweep_worker=str(me))]).kind == st.ACTIVE
    # running, but its worker and its training process are gone
    gone = st.Worker(here, dead_pid(), "t")
    assert state(claim1, [child("RUNNING", sweep_worker=str(gone), sweep_child_pid=str(dead_pid()))]).kind == st.DEAD
    # another host: the heartbeat decides
    far = str(st.Worker("other-host", 1, "t"))
    assert state(claim1, [child("RUNNING", sweep_worker=far, sweep_heartbeat=str(now - 10))]).kind == st.ACTIVE
    assert state(claim1, [child("RUNNING", sweep_worker=far,
                                sweep_heartbeat=str(now - st.STALE_S - 1))]).kind == st.DEAD
    # failed before this sweep started: retried; failed during it: reported, not looped on
    assert state(claim1, [child("FAILED", sweep_outcome="error")], started_at=120.0).kind == st.FAILED
    assert state(claim1, [child("FAILED", sweep_outcome="error")], started_at=200.0).kind == st.OPEN
    assert state(claim1, [child("FAILED", sweep_outcome="abandoned")], started_at=120.0).kind == st.OPEN
    assert state(claim1, [child("KILLED", sweep_outcome="interrupted")], started_at=120.0).kind == st.OPEN
    # claimed but the claimer died before creating the run
    assert state([st.Claim(1, gone, now - 5)], []).next_attempt == 2
    assert state([st.Claim(1, me, now - 5)], []).kind == st.ACTIVE


def test_claims_and_parent_election_are_atomic_in_the_store(tracking_uri):
    store_a = st.SweepStore("claims", "cafe00000001")
    parent, resumed = store_a.open_parent("sweep-test", {"norms": "bn"})
    assert not resumed
    config = TrainConfig(norm="ln")
    a, b = st.Worker("h", 1, "a"), st.Worker("h", 2, "b")
    assert store_a.claim(config, 1, a) is True
    assert store_a.claim(config, 1, b) is False  # the param exists with another owner
    assert store_a.claim(config, 2, b) is True  # the next attempt is a new claim
    # a second worker on the same grid elects the same parent, even from its own candidate
    store_b = st.SweepStore("claims", "cafe00000001")
    own = store_b.client.create_run(store_b.experiment_id).info.run_id
    assert store_b._elect(own) == parent
    assert store_b.open_parent("sweep-test", {"norms": "bn"}) == (parent, True)


def test_workers_opening_a_new_sweep_at_once_agree_on_one_parent(tracking_uri):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    st.SweepStore("race", "beef00000002")  # the experiment exists; the parent does not
    barrier = Barrier(4)

    def open_parent(_):
        store = st.SweepStore("race", "beef00000002")
        barrier.wait()
        return store.open_parent("sweep-race", {"norms": "ln"})[0]
    with ThreadPoolExecutor(4) as pool:
        parents = list(pool.map(open_parent, range(4)))
    assert len(set(parents)) == 1
    client = MlflowClient()
    active = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert [r.info.run_id for r in active] == parents[:1]  # the losers' candidates are deleted


# -- real sweeps --------------------------------------------------------------------------

def sweep_runs(client: MlflowClient, experiment: str = "normlab"):
    """(parents, children) of every sweep in the experiment, children keyed by run id."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(st.SWEEP_ROLE) == "parent"]
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return parents, children


def assert_complete_history(client: MlflowClient, run_id: str, epochs: int) -> None:
    for metric in METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert steps == list(range(1, epochs + 1)), (run_id, metric, steps)


def assert_one_finished_child_per_config(client, grid: Grid, children: dict) -> dict[str, str]:
    """Every config has exactly one FINISHED child with a complete history; hash -> run id."""
    finished = {}
    for config in grid.configs():
        mine = [r for r in children.values() if r.data.tags[st.CONFIG_HASH] == config.config_hash()
                and r.info.status == "FINISHED"]
        assert len(mine) == 1, (config.run_name, [r.info.status for r in mine])
        run = mine[0]
        assert run.data.tags["mlflow.runName"] == config.run_name
        assert run.data.params["norm"] == config.norm and int(run.data.params["seed"]) == config.seed
        assert_complete_history(client, run.info.run_id, config.epochs)
        finished[config.config_hash()] = run.info.run_id
    return finished


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_sweep_killed_then_interrupted_resumes_and_then_has_nothing_to_do(tmp_path, tracking_uri, small_mnist_dir):
    args = ("sweep", *SMALL, "--data-dir", str(small_mnist_dir))
    client = MlflowClient()
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "normlab", *args], cwd=tmp_path, env=cli_env(**FAST),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def one_done_one_training():
            if client.get_experiment_by_name("normlab") is None:
                return None
            _, children = sweep_runs(client)
            done = [r for r in children.values() if r.info.status == "FINISHED"]
            training = [r for r in children.values() if r.info.status == "RUNNING" and st.CHILD_PID in r.data.tags]
            return (done, training) if done and training else None
        done, training = wait_for(one_done_one_training, 400, "a finished and a training child")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its training process, no cleanup
        first.wait()
        log.close()
    killed = training[0].info.run_id
    assert client.get_run(killed).info.status == "RUNNING"  # left dangling by the kill

    # Ctrl-C or a scheduler's SIGTERM to the sweep alone: it stops its child and marks it KILLED
    second = subprocess.Popen([sys.executable, "-m", "normlab", *args], cwd=tmp_path, env=cli_env(**FAST),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def retrying():
        _, children = sweep_runs(client)
        return [r for r in children.values() if r.info.status == "RUNNING" and st.CHILD_PID in r.data.tags
                and r.info.run_id != killed]
    interrupted = wait_for(retrying, 300, "the sweep to retrain the killed child")[0]
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 130, out + err
    assert "left RUNNING by a dead worker" in out and "run the same command again to resume" in err
    assert not st.pid_alive(int(interrupted.data.tags[st.CHILD_PID]))
    stopped = client.get_run(interrupted.info.run_id)
    assert (stopped.info.status, stopped.data.tags[st.OUTCOME]) == ("KILLED", "interrupted")

    third = run_cli(*args, cwd=tmp_path, **FAST)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "database is locked" not in third.stdout + third.stderr
    parents, children = sweep_runs(client)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[st.SWEEP_HASH] == SMALL_GRID.sweep_hash()
    assert parent.data.params["norms"] == "bn,ln" and parent.data.params["children"] == "4"
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(killed).data.tags[st.OUTCOME] == "abandoned"
    finished = assert_one_finished_child_per_config(client, SMALL_GRID, children)
    assert finished[done[0].data.tags[st.CONFIG_HASH]] == done[0].info.run_id  # not trained again
    assert len(children) == 6  # 4 configs + the attempts killed with SIGKILL and with SIGTERM
    for run in children.values():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id == tags[st.SWEEP_PARENT]
        assert tags[st.SWEEP_HASH] == SMALL_GRID.sweep_hash()
    for config in SMALL_GRID.configs():  # the hash the child logged itself is the sweep's
        assert client.get_run(finished[config.config_hash()]).data.tags["config_hash"] == config.config_hash()
    assert SMALL_GRID.configs()[0].l1 == 1e-5 and children[finished[SMALL_GRID.configs()[0].config_hash()]] \
        .data.params["l1"] == "1e-05"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/results.csv", "comparison/test_accuracy.png"} <= artifacts, artifacts
    compared = client.get_run(parent.info.run_id).data.tags["compared_run_ids"]
    assert sorted(compared.split(",")) == sorted(finished.values())

    before = {r.info.run_id: r.info.start_time for r in children.values()}
    fourth = run_cli(*args, cwd=tmp_path, **FAST)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert "(existing: resuming or joining it)" in fourth.stdout and "0 trained now" in fourth.stdout
    assert "comparison: already logged" in fourth.stdout
    _, children = sweep_runs(client)
    assert {r.info.run_id: r.info.start_time for r in children.values()} == before


def test_a_failing_child_is_reported_and_the_others_finish(tmp_path, tracking_uri, small_mnist_dir):
    """--jobs 2 on sqlite; one training process is killed (as the OOM killer would)."""
    grid = Grid(norms=("bn", "ln"), epochs=1)
    args = ("sweep", "--norms", "bn,ln", "--epochs", "1", "--jobs", "2", "--data-dir", str(small_mnist_dir))
    client = MlflowClient()
    sweep = subprocess.Popen([sys.executable, "-m", "normlab", *args], cwd=tmp_path, env=cli_env(**FAST),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ln_hash = grid.configs()[1].config_hash()

    def ln_child_pid():
        if client.get_experiment_by_name("normlab") is None:
            return None
        _, children = sweep_runs(client)
        pids = [r.data.tags.get(st.CHILD_PID) for r in children.values() if r.data.tags[st.CONFIG_HASH] == ln_hash]
        return int(pids[0]) if pids and pids[0] else None
    os.kill(wait_for(ln_child_pid, 300, "the ln child to start"), signal.SIGKILL)
    out, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 1, out + err
    assert "1 children failed" in err and "ln-s1" in err and "killed by signal SIGKILL" in err
    assert "database is locked" not in out + err
    parents, children = sweep_runs(client)
    assert parents[0].info.status == "FAILED"
    by_config = {r.data.tags[st.CONFIG_HASH]: r for r in children.values()}
    assert by_config[ln_hash].info.status == "FAILED"
    assert by_config[ln_hash].data.tags[st.OUTCOME] == "error"
    assert "SIGKILL" in by_config[ln_hash].data.tags[st.ERROR]
    bn = by_config[grid.configs()[0].config_hash()]
    assert bn.info.status == "FINISHED"
    assert_complete_history(client, bn.info.run_id, 1)


def test_children_side_by_side_in_one_process_train_what_normlab_train_trains(
        tmp_path, tracking_uri, small_mnist_dir):
    """--side-by-side 3 (the GPU default) on the CPU: one process, one thread per child."""
    grid = Grid(norms=("bn", "ln", "gn"), epochs=2)
    sweep = run_cli("sweep", "--norms", "bn,ln,gn", "--epochs", "2", "--side-by-side", "3",
                    "--data-dir", str(small_mnist_dir), cwd=tmp_path, **FAST)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert sweep.stdout.count("side by side in process") == 3
    client = MlflowClient()
    parents, children = sweep_runs(client)
    finished = assert_one_finished_child_per_config(client, grid, children)
    assert len({children[r].data.tags[st.CHILD_PID] for r in finished.values()}) == 1
    assert parents[0].info.status == "FINISHED"
    ln = grid.configs()[1]
    alone = run_cli("train", "--norm", "ln", "--epochs", "2", "--data-dir", str(small_mnist_dir),
                    "--experiment", "alone", cwd=tmp_path, **FAST)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    alone_id = client.search_runs([client.get_experiment_by_name("alone").experiment_id])[0].info.run_id
    for metric in METRICS:
        side = [m.value for m in client.get_metric_history(finished[ln.config_hash()], metric)]
        assert side == [m.value for m in client.get_metric_history(alone_id, metric)], metric
    artifacts = {a.path for a in client.list_artifacts(finished[ln.config_hash()])}
    assert {"misclassified.png", "model_summary.txt", "checkpoint"} <= artifacts, artifacts


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and a served artifact root."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        import mlflow

        mlflow.set_tracking_uri(server.uri)
        yield server.uri
        mlflow.set_tracking_uri(None)
    finally:
        server.stop()


def test_two_sweeps_with_two_jobs_on_a_tracking_server_train_each_child_once(
        tmp_path, mlflow_server, small_mnist_dir):
    """The batch-size study's shape (2 norms x 2 batch sizes), so its figure is checked too."""
    grid = Grid(norms=("bn", "ln"), batch_sizes=(50, 100), epochs=1)
    args = ("sweep", "--norms", "bn,ln", "--batch-sizes", "50,100", "--epochs", "1", "--jobs", "2",
            "--data-dir", str(small_mnist_dir))
    workers = [subprocess.Popen([sys.executable, "-m", "normlab", *args], cwd=tmp_path,
                                env=cli_env(MLFLOW_TRACKING_URI=mlflow_server, **FAST),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, out + err
        assert "database is locked" not in out + err
    client = MlflowClient(mlflow_server)
    parents, children = sweep_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4  # each config trained exactly once, across both workers
    assert {r.data.tags[st.ATTEMPT] for r in children.values()} == {"1"}
    assert_one_finished_child_per_config(client, grid, children)
    trained = [int(out.split(" trained now")[0].rsplit("sweep: ", 1)[1]) for out, _ in outputs]
    assert sum(trained) == 4, trained
    assert sum("comparison: logged" in out for out, _ in outputs) == 1
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "comparison")}
    assert {"comparison/results.csv", "comparison/batch_size.png"} <= artifacts, artifacts
