"""Figures of a run: test digits with their predictions, the misclassified ones, the confusion
matrix (into TensorBoard's IMAGES tab, at test time) and the learning curves (curves.png)."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure  # not pyplot: no backend, no global state, nothing to close
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassConfusionMatrix


def digit_grid(images: torch.Tensor, titles: list[str], columns: int = 8) -> Figure:
    """A grid of (N, 1, 28, 28) images, each titled."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(columns * 1.1, rows * 1.3))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image[0].cpu().numpy(), cmap="gray")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
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


class TestFigures(pl.Callback):
    """At test time, logs sample digits with predicted/true labels, the most confidently wrong
    digits and the confusion matrix to TensorBoard (the notebook's classify_an_example, and more)."""

    def __init__(self, samples: int = 32) -> None:
        self.samples = samples

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(pl_module.device)
        self.first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.wrong: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs: torch.Tensor, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        confidence, predicted = outputs.softmax(1).max(1)
        self.confusion.update(predicted, labels)
        if self.first is None:
            self.first = images[: self.samples], predicted[: self.samples], labels[: self.samples]
        wrong = predicted != labels
        # Keep only the most confident mistakes so far: memory stays at `samples` images.
        self.wrong.append((images[wrong], predicted[wrong], labels[wrong], confidence[wrong]))
        images, predicted, labels, confidence = (torch.cat(t) for t in zip(*self.wrong))
        top = confidence.argsort(descending=True)[: self.samples]
        self.wrong = [(images[top], predicted[top], labels[top], confidence[top])]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.logger, TensorBoardLogger) or self.first is None:
            return
        writer, step = trainer.logger.experiment, trainer.global_step
        images, predicted, labels = self.first
        writer.add_figure("test/samples", digit_grid(images, [f"{p} (true {t})" for p, t in zip(predicted.tolist(), labels.tolist())]), step)
        writer.add_figure("test/misclassified", mistakes_figure(*self.wrong[0]), step)
        writer.add_figure("test/confusion_matrix", confusion_figure(self.confusion.compute()), step)


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
