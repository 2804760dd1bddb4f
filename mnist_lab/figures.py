"""Figures of a run: test digits with their predictions, the misclassified ones, the confusion
matrix (into TensorBoard's IMAGES tab, at test time) and the learning curves (curves.png)."""

import functools
import math
from pathlib import Path

import matplotlib
import matplotlib.axes
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # not pyplot: no backend, no global state, nothing to close
from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Text drawn without hinting costs less to draw (benchmarks/fixed_cost.py: the test figures and
# curves.png) and looks the same at these sizes. matplotlib reads it when a figure is drawn.
DRAWING = {"text.hinting": "none"}


def drawing() -> matplotlib.rc_context:
    """The settings to draw (save, render) this module's figures in."""
    return matplotlib.rc_context(DRAWING)


def to_image(figure: Figure | Image.Image) -> Image.Image:
    """A figure as pixels, drawn once for every place it goes (TensorBoard, MLflow, a PNG file)."""
    if isinstance(figure, Image.Image):
        return figure
    canvas = FigureCanvasAgg(figure)
    with drawing():
        canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])


# A digit grid's layout, in pixels: each digit enlarged SCALE times, a title band of TITLE_ROWS
# above it in a font of FONT_SIZE, GAP beside it.
SCALE, TITLE_ROWS, FONT_SIZE, GAP = 3, 15, 11, 8


def digit_grid(images: torch.Tensor, titles: list[str], columns: int = 8) -> Image.Image:
    """A grid of (N, 1, H, W) images, each in its own gray range and titled above, as one grayscale
    image. Drawn with Pillow: as a matplotlib figure, its titles alone cost more than a warm fit's
    training step (benchmarks/fixed_cost.py: the test figures)."""
    n, _, height, width = images.shape
    rows = max(1, -(-n // columns))
    font = text_font(FONT_SIZE)
    # Cells as wide as the widest title, so that titles never run into each other.
    cell_w = max([width * SCALE, *(math.ceil(font.getlength(title)) for title in titles[:n])]) + GAP
    cell_h = height * SCALE + TITLE_ROWS
    digits = images[:, 0].float().cpu()  # (N, H, W)
    low, high = digits.amin((1, 2), keepdim=True), digits.amax((1, 2), keepdim=True)
    digits = ((digits - low) / (high - low).clamp_min(1e-12) * 255).round().to(torch.uint8)
    grid = Image.new("L", (columns * cell_w, rows * cell_h), 255)
    draw = ImageDraw.Draw(grid)
    for i, digit in enumerate(digits):
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        tile = Image.fromarray(digit.numpy()).resize((width * SCALE, height * SCALE), Image.Resampling.NEAREST)
        grid.paste(tile, (left + (cell_w - width * SCALE) // 2, top + TITLE_ROWS))
        if i < len(titles):  # centred above the digit, its baseline two pixels above it
            draw.text((left + cell_w / 2, top + TITLE_ROWS - 2), titles[i], fill=0, font=font, anchor="ms")
    return grid


def mistakes_figure(
    images: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor
) -> Image.Image:
    """Misclassified digits titled "predicted (confidence), true label"; the confidence rounded
    down, so that a mistake never reads 100%."""
    titles = [
        f"{p} ({math.floor(c * 100)}%), true {t}"
        for p, t, c in zip(predicted.tolist(), labels.tolist(), confidence.tolist(), strict=True)
    ]
    return digit_grid(images, titles)


def confusion_figure(matrix: torch.Tensor) -> Image.Image:
    """The confusion matrix as a heatmap, each non-zero cell with its count. matplotlib draws the
    chart; the counts are drawn onto it with Pillow, in matplotlib's font: as a hundred matplotlib
    texts they would cost more than the rest of the figure (benchmarks/fixed_cost.py)."""
    fig = Figure(figsize=(5.4, 5))
    ax = fig.subplots()
    ax.imshow(matrix.cpu().numpy(), cmap="Blues")  # no colorbar: every cell prints its count
    n = len(matrix)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    ax.set_title("confusion matrix (test)", y=1.0)  # y given: matplotlib does not measure the ticks to place it
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)  # fixed: tight_layout costs as much as drawing
    image = to_image(fig)  # drawn: the axes now hold their final place, with the aspect applied
    draw = ImageDraw.Draw(image)
    font = text_font(round(COUNT_POINTS * fig.dpi / 72))
    for x, y, text, color in count_labels(ax, matrix, image.height):
        draw.text((x, y), text, fill=color, font=font, anchor="mm")
    return image


COUNT_POINTS = 7  # the confusion matrix's counts, in points


def count_labels(ax: matplotlib.axes.Axes, matrix: torch.Tensor, height: int) -> list[tuple[float, float, str, str]]:
    """(x, y, count, colour) of each non-zero cell of a drawn heatmap of `matrix` in `ax`, in the
    pixels of its image (`height` high, from the top left); white on the darker half of the scale."""
    dark = matrix.max().item() / 2
    labels = []
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(len(matrix)), torch.arange(len(matrix))).tolist(),
        matrix.flatten().tolist(),
        strict=True,
    ):
        if count:
            x, y = ax.transData.transform((j, i))  # display pixels, from the bottom left
            labels.append((float(x), height - float(y), str(count), "white" if count > dark else "black"))
    return labels


@functools.lru_cache(maxsize=4)
def text_font(pixels: int) -> ImageFont.FreeTypeFont:
    """matplotlib's own sans-serif font (DejaVu Sans, which ships with it), `pixels` high, for Pillow."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), pixels)


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
        ax.set_title(title, y=1.0)  # see confusion_figure
        ax.set_xlabel("step")
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
