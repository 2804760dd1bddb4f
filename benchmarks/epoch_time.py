"""Per-epoch training time and framework cost per step, three ways side by side in one run.

    python benchmarks/epoch_time.py [--epochs 5] [--data-dir DIR] [OVERRIDE ...]

(a) mnist_lab: `mnist_lab.recipe.run` with the default config (progress bar, TensorBoard logger,
    checkpoints, LR monitor), LeNet-5 unless an OVERRIDE says otherwise, on the CPU.
(b) plain PyTorch: the same model, optimizer and OneCycle schedule in a bare loop over the same
    in-memory uint8 tensors, normalized per batch as mnist_lab does.
(a0) Lightning's floor: the same training in a minimal LightningModule, no logger, callbacks,
    progress bar or validation; it shows what Lightning's loop costs before mnist_lab adds anything.
(c) the notebook's pipeline: torchvision's MNIST with per-sample ToTensor + Normalize through a
    DataLoader (batch 64, shuffle, num_workers=1, pin_memory=True), same model and optimizer.

Shared machines drift by tens of percent within a minute, so the arms take turns in windows of
--window steps: a window of (a), as many steps of (b), a window of (a0), as many steps of a
second (b), and so on. Each ratio compares neighbouring windows. (a0) trains in a greenlet, a
second Python stack in the same OS thread: in a second thread, its own OpenMP team would make
every torch op of the first thread 3-4x slower on a 2-core machine. Validation and the
test-accuracy checks after each epoch are left out of every time.

Prints the per-epoch times, a/b, a0/b and c/a, microseconds per training step of each arm and
the excess of (a) and of (a0) over (b) per step (with model=softmax, whose arithmetic is a few
microseconds a step, that is the framework's cost per step: the CPU proxy for a GPU's host-bound
step), the time each data pipeline alone takes for an epoch of batches, and the training time
(a) and (b) need to reach 99% test accuracy.
"""

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torchvision import datasets, transforms

from mnist_lab.defaults import MNIST_MEAN, MNIST_STD, default_data_dir
from mnist_lab.models.base import fast_layout
from mnist_lab.recipe import run

CONF = Path(__file__).resolve().parents[1] / "conf"


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, datamodule) -> float:
    was_training = model.training
    model.eval()
    data = datamodule.test_set
    x, y = datamodule.on_after_batch_transfer([data.images, data.labels], 0)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return accuracy


def one_cycle(cfg, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.optimizer.lr,
        total_steps=total_steps,
        pct_start=cfg.scheduler.pct_start,
        cycle_momentum=cfg.scheduler.cycle_momentum,
    )


class PlainLoop:
    """(b): the same model, optimizer and OneCycle schedule in a bare loop over the same tensors."""

    def __init__(self, cfg, datamodule, epochs: int) -> None:
        torch.manual_seed(cfg.seed)
        self.datamodule, self.batch_size = datamodule, cfg.data.batch_size
        self.model = instantiate(cfg.model, optimizer=None, scheduler=None, _recursive_=False, _convert_="all")
        fast_layout(self.model, "cpu")  # as mnist_lab's run lays it out: the arms compute alike
        self.optimizer = instantiate(cfg.optimizer, params=self.model.parameters())
        self.steps_per_epoch = -(-len(datamodule.train_set) // self.batch_size)
        self.scheduler = one_cycle(cfg, self.optimizer, epochs * self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batches = iter(())
        self.accuracies: list[float] = []  # after each epoch

    def steps(self, n: int) -> float:
        """Train n steps; return their wall time, without the test check at an epoch's end."""
        data, elapsed = self.datamodule.train_set, 0.0
        for _ in range(n):
            start = time.perf_counter()
            idx = next(self.batches, None)
            if idx is None:
                self.batches = iter(torch.randperm(len(data), generator=self.generator).split(self.batch_size))
                idx = next(self.batches)
            x, y = self.datamodule.on_after_batch_transfer(list(data[idx]), 0)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            elapsed += time.perf_counter() - start
            if self.scheduler.last_epoch % self.steps_per_epoch == 0:
                self.accuracies.append(test_accuracy(self.model, self.datamodule))
        return elapsed


class SideBySide(pl.Callback):
    """Alternates windows of a Lightning training with as many steps of the plain loop, then calls
    `hand_over` (which lets another training run its window) before the next window."""

    def __init__(self, plain: PlainLoop, window: int, hand_over: Callable[[], None] = lambda: None) -> None:
        self.plain, self.window, self.hand_over = plain, window, hand_over
        self.lab_times: list[float] = []  # per epoch
        self.plain_times: list[float] = []
        self.steps = 0
        self.accuracies: list[float] = []  # the Lightning training's, after each epoch
        self.failure: list[BaseException] = []  # raised in its greenlet, to raise again after (a)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lab_times.append(0.0)
        self.plain_times.append(0.0)
        self.mark, self.steps_since = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.steps_since += 1
        if self.steps_since == self.window or batch_idx + 1 == trainer.num_training_batches:
            self.lab_times[-1] += time.perf_counter() - self.mark
            self.plain_times[-1] += self.plain.steps(self.steps_since)
            self.steps += self.steps_since
            self.hand_over()
            self.mark, self.steps_since = time.perf_counter(), 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.accuracies.append(test_accuracy(pl_module, self.plain.datamodule))

    def per_step_us(self) -> tuple[float, float]:
        """Microseconds per step of the Lightning training and of its plain loop."""
        return 1e6 * sum(self.lab_times) / self.steps, 1e6 * sum(self.plain_times) / self.steps


class LightningFloor(pl.LightningModule):
    """(a0): the same net, optimizer and schedule in the least a LightningModule needs, to show
    what Lightning's loop costs by itself, before anything mnist_lab adds."""

    def __init__(self, cfg, total_steps: int) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.cfg, self.total_steps = cfg, total_steps
        self.net = fast_layout(
            instantiate(cfg.model, optimizer=None, scheduler=None, _recursive_=False, _convert_="all").net, "cpu"
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> dict:
        optimizer = instantiate(self.cfg.optimizer, params=self.parameters())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": one_cycle(self.cfg, optimizer, self.total_steps), "interval": "step"},
        }


def lightning_floor(cfg, datamodule, epochs: int, window: int):
    """(a0), with no logger, callbacks, progress bar or validation, ready to run in a greenlet
    that hands back to its parent after each of its windows; its own plain loop beside it."""
    from greenlet import greenlet  # here: gpu.py imports this module where greenlet is not installed

    parent = greenlet.getcurrent()
    side = SideBySide(PlainLoop(cfg, datamodule, epochs), window, parent.switch)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[side],
    )
    model = LightningFloor(cfg, epochs * side.plain.steps_per_epoch)

    def train() -> None:
        try:
            trainer.fit(model, datamodule=datamodule)
        except BaseException as e:  # raised again by main, after (a)
            side.failure.append(e)

    return side, greenlet(train)


def notebook_loader(cfg, data_dir: str) -> torch.utils.data.DataLoader:
    """(c)'s data: the notebook's per-sample ToTensor + Normalize and its DataLoader settings."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    return torch.utils.data.DataLoader(
        datasets.MNIST(data_dir, train=True, download=False, transform=transform),
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=1,
        pin_memory=True,
    )


def notebook_epochs(cfg, data_dir: str, epochs: int) -> list[float]:
    """(c): the notebook's pipeline training the same model with the same optimizer."""
    torch.manual_seed(cfg.seed)
    model = fast_layout(
        instantiate(cfg.model, optimizer=None, scheduler=None, _recursive_=False, _convert_="all"), "cpu"
    )
    optimizer = instantiate(cfg.optimizer, params=model.parameters())
    loader = notebook_loader(cfg, data_dir)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def data_epoch(batches, prepare=lambda batch: batch) -> float:
    """Seconds to produce one epoch of ready batches, with no model."""
    start = time.perf_counter()
    for batch in batches:
        prepare(batch)
    return time.perf_counter() - start


def time_to(threshold: float, epoch_times: list[float], accuracies: list[float]) -> str:
    elapsed = 0.0
    for seconds, accuracy in zip(epoch_times, accuracies, strict=True):
        elapsed += seconds
        if accuracy >= threshold:
            return f"{elapsed:.2f} s"
    return f"not reached in {len(accuracies)} epochs (best {max(accuracies):.4f})"


def main() -> None:
    global SIDE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for mnist_lab's run, e.g. model=softmax")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of (a), (a0) and (b); the default config's 5")
    parser.add_argument("--window", type=int, default=20, help="steps per alternation of the arms")
    parser.add_argument("--no-floor", action="store_true", help="leave (a0) out")
    parser.add_argument("--notebook-epochs", type=int, default=1, help="epochs of (c); 0 skips it")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)

    # The side-by-side callback rides along through the config, as a user's own callback would.
    overrides = [
        "model=lenet",
        "trainer=cpu",
        f"trainer.max_epochs={args.epochs}",
        f"data.data_dir={args.data_dir}",
        "data.download=false",
        "+callbacks.side_by_side._target_=__main__.current_side",
        *args.overrides,
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides)
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")  # data.augment stays plain data
    datamodule.setup("fit")
    datamodule.setup("test")
    floor, floor_run = (None, None) if args.no_floor else lightning_floor(cfg, datamodule, args.epochs, args.window)
    # (A greenlet is false until started: compare with None.)
    hand_over = (lambda: floor_run.dead or floor_run.switch()) if floor_run is not None else (lambda: None)
    side = SIDE = SideBySide(PlainLoop(cfg, datamodule, args.epochs), args.window, hand_over)
    with tempfile.TemporaryDirectory() as out_dir:
        run(cfg, out_dir)
    while floor_run is not None and not floor_run.dead:  # (a0)'s last steps, if any
        floor_run.switch()
    if floor is not None and floor.failure:
        raise floor.failure[0]
    notebook = notebook_epochs(cfg, args.data_dir, args.notebook_epochs) if args.notebook_epochs else []
    lab_data = data_epoch(datamodule.train_dataloader(), lambda batch: datamodule.on_after_batch_transfer(batch, 0))
    notebook_data = data_epoch(notebook_loader(cfg, args.data_dir)) if args.notebook_epochs else None

    a, b = statistics.median(side.lab_times), statistics.median(side.plain_times)
    model = cfg.model._target_.rsplit(".", 1)[-1]
    print(
        f"\n{model}, batch {cfg.data.batch_size}, {args.epochs} epochs, windows of {args.window} steps; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    print(f"(a) mnist_lab       median epoch {a:6.3f} s   epochs {[round(t, 2) for t in side.lab_times]}")
    print(f"(b) plain PyTorch   median epoch {b:6.3f} s   epochs {[round(t, 2) for t in side.plain_times]}")
    if notebook:
        c = statistics.median(notebook)
        print(f"(c) notebook loader median epoch {c:6.3f} s   epochs {[round(t, 2) for t in notebook]}")
    print(
        f"data alone, one epoch of batches: mnist_lab {lab_data:.3f} s"
        + (f", notebook loader {notebook_data:.3f} s" if notebook_data is not None else "")
    )
    a_b = sum(side.lab_times) / sum(side.plain_times)
    print(f"a/b = {a_b:.3f}   (target <= 1.15)")
    if floor is not None:
        a0_b = sum(floor.lab_times) / sum(floor.plain_times)
        print(
            f"a0/b = {a0_b:.3f}  (a0: the same training in a minimal LightningModule with no logger, callbacks or "
            f"validation, in windows between those of (a), each beside (b))"
        )
        (a_us, b_us), (a0_us, b0_us) = side.per_step_us(), floor.per_step_us()
        print(
            f"per training step: (a) {a_us:.0f} us, (a0) {a0_us:.0f} us, (b) {b_us:.0f} us beside (a) and "
            f"{b0_us:.0f} us beside (a0)"
        )
        # Each excess against the plain steps of its own neighbouring windows, in the same units.
        b_mean = (b_us + b0_us) / 2
        excess, floor_excess = (a_b - 1) * b_mean, (a0_b - 1) * b_mean
        print(
            f"excess over (b) per step: mnist_lab {excess:.0f} us, Lightning's floor {floor_excess:.0f} us; "
            f"mnist_lab's excess / Lightning's = {excess / floor_excess:.2f}   (target <= 1.25)"
        )
    if notebook:
        print(f"c/a = {c / a:.2f}    (target >= 1.5)")
    print(
        f"test accuracy after each epoch: (a) {[round(x, 4) for x in side.accuracies]}"
        f"  (b) {[round(x, 4) for x in side.plain.accuracies]}"
    )
    print(
        f"training time to 99% test accuracy: (a) {time_to(0.99, side.lab_times, side.accuracies)}"
        f"   (b) {time_to(0.99, side.plain_times, side.plain.accuracies)}"
    )


def current_side() -> SideBySide:
    return SIDE


if __name__ == "__main__":
    main()
