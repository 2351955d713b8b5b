"""Runs trained side by side in one process train exactly what they train alone.

The CPU tests run everywhere; the CUDA ones (streams, graphs bound to each run's generator,
the CUDA RNG in checkpoints) run where a GPU is present and are skipped in CI.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from normlab.data import DeviceData, load_raw
from normlab.side_by_side import run_side_by_side
from normlab.step import Speedups
from normlab.train import Callbacks, EpochRecord, NonFiniteLoss, TrainConfig, Trainer, fit
from tests.mnist_fixture import write_mnist

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIGS = [TrainConfig(norm="bn", l1=1e-4, epochs=2, batch_size=48, seed=1),  # 300 = 6 x 48 + 12
           TrainConfig(norm="gn", epochs=2, batch_size=64, seed=2),
           TrainConfig(norm="ln", epochs=2, batch_size=48, seed=1)]


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's fastest algorithms add in a varying order: runs of one config alone differ by
    ~1e-3 in test loss after an epoch. Bit-for-bit checks need its deterministic ones; and
    no TF32, whose rounding would magnify the compiled step's tiny fusion differences."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, False, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist-sbs"), train=300, test=100)


def records(config: TrainConfig, data: DeviceData, speedups: Speedups | None = None) -> list[EpochRecord]:
    return fit(Trainer(config, data, speedups=speedups)).records


def numbers(rs: list[EpochRecord]) -> list[tuple[float, ...]]:
    return [(r.train_loss, r.train_acc, r.test_loss, r.test_acc) for r in rs]


def check_side_by_side_equals_alone(data: DeviceData) -> None:
    alone = [numbers(records(c, data)) for c in CONFIGS]
    outcomes = run_side_by_side([lambda c=c: numbers(records(c, data)) for c in CONFIGS], data.device)
    assert [o.error for o in outcomes] == [None] * len(CONFIGS)
    assert [o.value for o in outcomes] == alone  # bit for bit: no run draws another's numbers
    assert alone[0] != alone[2]  # and the check can tell runs apart


def test_side_by_side_on_the_cpu_trains_what_each_run_trains_alone(folder):
    check_side_by_side_equals_alone(DeviceData(load_raw("mnist", folder, download=False), "cpu"))


def test_a_failing_run_leaves_the_others_to_finish(folder):
    data = DeviceData(load_raw("mnist", folder, download=False), "cpu")
    diverging = TrainConfig(norm="none", epochs=2, batch_size=64, lr=1e6)
    outcomes = run_side_by_side([lambda: records(diverging, data), lambda: numbers(records(CONFIGS[1], data))],
                                data.device)
    assert isinstance(outcomes[0].error, NonFiniteLoss)
    assert outcomes[1].error is None and outcomes[1].value == numbers(records(CONFIGS[1], data))


@needs_cuda
def test_side_by_side_on_cuda_streams_trains_what_each_run_trains_alone(folder, deterministic_cudnn):
    check_side_by_side_equals_alone(DeviceData(load_raw("mnist", folder, download=False), "cuda"))


@needs_cuda
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_a_compiled_graph_step_makes_the_eager_update(folder, deterministic_cudnn, norm):
    """The GPU default's step (compiled, in a CUDA graph) updates the weights as the eager
    step does, for a full and the short last batch. One step only: rounding differs, and
    early training multiplies a difference by ~10 a step (1e-7 after one, 2e-5 after four)."""
    data = DeviceData(load_raw("mnist", folder, download=False), "cuda")
    config = TrainConfig(norm=norm, l1=1e-4, epochs=2, batch_size=48, dropout=0.0)  # 6 x 48 + 12
    x, y = data.training_epoch(torch.Generator(device="cuda").manual_seed(0))
    one_step_graphs = replace(Speedups.default(data.device), chunk_steps=1)
    assert one_step_graphs.compile and one_step_graphs.cuda_graphs and one_step_graphs.triton_convs
    for index in (0, 6):
        eager = Trainer(config, data, speedups=Speedups(triton_convs=True))
        graphed = Trainer(config, data, speedups=one_step_graphs)
        for trainer in (eager, graphed):
            trainer.steps.load(x, y)
            trainer.steps.run(index, [(0.05, 0.9)])
        for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
        assert graphed.train_step.loss_sum.item() == pytest.approx(eager.train_step.loss_sum.item(), rel=1e-5)


@needs_cuda
def test_graphs_of_many_steps_train_what_graphs_of_one_step_train(folder, deterministic_cudnn):
    """Chunks of steps in one graph each change nothing: same kernels, same dropout draws, bit
    for bit. An epoch of 7 steps in chunks of 2 is 3 replays of one graph (48, 48) and one of
    another (12): a graph per chunk shape, not per chunk."""
    data = DeviceData(load_raw("mnist", folder, download=False), "cuda")
    config = TrainConfig(norm="gn", epochs=2, batch_size=48, seed=5)
    default = Speedups.default(data.device)
    chunked = Trainer(config, data, speedups=replace(default, chunk_steps=2))
    assert numbers(fit(chunked).records) == numbers(records(config, data, replace(default, chunk_steps=1)))
    assert sorted(chunked.steps.graphs) == [(12,), (48, 48)]


@needs_cuda
def test_cuda_graphs_train_the_eager_steps(folder, deterministic_cudnn):
    """Graphs for the full and the short last batch replay the eager step (no dropout: the
    graph draws its masks in another order)."""
    data = DeviceData(load_raw("mnist", folder, download=False), "cuda")
    config = TrainConfig(norm="bn", l1=1e-4, epochs=2, batch_size=48, dropout=0.0)
    graphed = records(config, data, Speedups(cuda_graphs=True))
    eager = records(config, data, Speedups(cuda_graphs=False))
    for g, e in zip(graphed, eager):
        assert g.train_loss == pytest.approx(e.train_loss, rel=1e-4)
        assert g.test_loss == pytest.approx(e.test_loss, rel=1e-3)


@needs_cuda
def test_cuda_resume_continues_the_random_streams(folder, deterministic_cudnn):
    """A trainer restored from state_dict() after epoch 1 trains epochs 2-3 as the straight run."""
    data = DeviceData(load_raw("mnist", folder, download=False), "cuda")
    config = TrainConfig(norm="gn", epochs=3, batch_size=48, seed=4)
    straight = numbers(records(config, data))
    first = Trainer(config, data)
    first.run_epoch(Callbacks())
    resumed = Trainer(config, data)
    resumed.load_state_dict(first.state_dict())
    assert numbers(fit(resumed).records) == straight[1:]
