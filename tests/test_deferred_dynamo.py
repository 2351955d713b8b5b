"""An uncompiled run never imports Dynamo (engine/fast/deferred_dynamo.py), and torch's own
Dynamo markers are back wherever something compiles."""

from __future__ import annotations

import json
import subprocess
import sys

from normlab.engine.data import load_raw
from tests.conftest import cli_env

UNCOMPILED_RUN = """
import json, sys, warnings
warnings.filterwarnings("error", message="Detected call of `lr_scheduler.step()`")
import torch
from normlab.engine.config import TrainConfig
from normlab.engine.data import DeviceData, load_raw
from normlab.engine.fast.deferred_dynamo import defer_dynamo_imports
from normlab.engine.train import Callbacks, Trainer

deferred = defer_dynamo_imports()
data = DeviceData(load_raw("mnist", sys.argv[1], download=False), torch.device("cpu"))
trainer = Trainer(TrainConfig(norm="ln", epochs=2, batch_size=25), data)
record = trainer.run_epoch(Callbacks())
state = trainer.state_dict()
again = Trainer(TrainConfig(norm="ln", epochs=2, batch_size=25), data)
again.load_state_dict(state)
uncompiled = "torch._dynamo" in sys.modules

from normlab.engine.fast import deferred_dynamo
deferred_dynamo.restore()  # as a compiled trainer's step does before it compiles
built_meanwhile = defer_dynamo_imports()  # a trainer built meanwhile, before Dynamo is imported

optimizer = again.optimizer  # now a compile in the same process: torch's markers, as without normlab
for p in again.params:
    p.grad = torch.ones_like(p)

@torch.compile(backend="eager")
def zero_grad_and_add_one(x):
    optimizer.zero_grad()
    return x + 1

total = zero_grad_and_add_one(torch.ones(2)).sum().item()
print(json.dumps({"deferred": deferred, "dynamo_after_uncompiled_run": uncompiled, "train_acc": record.train_acc,
                  "deferred_once_compiling": built_meanwhile,
                  "compiled_total": total, "grads_cleared": all(p.grad is None for p in again.params)}))
"""


def test_an_uncompiled_run_imports_no_dynamo_and_a_compile_later_finds_torchs_markers(small_mnist_dir):
    """torch's optimizer and custom ops import Dynamo (1.1 s on an H200) at their first call;
    deferred, a CPU run trains, checkpoints and resumes without it (and without the scheduler's
    warning of a step before the optimizer's); once the process compiles nothing is deferred
    again, and a function compiled afterwards in the same process still skips the optimizer's
    zero_grad as torch has Dynamo do, and runs it. (The data's parse is kept first, as after a
    first run: parsing imports torchvision, which imports Dynamo.)"""
    load_raw("mnist", small_mnist_dir, download=False)
    out = subprocess.run([sys.executable, "-c", UNCOMPILED_RUN, str(small_mnist_dir)], env=cli_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # all of torch's markers on the optimizer and normlab's ops: a torch that moves them fails here
    assert seen["deferred"] == ["Optimizer.state_dict", "Optimizer.load_state_dict", "Optimizer.zero_grad",
                                "Optimizer.add_param_group", "normlab::conv2d", "normlab::conv2d_input_grad",
                                "normlab::conv2d_weight_grad_parts"]
    assert seen["dynamo_after_uncompiled_run"] is False
    assert seen["train_acc"] > 20  # it learned (chance: 10%): 1,000 digits, one epoch of 40 steps
    assert seen["deferred_once_compiling"] == []  # once the process compiles, torch's own markers throughout
    assert seen["compiled_total"] == 4.0
    assert seen["grads_cleared"] is True
