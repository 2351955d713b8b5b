"""The training engine on real digits, on the CPU."""

import pytest
import torch

from normlab.engine.data import DeviceData, load_raw
from normlab.engine.config import TrainConfig
from normlab.engine.train import Callbacks, Trainer, evaluate, fit, most_confident_mistakes
from normlab.errors import ConfigError


@pytest.fixture(scope="module")
def real_data(mnist_dir):
    return DeviceData(load_raw("mnist", mnist_dir), "cpu")


@pytest.fixture(scope="module")
def small_data(small_mnist_dir):
    return DeviceData(load_raw("mnist", small_mnist_dir), "cpu")


def test_reference_model_learns_real_digits(real_data):
    """3 epochs on 8,000 real digits: at least 95% on the 2,000 held-out ones."""
    result = fit(Trainer(TrainConfig(norm="bn", epochs=3, seed=1), real_data))
    records = result.records
    assert [r.epoch for r in records] == [1, 2, 3]
    assert records[-1].test_acc >= 95.0
    assert records[-1].test_loss < records[0].test_loss
    final = evaluate(result.model, real_data.test_x, real_data.test_y)
    assert final.accuracy == pytest.approx(records[-1].test_acc)
    assert final.loss == pytest.approx(records[-1].test_loss, rel=1e-5)


def test_l1_shrinks_the_weights_for_the_same_seed(small_data):
    def total_l1(l1: float) -> float:
        trainer = Trainer(TrainConfig(norm="gn", l1=l1, epochs=2, seed=5), small_data)
        fit(trainer)
        return sum(p.detach().abs().sum().item() for p in trainer.params)

    assert total_l1(1e-2) < 0.95 * total_l1(0.0)


def test_same_seed_same_run_on_cpu(small_data):
    config = TrainConfig(norm="ln", epochs=1, seed=7)
    first = fit(Trainer(config, small_data)).records[0]
    second = fit(Trainer(config, small_data)).records[0]
    assert (first.train_loss, first.test_loss, first.test_acc) == (second.train_loss, second.test_loss, second.test_acc)


def outcome(result) -> tuple[list, dict]:
    """A fit's records without their timings, and its final weights."""
    return ([(r.epoch, r.train_loss, r.train_acc, r.test_loss, r.test_acc, r.lr) for r in result.records],
            {name: t.clone() for name, t in result.model.state_dict().items()})


def assert_same_outcome(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_trainer_on_the_steps_another_left_trains_what_a_new_one_trains(small_data, device):
    """A worker's next run of a variant takes over the finished run's model and steps (on a
    GPU: its captured CUDA graphs, bound to the generator its seed goes into) with its own
    initial weights, optimizer, schedule and random streams: the same records and final
    weights as a new trainer, bit for bit, also resumed from a checkpoint; another variant's
    steps are refused. (Compiled, in a worker: tests/test_sweep.py, on the H200.)"""
    if device != "cpu":
        small_data = DeviceData(small_data.raw, device)
    config = TrainConfig(norm="ln", epochs=2, seed=3, lr=0.03)
    first = Trainer(TrainConfig(norm="ln", epochs=1, seed=1), small_data)
    fit(first)
    warm = Trainer(config, small_data, warm=first)
    assert warm.model is first.model and warm.steps is first.steps and warm.optimizer is not first.optimizer
    new = outcome(fit(Trainer(config, small_data)))
    assert_same_outcome(outcome(fit(warm)), new)

    half = Trainer(config, small_data)
    half.run_epoch(Callbacks())
    resumed = Trainer(config, small_data, warm=warm)
    resumed.load_state_dict(half.state_dict())
    resumed_outcome = outcome(fit(resumed))
    assert resumed_outcome[0] == new[0][1:]
    assert_same_outcome(([], resumed_outcome[1]), ([], new[1]))

    with pytest.raises(ValueError, match="bn-s3's steps cannot train ln-s3"):
        Trainer(config, small_data, warm=Trainer(TrainConfig(norm="bn", seed=3), small_data))
    with pytest.raises(ValueError, match="cannot train"):
        Trainer(config, DeviceData(small_data.raw, device), warm=resumed)


def test_mistakes_are_wrong_and_most_confident_first(small_data):
    result = fit(Trainer(TrainConfig(norm="bn", epochs=1, seed=2), small_data))
    mistakes = result.mistakes
    assert len(mistakes) == 10
    evaluation = evaluate(result.model, small_data.test_x, small_data.test_y)
    wrong = evaluation.predictions != small_data.test_y
    for m in mistakes:
        assert m.pred != m.true == int(small_data.test_y[m.index])
        assert m.pred == int(evaluation.predictions[m.index])
    confidences = [m.confidence for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    assert confidences[-1] >= float(evaluation.confidence[wrong].sort(descending=True).values[9]) - 1e-6


def test_fewer_mistakes_than_asked_returns_them_all():
    from normlab.engine.train import Evaluation

    ev = Evaluation(0.0, 0.0, torch.tensor([1, 2, 3]), torch.tensor([0.9, 0.5, 0.7]))
    picked = most_confident_mistakes(ev, torch.tensor([1, 0, 0]), k=10)
    assert [(m.index, m.pred) for m in picked] == [(2, 3), (1, 2)]


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "--epochs must be positive, got 0"),
    ("batch_size", -1, "--batch-size must be positive"),
    ("lr", 0.0, "--lr must be positive"),
    ("l1", -1e-5, "--l1 must be zero or positive"),
    ("norm", "xx", "unknown norm 'xx'; valid choices"),
    ("dataset", "svhn", "unknown dataset 'svhn'; valid choices: mnist, cifar10"),
])
def test_impossible_configs_fail_validation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value}).validate()


def test_batch_larger_than_the_training_split_is_refused(small_data):
    with pytest.raises(ConfigError, match="--batch-size 5000 is larger than the training split \\(1000 images\\)"):
        Trainer(TrainConfig(batch_size=5000), small_data)


@pytest.mark.parametrize("epochs, batch_size", [(5, 1000), (1, 200)])
def test_five_steps_in_all_are_refused_before_training_not_a_division_by_zero(small_data, epochs, batch_size):
    """5 steps make the one-cycle warm-up (20%) one step, where torch's OneCycleLR divided by
    zero building the schedule; 4 and 6 steps train."""
    with pytest.raises(ConfigError, match=f"--epochs {epochs} with --batch-size {batch_size} on 1000 training images "
                                          "is 5 steps, whose one-cycle warm-up \\(20% of them\\) would be one step"):
        Trainer(TrainConfig(epochs=epochs, batch_size=batch_size), small_data)
    for fine in (4, 6):
        Trainer(TrainConfig(epochs=fine, batch_size=1000), small_data)


def test_config_hash_ignores_groups_except_for_gn():
    assert TrainConfig(norm="ln", groups=2).config_hash() == TrainConfig(norm="ln", groups=5).config_hash()
    assert TrainConfig(norm="gn", groups=2).config_hash() != TrainConfig(norm="gn", groups=5).config_hash()
    assert TrainConfig(seed=1).config_hash() != TrainConfig(seed=2).config_hash()
    assert TrainConfig(norm="bn", l1=1e-5, seed=3).run_name == "bn-l1_1e-05-s3"
