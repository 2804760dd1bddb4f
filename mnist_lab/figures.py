"""Figures of a run: test digits with their predictions, the misclassified ones, the confusion
matrix (into TensorBoard's IMAGES tab, at test time) and the learning curves (curves.png)."""

from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure  # not pyplot: no backend, no global state, nothing to close
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Text drawn without hinting costs less to draw (benchmarks/fixed_cost.py: the test figures and
# curves.png) and looks the same at these sizes. matplotlib reads it when a figure is drawn.
DRAWING = {"text.hinting": "none"}


def drawing() -> matplotlib.rc_context:
    """The settings to draw (save, render) this module's figures in."""
    return matplotlib.rc_context(DRAWING)


TITLE_ROWS, GAP = 9, 3  # pixels of a digit grid's mosaic: above each digit for its title, beside it


def digit_grid(images: torch.Tensor, titles: list[str], columns: int = 8) -> Figure:
    """A grid of (N, 1, H, W) images, each titled: one mosaic in one Axes, which draws many times
    faster than an Axes per digit."""
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
        ax.text(
            (i % columns) * cell_w + width / 2 - 0.5,
            (i // columns) * cell_h + TITLE_ROWS - 1.5,
            title,
            ha="center",
            va="bottom",
            fontsize=8,
        )
    return fig


def mistakes_figure(
    images: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor
) -> Figure:
    """Misclassified digits titled "predicted (confidence), true label"."""
    titles = [
        f"{p} ({c:.0%}), true {t}"
        for p, t, c in zip(predicted.tolist(), labels.tolist(), confidence.tolist(), strict=True)
    ]
    return digit_grid(images, titles)


def confusion_figure(matrix: torch.Tensor) -> Figure:
    fig = Figure(figsize=(5.4, 5))
    ax = fig.subplots()
    ax.imshow(matrix.cpu().numpy(), cmap="Blues")  # no colorbar: every cell prints its count
    n = len(matrix)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), matrix.flatten().tolist(), strict=True
    ):
        if count:
            ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    fig.subplots_adjust(
        left=0.1, right=0.97, bottom=0.1, top=0.93
    )  # fixed margins: tight_layout costs as much as the drawing
    return fig


Mistakes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, predicted, labels, confidence


def most_confident(mistakes: Mistakes, count: int) -> Mistakes:
    """The `count` mistakes of highest confidence, most confident first."""
    top = mistakes[3].argsort(descending=True)[:count]
    return tuple(t[top] for t in mistakes)


def plot_curves(run_dir: Path, log_dir: Path | None = None) -> Path:
    """run_dir/curves.png from the event files in log_dir (default run_dir)."""
    path = run_dir / "curves.png"
    with drawing():
        curves_figure(log_dir or run_dir).savefig(path, dpi=100)
    return path


def curves_figure(log_dir: Path) -> Figure:
    """Training loss, validation loss and validation accuracy over the steps, from the event files in log_dir."""
    scalars = read_scalars(log_dir)
    panels = [("train/loss", "training loss"), ("val/loss", "validation loss"), ("val/acc", "validation accuracy")]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (tag, title) in zip(axes, panels, strict=True):
        # A run shorter than trainer.log_every_n_steps has only the epochs' mean training loss.
        if points := scalars.get(tag) or scalars.get(f"{tag}_epoch"):
            ax.plot(
                [step for step, _ in points], [value for _, value in points], marker="." if len(points) < 50 else None
            )
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.91, wspace=0.2)  # fixed: see confusion_figure
    return fig


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of log_dir, as (step, value) pairs in order (a
    resumed run's steps after its checkpoint are the resumed process's)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(p.step, p.value) for p in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def epoch_history(log_dir: Path, epoch_seconds: list[float]) -> list[dict[str, float | int | None]]:
    """One dict per validated epoch: epoch (from 1), train/loss (the epoch's mean, as its console
    line says, from train/loss_epoch; without that, the mean of the train/loss values logged in the
    epoch), val/loss, val/acc, lr (the last of the epoch) and seconds (`epoch_seconds`, the run's
    training time per epoch, where known)."""
    scalars = read_scalars(log_dir)
    history, start = [], -1
    # Lightning logs an epoch's validation at the step of its last training step.
    for epoch, (end, acc) in enumerate(scalars.get("val/acc", [])):
        losses = [value for step, value in scalars.get("train/loss_epoch", []) if start < step <= end] or [
            value for step, value in scalars.get("train/loss", []) if start < step <= end
        ]
        val_loss = next((value for step, value in scalars.get("val/loss", []) if step == end), None)
        lrs = [value for step, value in scalars.get("train/lr", []) if step <= end]
        history.append(
            {
                "epoch": epoch + 1,
                "train/loss": sum(losses) / len(losses) if losses else None,
                "val/loss": val_loss,
                "val/acc": acc,
                "lr": lrs[-1] if lrs else None,
                "seconds": epoch_seconds[epoch] if epoch < len(epoch_seconds) else None,
            }
        )
        start = end
    return history
