"""How much faster normlab's engine trains than the reference notebooks' pipeline.

The notebook-style pipeline lives here, not in the package: torchvision's MNIST Dataset with
PIL RandomRotation(7) + ToTensor + Normalize, a DataLoader (batch 128, 2 workers, shuffle),
``.item()`` every step, the same Net with torch's own ``nn.Dropout``, SGD with momentum and
OneCycleLR. normlab's engine is the ordinary ``Trainer`` with its defaults. Both read the same
MNIST folder, train the same epochs and are timed in one invocation, so their ratio holds even
on a busy machine.

    python benchmarks/speed.py                      # full comparison on the default device
    python benchmarks/speed.py --device cpu --train-images 6000 --epochs 2
    python benchmarks/speed.py --tiny               # seconds; what CI runs

Full MNIST is used when --data-dir holds it; otherwise the 10,000 real test digits from
--shared-mnist, tiled to 60,000 training images (test = those 10,000): the content does
not change the timing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normlab.engine.config import TrainConfig  # noqa: E402
from normlab.engine.data import DeviceData, load_raw  # noqa: E402
from normlab.engine.fast import Speedups  # noqa: E402
from normlab.engine.models import Net
from normlab.engine.train import Callbacks, Trainer, resolve_device  # noqa: E402
from normlab.tracking import results_log, run_log
from benchmarks.notebook_layers import as_notebook_model, with_torch_dropout  # noqa: E402

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
STUDY = (TrainConfig(norm="bn", l1=1e-5), TrainConfig(norm="ln"), TrainConfig(norm="gn", groups=2))


# ---------------------------------------------------------------- data


def _idx(dims: tuple[int, ...], body: bytes) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body


def prepare_mnist(data_dir: Path, shared: Path, workdir: Path, train_images: int | None,
                  test_images: int | None, holdout: int = 0) -> tuple[Path, str]:
    """A torchvision-layout MNIST root: full MNIST if present, else tiled real test digits.

    Tiled digits are tested on digits the model trained on, which saturates accuracy;
    ``holdout`` keeps the last N digits out of training for an accuracy that means something.
    --train-images / --test-images take the first N of each split (for slow devices).
    """
    raw, px = data_dir / "MNIST" / "raw", 28 * 28
    if all((raw / f).exists() for f in MNIST_FILES) and train_images is None and test_images is None:
        return data_dir, "full MNIST"
    if all((raw / f).exists() for f in MNIST_FILES):
        read = {f: (raw / f).read_bytes() for f in MNIST_FILES}
        train_img, train_lab = read[MNIST_FILES[0]][16:], read[MNIST_FILES[1]][8:]
        test_img, test_lab = read[MNIST_FILES[2]][16:], read[MNIST_FILES[3]][8:]
        source = "full MNIST"
    else:
        files = [shared / "t10k-images-idx3-ubyte.gz", shared / "t10k-labels-idx1-ubyte.gz"]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            sys.exit(f"error: no MNIST in {raw} and the real test digits are missing: {', '.join(missing)}; "
                     f"pass --data-dir with full MNIST or --shared-mnist with the t10k-*.gz files")
        digits, labels = gzip.decompress(files[0].read_bytes())[16:], gzip.decompress(files[1].read_bytes())[8:]
        kept = len(labels) - holdout
        test_img, test_lab = (digits[kept * px:], labels[kept:]) if holdout else (digits, labels)
        train_img, train_lab = (digits[: kept * px] * 8)[: 60000 * px], (labels[:kept] * 8)[:60000]
        source = (f"the first {kept:,} real MNIST test digits tiled to 60,000 (test: the other {holdout:,})"
                  if holdout else "the 10,000 real MNIST test digits tiled 6x")
    n_train = min(train_images or len(train_lab), len(train_lab))
    n_test = min(test_images or len(test_lab), len(test_lab))
    out = workdir / "MNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)  # a failed download may have left the folder
    (out / MNIST_FILES[0]).write_bytes(_idx((n_train, 28, 28), train_img[: n_train * px]))
    (out / MNIST_FILES[1]).write_bytes(_idx((n_train,), train_lab[:n_train]))
    (out / MNIST_FILES[2]).write_bytes(_idx((n_test, 28, 28), test_img[: n_test * px]))
    (out / MNIST_FILES[3]).write_bytes(_idx((n_test,), test_lab[:n_test]))
    return workdir, source


# ---------------------------------------------------------------- measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.init()  # an explicit index ("cuda:0") does not initialize CUDA by itself
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Runs:
    """Per-epoch seconds and final test accuracy of each seed's run of one pipeline."""

    name: str
    epoch_seconds: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    fixed_seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_gpu_mib: float | None = None
    peak_rss_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.epoch_seconds)

    def fixed(self, key: str, seconds: float) -> None:
        self.fixed_seconds.setdefault(key, []).append(seconds)

    def as_dict(self) -> dict:
        return {"name": self.name, "epoch_seconds": self.epoch_seconds, "median_epoch_seconds": self.median,
                "accuracies": self.accuracies, "fixed_seconds": self.fixed_seconds,
                "peak_gpu_mib": self.peak_gpu_mib, "peak_rss_mib": self.peak_rss_mib}


# ---------------------------------------------------------------- the notebook-style pipeline


def notebook_runs(root: Path, device: torch.device, epochs: int, seeds: list[int], workers: int,
                  config: TrainConfig = TrainConfig(norm="bn"), name: str = "notebook") -> Runs:
    """The reference notebooks' loop, as they wrote it (batch 128, PIL rotation, .item(); an
    L1 term summed over the parameters in a Python loop), for config's norm, groups and l1."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    runs = Runs(name)
    reset_peak_memory(device)
    for seed in seeds:
        torch.manual_seed(seed)
        start = time.perf_counter()
        train_tf = transforms.Compose([transforms.RandomRotation((-7.0, 7.0), fill=(0,)), transforms.ToTensor(),
                                       transforms.Normalize((0.1307,), (0.3081,))])
        test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train_ds = datasets.MNIST(str(root), train=True, download=False, transform=train_tf)
        test_ds = datasets.MNIST(str(root), train=False, download=False, transform=test_tf)
        kwargs = dict(batch_size=128, num_workers=workers, pin_memory=device.type == "cuda")
        train_loader = DataLoader(train_ds, shuffle=True, **kwargs)
        test_loader = DataLoader(test_ds, shuffle=False, **kwargs)
        model = as_notebook_model(Net("mnist", config.norm, config.groups)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, epochs=epochs,
                                                        steps_per_epoch=len(train_loader), pct_start=0.2)
        runs.fixed("data and model setup", time.perf_counter() - start)
        for _ in range(epochs):
            start = time.perf_counter()
            model.train()
            train_loss = correct = 0
            for data, target in train_loader:
                data, target = data.to(device), target.to(device)
                optimizer.zero_grad()
                y_pred = model(data)
                loss = F.nll_loss(y_pred, target)
                if config.l1 > 0:
                    l1 = 0
                    for p in model.parameters():
                        l1 = l1 + p.abs().sum()
                    loss = loss + config.l1 * l1
                loss.backward()
                optimizer.step()
                scheduler.step()
                train_loss += loss.item()
                correct += y_pred.argmax(dim=1).eq(target).sum().item()
            model.eval()
            test_correct = 0
            with torch.no_grad():
                for data, target in test_loader:
                    data, target = data.to(device), target.to(device)
                    test_correct += model(data).argmax(dim=1).eq(target).sum().item()
            runs.epoch_seconds.append(time.perf_counter() - start)
        runs.accuracies.append(100.0 * test_correct / len(test_ds))
    runs.peak_gpu_mib = peak_gpu_mib(device)
    runs.peak_rss_mib = max(peak_rss_mib(), peak_rss_mib(resource.RUSAGE_CHILDREN))
    return runs


# ---------------------------------------------------------------- normlab's engine


def engine_runs(name: str, root: Path, device: torch.device, configs: list[TrainConfig],
                speedups: Speedups | None = None, torch_dropout: bool = False) -> Runs:
    """normlab's Trainer, one run per config; data loading, compiling and capture timed apart.
    ``torch_dropout`` swaps in nn.Dropout, to measure what normlab's CPU dropout saves."""
    runs = Runs(name)
    reset_peak_memory(device)
    for config in configs:
        start = time.perf_counter()
        data = DeviceData(load_raw("mnist", root, download=False), device)
        sync(device)
        runs.fixed("data load to device", time.perf_counter() - start)
        start = time.perf_counter()
        trainer = Trainer(config, data, speedups=speedups)
        if torch_dropout:
            with_torch_dropout(trainer.model)
        sync(device)
        runs.fixed("model and optimizer", time.perf_counter() - start)
        runs.fixed("compile + capture of the step", trainer.prepare())
        runs.epoch_seconds += [trainer.run_epoch(Callbacks()).seconds for _ in range(config.epochs)]
        runs.accuracies.append(trainer.last_evaluation.accuracy)
    runs.peak_gpu_mib = peak_gpu_mib(device)
    runs.peak_rss_mib = peak_rss_mib()
    return runs


@dataclass
class StudyRun:
    """One study run: when its epoch loop ended, and what MLflow and preparing its step cost it."""

    label: str
    loop_start: float  # perf_counter() before its first step
    loop_end: float  # perf_counter() when its last epoch (with evaluation and logging) was done
    accuracy: float
    prepare_seconds: float  # compile + CUDA graph capture, before its first epoch
    mlflow_busy_seconds: float = 0.0  # epoch-loop MLflow calls, on the run's upload thread
    mlflow_waited_seconds: float = 0.0  # how long the training thread waited for them
    final_logging_seconds: float = 0.0  # misclassified grid, summary and model, after training


def study_runs(data: DeviceData, configs: list[TrainConfig], side_by_side: bool,
               store: Path | None) -> tuple[float, list[StudyRun]]:
    """The study as `normlab sweep` trains it: side by side (one thread and stream per run) or
    one after another. With ``store``, each run logs its epochs to a real sqlite MLflow store
    there exactly as `normlab train` does (metrics and checkpoint on the upload thread), then
    its final artifacts and model. Returns (seconds of training, runs): from the first step
    to the last epoch's end. Compiling and capturing each run's step before it, and the final
    artifacts after it, are fixed costs, reported apart; side by side, the runs start their
    epochs together once all are prepared."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from normlab.engine.train import CallbackList, fit

    ready = threading.Barrier(len(configs)) if side_by_side else None

    def one(config: TrainConfig) -> StudyRun:
        trainer = Trainer(config, data)
        try:
            prepared = trainer.prepare()
        except BaseException:
            if ready:
                ready.abort()  # the others stop waiting for this run
            raise
        if ready:
            ready.wait()
        loop_start = time.perf_counter()
        if store is None:
            result = fit(trainer)
            return StudyRun(config.label, loop_start, time.perf_counter(), result.records[-1].test_acc, prepared)
        import mlflow

        with mlflow.start_run(run_name=config.run_name) as run:
            loop_start = time.perf_counter()
            uploads = run_log.EpochUploads(run.info.run_id)
            local = store / "checkpoints" / run.info.run_id / "last.pt"
            result = fit(trainer, CallbackList(run_log.Checkpointer(trainer, uploads, local),
                                               run_log.MetricLogger(uploads)))
            uploads.close()
            loop_end = time.perf_counter()
            results_log.log_results(config, data, result)
            final = time.perf_counter() - loop_end
        return StudyRun(config.label, loop_start, loop_end, result.records[-1].test_acc, prepared,
                        uploads.busy_seconds, uploads.waited_seconds, final)

    if not side_by_side:
        runs = [one(c) for c in configs]
        return sum(r.loop_end - r.loop_start for r in runs), runs

    def on_its_stream(config: TrainConfig) -> StudyRun:
        if data.device.type != "cuda":
            return one(config)
        with torch.cuda.stream(torch.cuda.Stream(data.device)):
            return one(config)

    with ThreadPoolExecutor(len(configs)) as pool:
        runs = list(pool.map(on_its_stream, configs))
    return max(r.loop_end for r in runs) - min(r.loop_start for r in runs), runs


def mlflow_store(folder: Path) -> Path | None:
    """A fresh sqlite tracking store with its artifacts in `folder` (a sqlite store would
    otherwise put them in ./mlruns), or None where MLflow is not installed."""
    try:
        import mlflow
    except ImportError:
        return None
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = mlflow.create_experiment("speed-benchmark", artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    return folder


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} (n={len(values)})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run for both pipelines")
    p.add_argument("--seeds", type=int, default=1, help="runs (seeds 1..N) per pipeline, for accuracy")
    p.add_argument("--study-epochs", type=int, default=0,
                   help="also time the classic study (BN+L1, LN, GN for this many epochs each) one after "
                        "another and, on a GPU, side by side as `normlab sweep` runs it")
    p.add_argument("--ablations", action="store_true", help="also time the engine with techniques switched off")
    p.add_argument("--compile", action="store_true",
                   help="with --ablations: also time the engine with its forward compiled on a CPU, where it "
                        "is off by default (a GPU's default already compiles)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the notebook pipeline")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data", help="folder that may hold full MNIST")
    p.add_argument("--shared-mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist-t10k",
                   help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    p.add_argument("--train-images", type=int, help="use only the first N training images")
    p.add_argument("--test-images", type=int, help="use only the first N test images")
    p.add_argument("--holdout", type=int, default=0,
                   help="with the tiled test digits: keep the last N out of training and test on them")
    p.add_argument("--tiny", action="store_true", help="256 train / 128 test images, 1 epoch: a smoke test")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.train_images, args.test_images, args.epochs, args.seeds = 256, 128, 1, 1
    for name in ("epochs", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not 0 <= args.holdout <= 5000:
        p.error("--holdout must be between 0 and 5000 digits")
    device = resolve_device(args.device)
    import torchvision  # noqa: F401  imported once here, so neither pipeline's timing pays for it

    with tempfile.TemporaryDirectory() as tmp:
        root, source = prepare_mnist(args.data_dir, args.shared_mnist, Path(tmp), args.train_images,
                                     args.test_images, args.holdout)
        seeds = list(range(1, args.seeds + 1))
        # The notebook runs first, under glibc's malloc defaults as a notebook does: the engine
        # then tunes malloc for the whole process (normlab.engine.fast.host_memory), which cannot be undone;
        # benchmarks/cpu_step.py measures that in fresh processes.
        notebook = notebook_runs(root, device, args.epochs, seeds, args.workers)
        base = [TrainConfig(norm="bn", epochs=args.epochs, seed=s) for s in seeds]
        engine = engine_runs("normlab engine", root, device, base)
        ablations: list[Runs] = []
        if args.ablations:
            one = [TrainConfig(norm="bn", epochs=max(args.epochs, 2), seed=1)]
            ablations.append(plain_device_runs(root, device, one[0]))
            ablations += [engine_runs(label, root, device, one, sp, torch_dropout=td)
                          for label, sp, td in ablation_variants(device, args.compile)]
        studies: dict[str, tuple[float, list[StudyRun]]] = {}
        notebook_study: list[Runs] = []
        if args.study_epochs:
            # the notebook's study: each variant's own epochs (BN + L1 adds its Python L1 loop)
            notebook_study = [notebook_runs(root, device, args.epochs, seeds[:1], args.workers, c, f"notebook {c.label}")
                              for c in STUDY]
            configs = [TrainConfig(**{**c.__dict__, "epochs": args.study_epochs}) for c in STUDY]
            start = time.perf_counter()
            data = DeviceData(load_raw("mnist", root, download=False), device)
            sync(device)
            data_seconds = time.perf_counter() - start
            store = mlflow_store(Path(tmp))
            ways = [("one after another", False)] + ([("side by side", True)] if device.type == "cuda" else [])
            for way, together in ways:
                studies[way] = study_runs(data, configs, together, store)

    ratio = notebook.median / engine.median
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"normlab speed benchmark, {date}",
        f"device: {device_name(device)} ({device}); torch {torch.__version__}; python {platform.python_version()}",
        f"data: {source}; {args.train_images or 'all'} train / {args.test_images or 'all'} test images; "
        f"BN, batch 128, {args.epochs} epoch(s) x {args.seeds} seed(s)",
        f"command: python benchmarks/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        "",
        "| pipeline | epoch median (s) | epochs timed | test accuracy (%) | peak GPU (MiB) | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (notebook, engine):
        gpu = f"{r.peak_gpu_mib:.0f}" if r.peak_gpu_mib is not None else "-"
        lines.append(f"| {r.name} | {r.median:.3f} | {len(r.epoch_seconds)} | {mean_sd(r.accuracies)} | {gpu} | "
                     f"{r.peak_rss_mib:.0f} |")
    lines += ["", f"per-epoch speed-up (notebook median / engine median): {ratio:.1f}x", "", "one-time costs per run (s):"]
    for r in (notebook, engine):
        for key, values in r.fixed_seconds.items():
            lines.append(f"  {r.name}: {key}: median {statistics.median(values):.2f} (max {max(values):.2f})")
    result = {"date": date, "device": device_name(device), "torch": torch.__version__, "data": source,
              "args": {k: str(v) for k, v in vars(args).items()}, "notebook": notebook.as_dict(),
              "engine": engine.as_dict(), "ratio": ratio}
    if studies:
        epochs = len(STUDY) * args.study_epochs
        notebook_total = args.study_epochs * sum(r.median for r in notebook_study)
        tracked = "with MLflow logging to a sqlite store" if store else "MLflow not installed: no logging"
        per_variant = " + ".join(f"{r.name.removeprefix('notebook ')} {r.median:.3f}" for r in notebook_study)
        lines += ["", f"classic study (BN+L1, LN, GN x {args.study_epochs} epochs = {epochs} epochs; evaluation "
                      f"every epoch; {tracked}); notebook: {args.study_epochs} x its epoch medians "
                      f"({per_variant} s, {args.epochs} epochs each) = {notebook_total:.0f} s",
                  "| way | seconds (first step to last epoch) | vs notebook | MLflow epoch calls (s, upload threads) "
                  "| training waited for MLflow (s) | compile + capture (s) | final artifacts + model (s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        result["study"] = {"notebook_estimate_seconds": notebook_total, "data_load_seconds": data_seconds,
                           "notebook_variants": [r.as_dict() for r in notebook_study]}
        for way, (wall, runs) in studies.items():
            busy = sum(r.mlflow_busy_seconds for r in runs)
            waited = sum(r.mlflow_waited_seconds for r in runs)
            lines.append(f"| {way} | {wall:.1f} | {notebook_total / wall:.1f}x | {busy:.2f} | {waited:.2f} | "
                         f"{max(r.prepare_seconds for r in runs):.1f} max | "
                         f"{max(r.final_logging_seconds for r in runs):.1f} max |")
            result["study"][way] = {"wall_seconds": wall, "runs": [r.__dict__ for r in runs]}
        lines.append(f"  data load to the device (once): {data_seconds:.2f} s; test accuracy: " + ", ".join(
            f"{r.label} {r.accuracy:.2f}%" for r in studies[list(studies)[-1]][1]))
    if ablations:
        lines += ["", "each technique (BN, epoch median):", "| variant | epoch median (s) | vs notebook |", "| --- | ---: | ---: |",
                  f"| notebook pipeline | {notebook.median:.3f} | 1.0x |"]
        for r in ablations:
            lines.append(f"| {r.name} | {r.median:.3f} | {notebook.median / r.median:.1f}x |")
            for key, values in r.fixed_seconds.items():
                if key.startswith("compile") and max(values) >= 0.05:
                    lines.append(f"|   ({key}: {max(values):.1f} s) | | |")
        result["ablations"] = [r.as_dict() for r in ablations]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def ablation_variants(device: torch.device, compiled_cpu: bool) -> list[tuple[str, Speedups, bool]]:
    """(label, speedups, torch's own dropout) for each engine variant that --ablations times:
    the device's defaults with one or more techniques switched off (on a CPU, with
    ``compiled_cpu``, also compiling switched on)."""
    default = Speedups.default(device)
    if device.type == "cuda":
        return [("engine: defaults, one CUDA graph per step", replace(default, chunk_steps=1), False),
                ("engine: defaults, cuDNN convolutions", replace(default, triton_convs=False), False),
                ("engine: defaults, torch's norm kernels", replace(default, triton_norms=False), False),
                ("engine: defaults, not compiled", replace(default, compile=False), False),
                ("engine: no CUDA graphs, not compiled", replace(default, cuda_graphs=False, compile=False), False),
                ("engine: no CUDA graphs, not compiled, cuDNN convolutions",
                 replace(default, cuda_graphs=False, compile=False, triton_convs=False), False)]
    return [("engine: CPU defaults, torch's dropout", default, True)] + (
        [("engine: CPU defaults, compiled", replace(default, compile=True), False)] if compiled_cpu else [])


def plain_device_runs(root: Path, device: torch.device, config: TrainConfig) -> Runs:
    """Data on the device (normlab.engine.data), but the textbook step: backward, optimizer.step(),
    .item() every step. Separates what the data pipeline saves from what the step saves."""
    from normlab.engine.data import batch_slices
    from normlab.engine.rng import data_seed
    from normlab.engine.train import evaluate

    runs = Runs("device data, textbook eager step")
    data = DeviceData(load_raw("mnist", root, download=False), device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(data_seed(config.seed))
    model = as_notebook_model(Net("mnist", config.norm)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    steps = -(-data.train_size // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                    steps_per_epoch=steps, pct_start=0.2, cycle_momentum=False)
    for _ in range(config.epochs):
        start = time.perf_counter()
        model.train()
        x, y = data.training_epoch(generator)
        total = 0.0
        for s in batch_slices(len(y), config.batch_size):
            loss = F.nll_loss(model(x[s]), y[s])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        accuracy = evaluate(model, data.test_x, data.test_y).accuracy
        runs.epoch_seconds.append(time.perf_counter() - start)
    runs.accuracies.append(accuracy)
    return runs


if __name__ == "__main__":
    main()
