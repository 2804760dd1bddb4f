"""LeNet-5 on one GPU with the whole data set in GPU memory: mnist_lab against a plain PyTorch loop.

    python benchmarks/gpu.py [--epochs 5] [--data-dir DIR] [--device cuda] [OVERRIDE ...]

(a) mnist_lab: `mnist_lab.recipe.run` with trainer=gpu and data.on_device=true (batches are
    index_selects on the GPU), the default callbacks and logger, plus any Hydra OVERRIDEs
    (e.g. data.batch_size=512 optimizer.lr=0.2, or compile=true for the captured step).
(b) plain PyTorch: the same LeNet, optimizer and OneCycle schedule in a bare, eager loop over
    the same GPU tensors, normalized per batch as mnist_lab does, drawing the same batches in
    the same order (mnist_lab's sampler, on a CPU generator seeded as the data module seeds it).

Prints, for each: the training time of every epoch (validation and the test checks left out,
the GPU synchronized at each epoch's end), images/s, test accuracy after each epoch and the
training time to 99% test accuracy. (a) runs first, then (b): on a GPU machine to oneself the
two are steady enough to compare; run it twice to see the spread. --device cpu runs the same
code on the CPU, to check the script where there is no GPU.
"""

import argparse
import itertools
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from epoch_time import test_accuracy, time_to  # the CPU benchmark beside this file
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mnist_lab.callbacks import synchronize
from mnist_lab.data import BatchIndices
from mnist_lab.defaults import default_data_dir
from mnist_lab.models.base import fast_layout
from mnist_lab.recipe import run

CONF = Path(__file__).resolve().parents[1] / "conf"


class EpochCheck(pl.Callback):
    """(a)'s test accuracy after each epoch, inside the validation window that EpochTimer leaves
    out (EpochTimer waits for the GPU itself before each reading of its clock)."""

    def __init__(self) -> None:
        self.accuracies: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            datamodule = trainer.datamodule
            datamodule.setup("test")
            self.accuracies.append(test_accuracy(pl_module, datamodule))


CHECK = EpochCheck()


def current_check() -> EpochCheck:
    return CHECK


def steps_per_epoch(cfg, images: int) -> int:
    """Batches in an epoch, fewer with an integer trainer.limit_train_batches (as Lightning reads it)."""
    steps = -(-images // cfg.data.batch_size)
    limit = cfg.trainer.get("limit_train_batches")
    return min(steps, limit) if isinstance(limit, int) else steps


def plain_loop(cfg, datamodule, epochs: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(b): per-epoch training times and test accuracies of a bare loop over GPU tensors."""
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model, optimizer=None, scheduler=None, _recursive_=False, _convert_="all").to(device)
    fast_layout(model, device)  # as mnist_lab's run lays it out: both arms compute alike
    optimizer = instantiate(cfg.optimizer, params=model.parameters())
    batch_size = cfg.data.batch_size
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    steps = steps_per_epoch(cfg, len(labels))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.optimizer.lr,
        total_steps=epochs * steps,
        pct_start=cfg.scheduler.pct_start,
        cycle_momentum=cfg.scheduler.cycle_momentum,
    )
    # mnist_lab's batch order: the data module's sampler on a CPU generator seeded as it seeds its
    # own, each index batch moved to the device as its in-memory dataset does. Both arms then train
    # on the same batches in the same order, on a GPU as on the CPU.
    batches = BatchIndices(len(labels), batch_size, torch.Generator().manual_seed(cfg.data.seed))
    times, accuracies = [], []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        for idx in itertools.islice(batches, steps):
            idx = idx.to(device, non_blocking=True)
            x, y = datamodule.on_after_batch_transfer([images.index_select(0, idx), labels.index_select(0, idx)], 0)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        accuracies.append(test_accuracy(model, datamodule))
    return times, accuracies


def report(label: str, times: list[float], accuracies: list[float], images: int) -> None:
    print(
        f"{label}: epochs {[round(t, 3) for t in times]} s, median {statistics.median(times):.3f} s, "
        f"{images / statistics.median(times):,.0f} images/s"
    )
    print(
        f"    test accuracy after each epoch {[round(a, 4) for a in accuracies]}; "
        f"training time to 99%: {time_to(0.99, times, accuracies)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for both, e.g. data.batch_size=512 optimizer.lr=0.2"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "Error: PyTorch sees no CUDA GPU here: run this on a GPU machine, or pass --device cpu to check the script"
        )
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    device = torch.device(args.device)

    overrides = [
        "model=lenet",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.max_epochs={args.epochs}",
        f"data.data_dir={args.data_dir}",
        "data.download=false",
        "data.on_device=true",
        "+callbacks.epoch_check._target_=__main__.current_check",
        *args.overrides,
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        metrics = run(cfg, out_dir)
    lab_times = metrics["epoch_train_time_s"]

    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    datamodule.setup("test")
    datamodule.train_set, datamodule.test_set = datamodule.train_set.to(device), datamodule.test_set.to(device)
    plain_times, plain_accuracies = plain_loop(cfg, datamodule, args.epochs, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    images = len(datamodule.train_set)
    print(
        f"\nLeNet-5, batch {cfg.data.batch_size}, {args.epochs} epochs, {images} training images, data on the "
        f"{device.type}; {name}; torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    trained = min(images, steps_per_epoch(cfg, images) * cfg.data.batch_size)  # per epoch
    report("(a) mnist_lab    ", lab_times, CHECK.accuracies, trained)
    report("(b) plain PyTorch", plain_times, plain_accuracies, trained)
    print(
        f"a/b = {sum(lab_times) / sum(plain_times):.2f}; mnist_lab's final test/acc (best checkpoint) "
        f"{metrics['test/acc']:.4f}"
        + (f"; capture (warm-up and recording) {metrics['capture_time_s']:.2f} s" if cfg.compile else "")
    )
    if args.json:
        figures = {
            "device": name,
            "batch_size": cfg.data.batch_size,
            "compile": cfg.compile,
            "a_epoch_s": lab_times,
            "b_epoch_s": plain_times,
            "a/b": sum(lab_times) / sum(plain_times),
            "test/acc": metrics["test/acc"],
            "capture_time_s": metrics.get("capture_time_s"),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
