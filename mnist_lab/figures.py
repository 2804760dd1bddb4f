"""Figures of a run: test digits with their predictions, the misclassified ones, the confusion
matrix (into TensorBoard's IMAGES tab, at test time) and the learning curves (curves.png)."""

from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure  # not pyplot: no backend, no global state, nothing to close
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassConfusionMatrix

TITLE_ROWS, GAP = 9, 3  # pixels of a digit grid's mosaic: above each digit for its title, beside it


def digit_grid(images: torch.Tensor, titles: list[str], columns: int = 8) -> Figure:
    """A grid of (N, 1, H, W) images, each titled: one mosaic in one Axes (32 Axes took 0.5 s to
    draw on a 2-core CPU, this a tenth of that)."""
    n, _, height, width = images.shape
    rows = max(1, -(-n // columns))
    cell_h, cell_w = height + TITLE_ROWS, width + GAP  # a title band above each digit, a gap beside
    # NaN is the background between digits (drawn white); each digit keeps its own gray range.
    mosaic = torch.full((rows * cell_h, columns * cell_w), float("nan"))
    for i, image in enumerate(images[:, 0].float().cpu()):
        top, left = (i // columns) * cell_h + TITLE_ROWS, (i % columns) * cell_w
        low, high = image.min(), image.max()
        mosaic[top : top + height, left : left + width] = (image - low) / (high - low).clamp_min(1e-12)
    fig = Figure(figsize=(columns * 1.1, rows * 1.3))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    for i, title in enumerate(titles[:n]):
        ax.text((i % columns) * cell_w + width / 2 - 0.5, (i // columns) * cell_h + TITLE_ROWS - 1.5, title,
                ha="center", va="bottom", fontsize=8)
    return fig


def mistakes_figure(images: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> Figure:
    """Misclassified digits titled "predicted (confidence), true label"."""
    titles = [f"{p} ({c:.0%}), true {t}" for p, t, c in zip(predicted.tolist(), labels.tolist(), confidence.tolist())]
    return digit_grid(images, titles)


def confusion_figure(matrix: torch.Tensor) -> Figure:
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(matrix.cpu().numpy(), cmap="Blues")
    n = len(matrix)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    for (i, j), count in zip(torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), matrix.flatten().tolist()):
        if count:
            ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


Mistakes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, predicted, labels, confidence


def most_confident(mistakes: Mistakes, count: int) -> Mistakes:
    """The `count` mistakes of highest confidence, most confident first."""
    top = mistakes[3].argsort(descending=True)[:count]
    return tuple(t[top] for t in mistakes)


def gather_mistakes(mistakes: Mistakes, count: int, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> Mistakes:
    """The most confident of every process's mistakes (DDP). Each process pads its own to `count`,
    as all_gather needs the same shapes everywhere; padding has confidence -1 and is dropped."""
    pad = count - len(mistakes[3])
    padded = [torch.cat([t, t.new_full((pad, *t.shape[1:]), -1 if i == 3 else 0)]) for i, t in enumerate(mistakes)]
    gathered = [all_gather(t).flatten(0, 1) for t in padded]  # (processes * count, ...)
    real = gathered[3] >= 0
    return most_confident(tuple(t[real] for t in gathered), count)


class TestFigures(pl.Callback):
    """At test time, logs sample digits with predicted/true labels, the most confidently wrong
    digits and the confusion matrix to TensorBoard (the notebook's classify_an_example, and more).
    In DDP the confusion matrix and the mistakes cover every process's share of the test set; the
    sample digits are the first process's."""

    def __init__(self, samples: int = 32) -> None:
        self.samples = samples

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(pl_module.device)
        self.first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.wrong: Mistakes | None = None

    def on_test_batch_end(self, trainer, pl_module, outputs: torch.Tensor, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        confidence, predicted = outputs.softmax(1).max(1)
        self.confusion.update(predicted, labels)
        if self.first is None:
            self.first = images[: self.samples], predicted[: self.samples], labels[: self.samples]
        wrong = predicted != labels
        batch_mistakes = (images[wrong], predicted[wrong], labels[wrong], confidence[wrong])
        # Keep only the most confident mistakes so far: memory stays at `samples` images.
        if self.wrong is not None:
            batch_mistakes = tuple(torch.cat(pair) for pair in zip(self.wrong, batch_mistakes))
        self.wrong = most_confident(batch_mistakes, self.samples)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.logger, TensorBoardLogger) or self.first is None:
            return
        matrix = self.confusion.compute()  # torchmetrics sums it over the DDP processes
        mistakes = self.wrong
        if trainer.world_size > 1:  # each process has tested its share of the test set
            mistakes = gather_mistakes(mistakes, self.samples, pl_module.all_gather)
        if not trainer.is_global_zero:
            return
        writer, step = trainer.logger.experiment, trainer.global_step
        images, predicted, labels = self.first
        writer.add_figure("test/samples", digit_grid(images, [f"{p} (true {t})" for p, t in zip(predicted.tolist(), labels.tolist())]), step)
        writer.add_figure("test/misclassified", mistakes_figure(*mistakes), step)
        writer.add_figure("test/confusion_matrix", confusion_figure(matrix), step)


def plot_curves(run_dir: Path, log_dir: Path | None = None) -> Path:
    """run_dir/curves.png from the event files in log_dir (default run_dir): training loss,
    validation loss and validation accuracy."""
    events = EventAccumulator(str(log_dir or run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    panels = [("train/loss", "training loss"), ("val/loss", "validation loss"), ("val/acc", "validation accuracy")]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (tag, title) in zip(axes, panels):
        if tag in tags:
            points = events.Scalars(tag)
            ax.plot([p.step for p in points], [p.value for p in points], marker="." if len(points) < 50 else None)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    return path
