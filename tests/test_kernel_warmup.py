"""A fresh machine's Triton kernels compiled side by side in helper processes
(engine/fast/kernel_warmup.py): each helper launches a share of the layers' kernels, the
shares cover every layer once, and once the engine marks the kernels in Triton's cache no
helper starts again. On the CPU the helpers run the same code over torch's own kernels; on a
GPU the test checks that the engine then compiles none of them itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

from normlab.engine.config import TrainConfig
from normlab.engine.fast import kernel_warmup
from normlab.engine.fast.kernel_warmup import compile_side_by_side, share_of_layers, spec, write_mark
from normlab.engine.models import Net
from tests.conftest import ROOT

CLASSIC = [spec(TrainConfig(norm=norm, groups=2, l1=1e-5 if norm == "bn" else 0.0), 1000, 500, 2000, True)
           for norm in ("bn", "ln", "gn")]


def test_the_helpers_shares_cover_every_layer_with_triton_kernels_once():
    layers = {}
    for share in range(3):
        model = Net("mnist", "gn", 2)
        on = share_of_layers(model, share, 3)
        names = {id(m): n for n, m in model.named_modules()}
        layers[share] = {names[id(m)] for m in on}
        assert all(m.triton_kernels == (m in on) for m in model.modules() if hasattr(m, "triton_kernels"))
    every = [n for shares in layers.values() for n in shares]
    assert len(every) == len(set(every)) == 14  # 8 convolutions and 6 norms, each in one share
    assert {"conv1.0", "conv1.2", "transition.0", "head"} <= set(every)


def test_the_specs_name_the_batch_shapes_a_run_launches():
    assert spec(TrainConfig(), 60000, 10000, 2000, True).batch_sizes == (96, 128)
    assert spec(TrainConfig(), 60000, 10000, 2000, True).eval_batch_sizes == (2000,)
    assert spec(TrainConfig(batch_size=512), 1000, 500, 2000, False).batch_sizes == (488, 512)
    assert spec(TrainConfig(batch_size=512), 1000, 500, 2000, False).eval_batch_sizes == (500,)


def test_helpers_start_until_the_kernels_are_marked(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # on the CPU the helpers run torch's kernels, nothing to compile: the classic runs at batches
    # of 8 are as good runs to mark (of a helper's 4 s, 3 go to starting its process)
    specs = CLASSIC if device.type == "cuda" else [replace(s, batch_sizes=(8,), eval_batch_sizes=(8,)) for s in CLASSIC]
    assert compile_side_by_side(specs, device)  # the helpers ran (here on torch's kernels), exit 0 or not
    assert compile_side_by_side(specs, device)  # nothing marked them yet
    write_mark(specs, device)
    assert not compile_side_by_side(specs, device)
    assert compile_side_by_side(specs[:1], device)  # other runs: not marked


def test_a_helper_runs_its_share_to_the_end():
    """The helper's own command, as compile_side_by_side starts it, trains and evaluates its
    share of every spec on random images and exits 0."""
    helper(CLASSIC, 1, 2)


def helper(specs, share: int, helpers: int, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "normlab.engine.fast.kernel_warmup",
                           json.dumps([asdict(s) for s in specs]), str(share), str(helpers)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_process_after_the_helpers_finds_every_kernel_compiled(tmp_path, monkeypatch):
    """The helpers compile what one process launching every layer's kernels would: that
    process, started after them on the same cache, adds no kernel to it."""
    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    assert compile_side_by_side(CLASSIC, torch.device("cuda"))
    compiled = {p.name for p in cache.iterdir()}
    assert len(compiled) > 20
    helper(CLASSIC, 0, 1, TRITON_CACHE_DIR=str(cache))  # one share: every layer
    assert {p.name for p in cache.iterdir()} == compiled


def test_no_helper_starts_where_they_are_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("NORMLAB_KERNEL_HELPERS", "0")
    assert not compile_side_by_side(CLASSIC, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
