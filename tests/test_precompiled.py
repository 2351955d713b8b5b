"""Compiled functions kept on disk whole (engine/fast/precompiled.py): one file per shape of
their arguments, loaded by a later process; a damaged file is compiled anew, and a function
Dynamo cannot take whole is compiled by torch.compile as before. That a later process loads
the real step and trains the same numbers is checked in tests/test_step.py."""

from __future__ import annotations

import pytest
import torch

from normlab.engine.fast import precompiled
from normlab.engine.fast.precompiled import Precompiled

def weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum()


def with_a_graph_break(x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.graph_break()
    return x + 1


@pytest.fixture
def new_process(tmp_path, monkeypatch):
    """This process as a new one would be: its own compile caches, nothing loaded yet."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def forget() -> None:
        monkeypatch.setattr(precompiled, "_LOADED", {})
    forget()
    return forget


def test_each_new_shape_is_its_own_file_and_a_damaged_file_is_compiled_anew(tmp_path, new_process):
    x, w = torch.arange(8.0), torch.full((8,), 0.5)
    compiling = Precompiled(weighted_sum, {})
    assert compiling(x, w).item() == 14.0
    assert (compiling.loads, compiling.saves) == (0, 1)
    assert compiling(x[:4], w[:4]).item() == 3.0  # another shape: compiled and saved too
    assert (compiling.loads, compiling.saves) == (0, 2)
    files = sorted((tmp_path / "inductor" / "normlab-precompiled").glob("*.bin"))
    assert len(files) == 2

    new_process()
    loading = Precompiled(weighted_sum, {})
    assert loading(x, w).item() == 14.0 and loading(x[:4], w[:4]).item() == 3.0
    assert (loading.loads, loading.saves) == (2, 0)

    new_process()
    whole = {file: file.read_bytes() for file in files}
    files[0].write_bytes(whole[files[0]][:100])  # cut short, as by a full disk
    recompiling = Precompiled(weighted_sum, {})
    assert recompiling(x, w).item() == 14.0 and recompiling(x[:4], w[:4]).item() == 3.0
    assert (recompiling.loads, recompiling.saves) == (1, 1)
    assert files[0].stat().st_size > 100 and files[1].read_bytes() == whole[files[1]]  # written whole again


def test_a_function_with_a_graph_break_is_compiled_by_torch_compile_and_kept_nowhere(tmp_path, new_process):
    compiled = Precompiled(with_a_graph_break, {})
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert compiled.fallback is not None and compiled.saves == 0
    assert not list((tmp_path / "inductor").glob("normlab-precompiled/*.bin"))


def test_the_key_tells_the_models_switches_apart(new_process):
    """A layer's switch that changes what its forward runs (the Triton kernels on or off) is
    part of what a compiled function was traced from."""
    from normlab.engine.fast.triton_conv import use_triton_convs
    from normlab.engine.models import Net

    model = Net("mnist", "ln")
    use_triton_convs(model, True)  # as the engine sets them
    step = Precompiled(weighted_sum, {})
    before = step._key((model,))
    use_triton_convs(model, False)
    assert step._key((model,)) != before
    use_triton_convs(model, True)
    assert step._key((model,)) == before


def test_the_key_tells_inductors_settings_in_the_environment_apart(new_process, monkeypatch):
    """TORCHINDUCTOR_MAX_AUTOTUNE=1, say, compiles other kernels; the cache's own folder is no setting."""
    x = torch.ones(2)
    step = Precompiled(weighted_sum, {})
    before = step._key((x, x))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert step._key((x, x)) == before
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE", "1")
    assert step._key((x, x)) != before


def test_on_the_cpu_the_key_tells_thread_counts_apart(new_process, one_thread):
    """Inductor builds CPU code for the process's thread count (a load in a process of another
    count would fail Dynamo's guards): one file per count, rather than each overwriting the other."""
    x = torch.ones(2)
    step = Precompiled(weighted_sum, {})
    one = step._key((x, x))
    torch.set_num_threads(2)
    assert step._key((x, x)) != one
