"""The engine's host-free training step trains exactly what the plain PyTorch loop trains.

CUDA graph capture itself needs a GPU (benchmarks/speed.py exercises it there); what it
relies on is checked here on the CPU: the step over static buffers, the undone warm-up,
and momentum buffers that stay the optimizer's own state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from normlab.engine.data import DeviceData, batch_slices, load_raw
from normlab.engine.fast import Speedups
from normlab.engine.fast.chunked_steps import EpochSteps
from normlab.engine.models import Net
from normlab.engine.rng import RunRNG, data_seed
from normlab.engine.step import TrainStep, run_and_undo
from normlab.engine.config import TrainConfig
from normlab.engine.train import Callbacks, Trainer, TrainingStopped, evaluate
from tests.conftest import ROOT
from tests.mnist_fixture import write_mnist


@pytest.fixture(scope="module")
def tiny_mnist_dir(tmp_path_factory):
    """200 real training digits, 100 test: a few steps per epoch keep these tests fast."""
    return write_mnist(tmp_path_factory.mktemp("mnist-tiny"), train=200, test=100)


@pytest.fixture(scope="module")
def data(tiny_mnist_dir) -> DeviceData:
    return DeviceData(load_raw("mnist", tiny_mnist_dir, download=False), "cpu")


def plain_epochs(config: TrainConfig, data: DeviceData,
                 channels_last: bool = False) -> tuple[list[tuple[float, float, float]], Net]:
    """The textbook loop: backward, torch.optim.SGD.step, OneCycleLR.step, .item() per step;
    the model in channels-last memory order if asked (as the engine's, Speedups.channels_last)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(data_seed(config.seed))
    model = Net(config.dataset, config.norm, config.groups, config.dropout)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    steps = -(-data.train_size // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                    steps_per_epoch=steps, pct_start=0.2, cycle_momentum=False)
    history = []
    for _ in range(config.epochs):
        model.train()
        x, y = data.training_epoch(generator)
        loss_sum = 0.0
        for s in batch_slices(len(y), config.batch_size):
            nll = F.nll_loss(model(x[s]), y[s])
            loss = nll + config.l1 * sum(p.abs().sum() for p in params) if config.l1 else nll
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += nll.item() * (s.stop - s.start)
        ev = evaluate(model, data.test_x, data.test_y)
        history.append((loss_sum / len(y), ev.loss, ev.accuracy))
    return history, model


@pytest.mark.parametrize("norm,l1", [("bn", 1e-4), ("gn", 0.0)])
def test_engine_trains_what_the_plain_loop_trains(data, norm, l1, one_thread):
    config = TrainConfig(norm=norm, l1=l1, epochs=2, batch_size=48, seed=1)  # 200 = 4 x 48 + 8: a short last batch
    trainer = Trainer(config, data)  # the CPU defaults: channels last for GN, not for BN
    assert trainer.speedups.channels_last == (norm == "gn")
    expected, plain_model = plain_epochs(config, data, trainer.speedups.channels_last)
    records = [trainer.run_epoch(Callbacks()) for _ in range(config.epochs)]
    for record, (train_loss, test_loss, test_acc) in zip(records, expected):
        assert record.train_loss == pytest.approx(train_loss, rel=1e-4)
        assert record.test_loss == pytest.approx(test_loss, rel=1e-4)
        assert abs(record.test_acc - test_acc) <= 1.0  # at most one of 100 test digits flips
    # Float rounding differs (sign(w) for d|w|/dw, foreach updates); where that flips one ReLU
    # or max-pool tie, the runs part: by up to ~1e-3 in a few weights and 1.4e-4 in the losses
    # (seed 3, GN, one thread), 3e-2 and 1.4e-3 (seed 2, BN, two threads). So the thread count
    # is fixed and the seed is one without a flip: 1e-7 apart with either count (seed 4, clean
    # before, flipped under torch 2.14.1: 5e-4 in BN's train loss; seeds 1, 5, 7 and 8 are clean
    # for both norms there). A wrong update rule moves the weights by far more.
    for ours, theirs in zip(trainer.model.state_dict().values(), plain_model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=2e-3)


def test_every_step_trains_with_the_momentum_the_run_logs_and_the_lr_alone_is_cycled(data):
    """What train_epoch hands each step is the optimizer group's lr and momentum between two
    steps of the schedule: the lr rises to --lr and falls, the momentum stays config.momentum
    (torch's OneCycleLR default trained 0.95 -> 0.85 -> 0.95 under a logged 0.9)."""
    config = TrainConfig(norm="bn", epochs=3, batch_size=50)
    trainer = Trainer(config, data)
    group = trainer.optimizer.param_groups[0]
    rates = []
    for _ in range(config.epochs * trainer.steps_per_epoch):
        rates.append((group["lr"], group["momentum"]))
        trainer.scheduler.step()
    lrs, momenta = zip(*rates)
    assert set(momenta) == {config.momentum} and config.momentum == 0.9
    assert max(lrs) == pytest.approx(config.lr, rel=0.02) and lrs[0] < config.lr / 20 and lrs[-1] < config.lr / 1000


def test_shuffling_and_augmentation_draw_from_a_stream_of_their_own(data):
    """The data stream and the weights' and dropout's stream both come from --seed, but not
    as the same numbers: seeded with the seed itself, epoch 1's rotation angles were the
    kaiming-uniform draws of the weights, 999 draws along (after the shuffle's). No three
    consecutive draws of one appear in the first 20,000 of the other, for five seeds."""
    for seed in range(1, 6):
        trainer = Trainer(TrainConfig(norm="bn", seed=seed), data)
        data_stream, weight_stream = torch.Generator(), torch.Generator()
        data_stream.set_state(trainer.generator.get_state())  # as the run starts: no epoch drawn yet
        weight_stream.set_state(RunRNG(seed, torch.device("cpu")).cpu)  # what the weights were drawn from
        data_draws = torch.rand(2000, generator=data_stream).tolist()
        weight_draws = torch.rand(20000, generator=weight_stream).tolist()
        runs_of_three = set(zip(weight_draws, weight_draws[1:], weight_draws[2:]))
        assert not runs_of_three & set(zip(data_draws, data_draws[1:], data_draws[2:])), seed
    assert len({data_seed(seed) for seed in range(1000)} | set(range(1000))) == 2000  # distinct, and not seeds


@pytest.mark.parametrize("norm", ["ln", "gn", "none"])
def test_channels_last_trains_what_channels_first_trains_to_float_rounding(data, norm):
    """Speedups.channels_last (on by default on the CPU for these) changes only the memory
    order, so the convolutions' rounding: the same run in the default channels-first order
    ends its epochs with the same losses to 3e-3 and weights as close as a flipped ReLU tie
    allows (test_engine_trains_what_the_plain_loop_trains). How close depends on the seed and
    torch's thread count: over seeds 1-6 with one and two threads, the largest differences
    were 2e-3 in a loss, 3 of 100 test digits and 0.0033 in a weight (most seeds agree to
    1e-7); a wrong memory order would already change the losses."""
    config = TrainConfig(norm=norm, epochs=2, batch_size=48, seed=3)
    last = Trainer(config, data)
    first = Trainer(config, data, speedups=replace(last.speedups, channels_last=False))
    assert last.speedups.channels_last and last.model.conv2[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert first.model.conv2[0].weight.is_contiguous()
    for _ in range(config.epochs):
        ours, theirs = last.run_epoch(Callbacks()), first.run_epoch(Callbacks())
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=3e-3)
        assert ours.test_loss == pytest.approx(theirs.test_loss, rel=3e-3)
        assert abs(ours.test_acc - theirs.test_acc) <= 3.0  # 3 of 100 digits: 10 steps leave many near a tie
    for ours, theirs in zip(last.model.state_dict().values(), first.model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=5e-3)


def test_channels_last_is_on_by_default_only_on_the_cpu_for_the_models_it_measured_faster_for():
    """CHANNELS_LAST_ON_CPU: the study's LN and GN (2 groups) on MNIST, not BN (its CPU
    kernels lose what the convolutions gain) nor IN; CIFAR-10's BN; never on a GPU (the
    Triton convolutions read channels first)."""
    def default(device: str, **fields) -> bool:
        return Speedups.default(torch.device(device), 0, TrainConfig(**fields)).channels_last

    assert [default("cpu", norm=n) for n in ("bn", "ln", "gn", "in", "none")] == [False, True, True, False, True]
    assert default("cpu", norm="bn", dataset="cifar10") and not default("cpu", norm="gn", groups=8, dataset="cifar10")
    assert not any(default("cuda", norm=n, dataset=d) for n in ("bn", "ln", "gn", "none") for d in ("mnist", "cifar10"))
    assert not Speedups.default(torch.device("cpu")).channels_last  # no config: the plain order


class StopAfter(Callbacks):
    """Asks the trainer to stop once ``steps`` steps are reported done."""

    def __init__(self, trainer: Trainer, steps: int):
        self.trainer, self.steps, self.done = trainer, steps, 0

    def step_done(self) -> None:
        self.done += 1
        if self.done == self.steps:
            self.trainer.request_stop("asked to")


def test_steps_launched_in_chunks_train_what_single_steps_train_and_stop_at_a_chunk_end(data):
    """The GPU default launches 8 steps at a time (one CUDA graph each), their rates taken
    from the schedule a chunk ahead. The same chunking on the CPU trains, bit for bit, what
    one step at a time trains; a stop asked for inside a chunk takes effect at its end."""
    config = TrainConfig(norm="bn", l1=1e-4, epochs=2, batch_size=48, seed=3)  # 5 steps: 4 x 48 + 8
    single = Trainer(config, data, speedups=Speedups(chunk_steps=1))
    chunked = Trainer(config, data, speedups=Speedups(chunk_steps=3))
    for _ in range(config.epochs):
        assert chunked.run_epoch(Callbacks()).metrics() == single.run_epoch(Callbacks()).metrics()
    for a, b in zip(chunked.model.state_dict().values(), single.model.state_dict().values()):
        assert torch.equal(a, b)
    assert chunked.scheduler.state_dict() == single.scheduler.state_dict()
    assert chunked.optimizer.param_groups[0]["lr"] == single.optimizer.param_groups[0]["lr"]

    for trainer, stopped_after in ((Trainer(config, data, speedups=Speedups(chunk_steps=3)), 3),
                                   (Trainer(config, data, speedups=Speedups(chunk_steps=1)), 2)):
        with pytest.raises(TrainingStopped, match=f"stopped after step {stopped_after} of 5 in epoch 1; 0 epochs"):
            trainer.run_epoch(StopAfter(trainer, 2))
        assert trainer.scheduler.last_epoch == stopped_after  # the schedule went no further


def test_the_gpu_default_launches_8_steps_a_graph_with_a_short_switch_interval_which_a_trainer_sets(data):
    """The two go together (Speedups' comment has the measurements); the interval is the
    process's, set by the trainer that asks for it, and a CPU trainer leaves it alone."""
    on_gpu, on_cpu = Speedups.default(torch.device("cuda")), Speedups.default(torch.device("cpu"))
    assert (on_gpu.chunk_steps, on_gpu.switch_interval) == (8, 0.0005)
    assert (on_cpu.chunk_steps, on_cpu.switch_interval) == (1, None)
    before = sys.getswitchinterval()
    try:
        Trainer(TrainConfig(epochs=1), data, speedups=Speedups(switch_interval=0.002))
        assert sys.getswitchinterval() == pytest.approx(0.002)
        Trainer(TrainConfig(epochs=1), data)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_a_gpu_compiles_a_variants_steps_from_200_epochs_of_it_unless_told(monkeypatch):
    """The compile rule (Speedups.default, COMPILE_PAYS_FROM_EPOCHS) that makes the classic
    10-seed study (200 epochs of each variant) train compiled steps and a 5-seed study (100)
    uncompiled ones with the Triton norms, which round otherwise: NORMLAB_COMPILE fixes it."""
    from normlab.engine.fast import COMPILE_PAYS_FROM_EPOCHS

    def compiled(device: str, epochs_ahead: int) -> tuple[bool, bool]:
        speedups = Speedups.default(torch.device(device), epochs_ahead)
        return speedups.compile, speedups.triton_norms

    assert COMPILE_PAYS_FROM_EPOCHS == 200
    assert [compiled("cuda", e) for e in (20, 100, 199, 200, 400)] == [(False, True)] * 3 + [(True, False)] * 2
    assert compiled("cpu", 400) == (False, False)
    monkeypatch.setenv("NORMLAB_COMPILE", "always")
    assert compiled("cuda", 20) == (True, False) and compiled("cpu", 20) == (False, False)
    monkeypatch.setenv("NORMLAB_COMPILE", "never")
    assert compiled("cuda", 400) == (False, True)


def test_a_chunk_is_launched_whole():
    steps = EpochSteps(make_step(), [slice(i, i + 8) for i in range(0, 40, 8)], chunk=2)
    with pytest.raises(ValueError, match="not one chunk of 2"):
        steps.run(1, [(0.05, 0.9)])
    with pytest.raises(ValueError, match="not one chunk of 2"):
        steps.run(0, [(0.05, 0.9)] * 3)


def make_step(seed: int = 0, l1: float = 1e-3) -> TrainStep:
    torch.manual_seed(seed)
    model = Net("mnist", "bn").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return TrainStep(model, optimizer, l1, RunRNG(seed, torch.device("cpu")))


RATES = torch.tensor([0.05, 0.9])  # (learning rate, momentum)


def reseed(step: TrainStep, seed: int) -> None:
    """The step's next dropout masks are what torch.manual_seed(seed) would draw."""
    step.rng = RunRNG(seed, torch.device("cpu"))


def batch(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def weights(step: TrainStep) -> list[torch.Tensor]:
    return [t.clone() for t in (*step.model.state_dict().values(), *step.buffers, step.loss_sum, step.correct)]


def test_step_equals_torch_sgd_with_l1_as_rates_change():
    """TrainStep = autograd + torch.optim.SGD on the same batches, as OneCycleLR moves
    the learning rate and the momentum between steps."""
    ours, ref = make_step(), make_step()
    params = list(ref.model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for seed, lr, momentum in ((1, 0.002, 0.95), (2, 0.05, 0.85), (3, 0.03, 0.9)):
        x, y = batch(seed)
        optimizer.param_groups[0].update(lr=lr, momentum=momentum)
        reseed(ours, 10 + seed)  # same dropout masks for both
        ours(x, y, torch.tensor([lr, momentum]))
        torch.manual_seed(10 + seed)
        loss = F.nll_loss(ref.model(x), y) + 1e-3 * sum(p.abs().sum() for p in params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for a, b in zip(ours.model.state_dict().values(), ref.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for p, buf in zip(ours.params, ours.buffers):
        assert ours.optimizer.state[p]["momentum_buffer"] is buf
    for p_ours, p_ref in zip(ours.params, params):
        torch.testing.assert_close(ours.optimizer.state[p_ours]["momentum_buffer"],
                                   optimizer.state[p_ref]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_step_on_static_buffers_equals_step_on_slices():
    """What the graph does (copy the batch into fixed tensors, step on them) changes nothing."""
    direct, buffered = make_step(), make_step()
    static_x, static_y = torch.zeros(64, 1, 28, 28), torch.zeros(64, dtype=torch.int64)
    for seed in (1, 2, 3):
        x, y = batch(seed)
        reseed(direct, seed)
        direct(x, y, RATES)
        static_x.copy_(x)
        static_y.copy_(y)
        reseed(buffered, seed)
        buffered(static_x, static_y, RATES)
    for a, b in zip(weights(direct), weights(buffered)):
        assert torch.equal(a, b)


def test_warm_up_before_capture_is_undone_bit_for_bit():
    warmed, fresh = make_step(), make_step()
    x, y = batch(1)
    reseed(warmed, 5)
    before = weights(warmed)
    with warmed.rng.active():  # as EpochSteps' capture runs it
        run_and_undo(warmed, x, y, RATES, steps=3)
    for a, b in zip(before, weights(warmed)):
        assert torch.equal(a, b)
    warmed(x, y, RATES)  # the RNG was put back too: same dropout masks as a step with no warm-up
    reseed(fresh, 5)
    fresh(x, y, RATES)
    for a, b in zip(weights(warmed), weights(fresh)):
        assert torch.equal(a, b)


def test_momentum_loaded_into_the_optimizer_is_adopted():
    """A checkpoint's optimizer state (load_state_dict makes new tensors) drives the next step."""
    trained = make_step()
    trained(*batch(1), RATES)
    resumed = make_step()
    resumed.model.load_state_dict(trained.model.state_dict())
    resumed.optimizer.load_state_dict(trained.optimizer.state_dict())
    resumed.start_epoch()
    for a, b in zip(resumed.buffers, trained.buffers):
        assert torch.equal(a, b)
    x, y = batch(2)
    reseed(trained, 7)
    trained(x, y, RATES)
    reseed(resumed, 7)
    resumed(x, y, RATES)
    for a, b in zip(resumed.model.state_dict().values(), trained.model.state_dict().values()):
        assert torch.equal(a, b)


def test_graphs_refuse_a_cpu_model_and_unsupported_sgd_settings():
    with pytest.raises(ValueError, match="CUDA device"):
        EpochSteps(make_step(), [slice(0, 64)], chunk=8, graphed=True)
    model = Net("mnist", "bn")
    with pytest.raises(ValueError, match="nesterov"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), 0.0,
                  RunRNG(0, torch.device("cpu")))


COMPILED_EPOCH = """
import json, sys, torch
from normlab.engine.config import TrainConfig
from normlab.engine.data import DeviceData, load_raw
from normlab.engine.fast import Speedups
from normlab.engine.train import Callbacks, Trainer
data = DeviceData(load_raw("mnist", sys.argv[1], download=False), torch.device("cpu"))
trainer = Trainer(TrainConfig(**json.loads(sys.argv[2])), data, speedups=Speedups(compile=True))
record = trainer.run_epoch(Callbacks())
files = {f.__name__: [c.loads, c.saves] for f, c in trainer.train_step.compiled_versions.items()}
print(json.dumps({"metrics": record.metrics(), "files": files}))
"""


def test_compiled_step_trains_what_the_eager_step_trains_and_a_later_process_loads_it(data, tiny_mnist_dir,
                                                                                      one_thread):
    """The GPU default compiles the step; the same logic on the CPU trains the same epoch
    (no dropout: Inductor draws its own random numbers for it, and the CPU's own dropout
    breaks Dynamo's graph). prepare() compiles it before the epoch with a warm-up step that it
    undoes, and keeps both functions on disk whole (engine/fast/precompiled.py): a new process
    loads them instead of compiling, and trains the same epoch bit for bit."""
    config = TrainConfig(norm="ln", epochs=1, batch_size=50, seed=2, dropout=0.0)
    eager = Trainer(config, data, speedups=Speedups()).run_epoch(Callbacks())
    trainer = Trainer(config, data, speedups=Speedups(compile=True))
    assert trainer.prepare() > 0
    compiled = trainer.run_epoch(Callbacks())
    assert trainer.train_step.compiled  # it did compile
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-5)
    assert compiled.test_loss == pytest.approx(eager.test_loss, rel=1e-5)
    assert compiled.test_acc == eager.test_acc
    # one batch shape (4 batches of 50): one file per function, compiled here or by an earlier session
    assert all(c.loads + c.saves == 1 and c.fallback is None for c in trainer.train_step.compiled_versions.values())

    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    later = subprocess.run([sys.executable, "-c", COMPILED_EPOCH, str(tiny_mnist_dir), json.dumps(asdict(config))],
                           env=dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1"),  # as this one: one_thread
                           capture_output=True, text=True, timeout=600)
    assert later.returncode == 0, later.stderr[-3000:]
    loaded = json.loads(later.stdout.strip().splitlines()[-1])
    assert loaded["files"] == {"loss_and_correct": [1, 0], "sgd_update": [1, 0]}
    assert loaded["metrics"] == compiled.metrics()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_run_trains_the_same_numbers_whatever_its_compile_cache(small_mnist_dir, tmp_path):
    """Inductor would time a reduction kernel's candidate tiles at its first call and keep the
    fastest, whose order of addition then depends on the machine's load; in its deterministic
    mode (COMPILE_OPTIONS) two processes compiling at once, each on an empty cache of its
    own, train the same epochs, bit for bit; and a third process, on the first one's cache,
    loads the step that one kept (engine/fast/precompiled.py) and trains them too."""
    script = (
        "import sys, torch\n"
        "from dataclasses import replace\n"
        "from normlab.engine.config import TrainConfig\n"
        "from normlab.engine.data import DeviceData, load_raw\n"
        "from normlab.engine.fast import Speedups\n"
        "from normlab.engine.train import Callbacks, Trainer\n"
        "device = torch.device('cuda')\n"
        "data = DeviceData(load_raw('mnist', sys.argv[1], download=False), device)\n"
        "speedups = replace(Speedups.default(device), compile=True, triton_norms=False)\n"
        "trainer = Trainer(TrainConfig(norm='ln', epochs=3), data, speedups=speedups)\n"
        "for _ in range(3):\n"
        "    print(trainer.run_epoch(Callbacks()).metrics())\n"
        "print({f.__name__: c.loads for f, c in trainer.train_step.compiled_versions.items()})\n")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])

    def started(cache: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, str(small_mnist_dir)], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": path,
                                                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache)})

    processes = [started("a"), started("b")]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    later = started("a")
    outputs.append(later.communicate(timeout=600)[0])
    assert [process.returncode for process in [*processes, later]] == [0, 0, 0]
    epochs = [output.splitlines()[:3] for output in outputs]
    assert outputs[0].count("test_loss") == 3 and epochs[0] == epochs[1] == epochs[2]
    assert outputs[0].splitlines()[3] == "{'loss_and_correct': 0, 'sgd_update': 0}"
    assert outputs[2].splitlines()[3] == "{'loss_and_correct': 2, 'sgd_update': 2}"  # two batch shapes


def test_a_step_that_cannot_compile_warns_and_trains_the_model_itself(data):
    """Where Inductor cannot build its kernels (here: no C++ compiler), the run goes on
    without compiling, training exactly what the uncompiled step trains."""
    import torch._inductor.config as inductor

    config = TrainConfig(norm="gn", epochs=1, batch_size=50, seed=4)
    trainer = Trainer(config, data, speedups=Speedups(compile=True))
    # torch's own patch: pytest's monkeypatch, undoing, deletes what Inductor's config had not set
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):  # no kernels built earlier
        failed = r"torch.compile failed, so this run trains without it .*C\+\+ compiler"
        with pytest.warns(RuntimeWarning, match=failed):
            record = trainer.run_epoch(Callbacks())
    assert not trainer.train_step.compiled
    assert record.metrics() == Trainer(config, data, speedups=Speedups()).run_epoch(Callbacks()).metrics()
