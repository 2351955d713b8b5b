"""The trainer pool (engine/fast/trainer_pool.py): the trainers a worker or an engine process
keeps from run to run, and those it prepares ahead while a sweep starts."""

from __future__ import annotations

import threading

import pytest
import torch

from normlab.engine.config import TrainConfig, steps_key
from normlab.engine.fast.trainer_pool import TrainerPool
from normlab.engine.train import Trainer, fit
from normlab.errors import ConfigError
from normlab.sweep.driver import training_order
from tests.test_train import assert_same_outcome, outcome

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_first_runs_take_over_the_trainers_prepared_ahead_and_train_what_new_ones_train(
        small_mnist_dir, device):
    """prepare_ahead builds one trainer per run at once, in the runs' order, in a thread; a run
    asked for at once waits for its warm-up instead of preparing its own, and trains what a
    new trainer trains, bit for bit; the next run of its variant takes over its trainer."""
    pool = TrainerPool(device, str(small_mnist_dir), concurrent=2)
    configs = training_order([TrainConfig(norm=norm, epochs=1, seed=seed) for norm in ("ln", "gn") for seed in (1, 2)])
    assert [c.run_name for c in configs] == ["ln-s1", "gn2-s1", "ln-s2", "gn2-s2"]
    pool.prepare_ahead(configs, {})
    first = pool.trainer(configs[0])  # asked for before its warm-up can be ready
    assert first.took_over == "the warm-up of ln-s1"
    assert_same_outcome(outcome(fit(first)), outcome(fit(Trainer(configs[0], pool.data("mnist")))))
    pool.release(first, finished=True)
    second = pool.trainer(configs[1])
    assert second.took_over == "the warm-up of gn2-s1"
    third = pool.trainer(configs[2])
    assert third.took_over == "ln-s1" and third.model is first.model
    assert_same_outcome(outcome(fit(third)), outcome(fit(Trainer(configs[2], pool.data("mnist")))))


@pytest.mark.parametrize("device", DEVICES)
def test_the_first_epochs_warm_up_leaves_every_runs_numbers_as_they_were(small_mnist_dir, device):
    """A GPU pool augments one epoch on a thread once its data is loaded (_warm_up_first_epoch),
    with a generator of its own: torch's global generators (the CPU's, and the GPU's there) are
    not drawn from, and a run trains what it trains without it, bit for bit (here the warm-up
    runs as a GPU pool runs it, and on the CPU by hand)."""
    pool = TrainerPool(device, str(small_mnist_dir))
    config = TrainConfig(norm="bn", epochs=1)
    without = outcome(fit(Trainer(config, pool.data("mnist"))))

    def global_generators():
        return [torch.get_rng_state(), *([torch.cuda.get_rng_state()] if device == "cuda" else [])]

    before = global_generators()
    pool._warm_up_first_epoch(pool.data("mnist"))
    assert all(map(torch.equal, global_generators(), before))
    assert_same_outcome(outcome(fit(pool.trainer(config))), without)


def test_a_run_waits_for_every_warm_up_not_only_its_own(small_mnist_dir, monkeypatch):
    """Runs training in the engine's process would slow the warm-ups still being prepared
    beside them, so the first run starts only once the last warm-up is ready."""
    gate = threading.Event()
    prepare = Trainer.prepare

    def held_prepare(trainer):  # gn2-s1's warm-up waits for the test's word
        if trainer.config.norm == "gn":
            assert gate.wait(60)
        return prepare(trainer)

    monkeypatch.setattr(Trainer, "prepare", held_prepare)
    pool = TrainerPool("cpu", str(small_mnist_dir), concurrent=2)
    configs = [TrainConfig(norm="ln", epochs=1), TrainConfig(norm="gn", epochs=1)]
    pool.prepare_ahead(configs, {})
    given = []
    asking = threading.Thread(target=lambda: given.append(pool.trainer(configs[0])))
    asking.start()
    asking.join(timeout=3)
    assert not given and pool.preparing[steps_key(configs[1])] == 1  # ln-s1's warm-up is ready, gn2-s1's held
    gate.set()
    asking.join(timeout=60)
    assert given[0].took_over == "the warm-up of ln-s1" and sum(pool.preparing.values()) == 0


def test_a_warm_up_that_fails_leaves_its_run_to_fail_or_prepare_on_its_own(small_mnist_dir):
    pool = TrainerPool("cpu", str(small_mnist_dir), concurrent=2)
    too_large = TrainConfig(norm="ln", epochs=1, batch_size=5000)
    pool.prepare_ahead([too_large, TrainConfig(norm="ln", epochs=1)], {}).join(timeout=120)
    assert sum(pool.preparing.values()) == 0 and len(pool.warm_ups) == 1
    with pytest.raises(ConfigError, match="batch"):
        pool.trainer(too_large)  # its own error, not a wait for a warm-up that never comes


def test_a_stop_reaches_the_active_runs_and_every_later_one(small_mnist_dir):
    pool = TrainerPool("cpu", str(small_mnist_dir))
    running = pool.trainer(TrainConfig(norm="bn", epochs=1))
    pool.request_stop("SIGINT received")
    assert running.stop_reason == "SIGINT received"
    assert pool.trainer(TrainConfig(norm="bn", epochs=1, seed=2)).stop_reason == "SIGINT received"


def test_tritons_build_is_hashed_once_on_a_thread_which_the_first_kernel_waits_for():
    """A GPU engine starts Triton's hash of its build on a thread (triton_build_hash.start, beside
    torch's import), and its pool waits for it before the first kernel: Triton's lru_cache would
    not wait for a call under way, and the kernel would hash the 500 MB again beside it. Here the
    wait comes at once after the start, as in a pool built before the thread is done: the build
    is hashed once, the same key Triton computes itself."""
    cache = pytest.importorskip("triton.runtime.cache")
    from normlab.engine.fast import triton_build_hash

    cache.triton_key.cache_clear()
    expected = cache.triton_key()
    cache.triton_key.cache_clear()
    triton_build_hash._thread = None  # as in a new process
    triton_build_hash.start()
    thread = triton_build_hash._thread
    triton_build_hash.start()
    assert triton_build_hash._thread is thread  # once per process
    triton_build_hash.wait()
    assert not thread.is_alive()
    assert cache.triton_key() == expected  # as a kernel's cache lookup asks for it
    assert cache.triton_key.cache_info().misses == 1  # hashed once: on the thread
