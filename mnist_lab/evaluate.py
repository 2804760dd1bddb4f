"""Evaluate a checkpoint on the official test set, and how it copes with distorted digits.

    python -m mnist_lab.evaluate --ckpt PATH [--robustness] [--dataset fashion_mnist] [--data-dir DIR]

writes evaluation.json, confusion_matrix.png, misclassified.png (and robustness.png) into a new
folder under outputs/evaluations/ (or --out), logs them to TensorBoard there, and prints it.
"""

import argparse
import fnmatch
import json
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

from mnist_lab.augment import affine
from mnist_lab.checkpoint import datamodule_for, load_checkpoint
from mnist_lab.data import dataset_name, normalize
from mnist_lab.defaults import default_data_dir
from mnist_lab.errors import InputError, one_line_errors
from mnist_lab.figures import confusion_figure, mistakes_figure, most_confident, to_image
from mnist_lab.loggers import add_image
from mnist_lab.run_folder import ensure_writable

OUTPUTS = ("evaluation.json", "confusion_matrix.png", "misclassified.png", "robustness.png", "events.out.tfevents.*")
NOISE_STD = 0.3  # Gaussian noise, in units of the pixel range [0, 1]


def _noise(images: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(images.device).manual_seed(0)  # the same noise for every model
    noise = torch.randn(images.shape, generator=generator, device=images.device) * (255 * NOISE_STD)
    return (images + noise).clamp_(0, 255)


# Distortions of raw test images (floats, 0 = black background, 255 = white ink).
DISTORTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "clean": lambda x: x,
    "transpose": lambda x: x.transpose(-1, -2),  # the notebook's closing example
    "rotate 15": partial(affine, angle=15.0),
    "rotate 30": partial(affine, angle=30.0),
    "rotate 45": partial(affine, angle=45.0),
    "shift 2": partial(affine, translate=(2.0, 2.0)),  # right and down
    "shift 4": partial(affine, translate=(4.0, 4.0)),
    "scale 0.8": partial(affine, scale=0.8),
    "scale 1.2": partial(affine, scale=1.2),
    f"noise {NOISE_STD}": _noise,
    "invert": lambda x: 255 - x,
}


@torch.inference_mode()
def logits_of(
    model: torch.nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int = 1000
) -> torch.Tensor:
    """(N, C) logits of raw (N, 1, 28, 28) images (0-255), normalized as in training."""
    device = next(model.parameters()).device
    out = [model(normalize(batch.to(device), mean, std)) for batch in images.split(batch_size)]
    return torch.cat(out)


def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, batch_size: int = 1000
) -> tuple[dict[str, Any], torch.Tensor]:
    """Accuracy, loss (the model's training loss; cross-entropy for an ONNX file), per-class accuracy
    and the confusion matrix; and the logits."""
    logits = logits_of(model, images, mean, std, batch_size)
    criterion = getattr(model, "criterion", F.cross_entropy)
    labels = labels.to(logits.device)
    classes = logits.shape[1]
    metrics = {
        "test/acc": multiclass_accuracy(logits, labels, classes, average="micro").item(),
        "test/loss": criterion(logits, labels).item(),
        "per_class_acc": {
            str(c): a for c, a in enumerate(multiclass_accuracy(logits, labels, classes, average=None).tolist())
        },
        "confusion_matrix": multiclass_confusion_matrix(logits, labels, classes).tolist(),
    }
    return metrics, logits


def robustness(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, batch_size: int = 1000
) -> dict[str, float]:
    """Test accuracy under each of DISTORTIONS."""
    device = next(model.parameters()).device
    raw = images.to(device).float()
    labels = labels.to(device)
    return {
        name: multiclass_accuracy(
            logits_of(model, distort(raw), mean, std, batch_size), labels, model.hparams.num_classes, average="micro"
        ).item()
        for name, distort in DISTORTIONS.items()
    }


def misclassified_figure(
    images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, count: int = 32
) -> Image.Image:
    """The most confidently wrong digits, most confident first."""
    confidence, predicted = (t.cpu() for t in logits.softmax(1).max(1))
    labels = labels.cpu()
    wrong = predicted != labels
    return mistakes_figure(*most_confident((images[wrong], predicted[wrong], labels[wrong], confidence[wrong]), count))


def robustness_figure(accuracy: dict[str, float]) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    names = list(accuracy)
    bars = ax.barh(names[::-1], [accuracy[n] for n in names][::-1], color="tab:blue")
    ax.bar_label(bars, labels=[f"{accuracy[n]:.2%}" for n in names][::-1], padding=3, fontsize=8)
    ax.set(xlim=(0, 1.1), xlabel="test accuracy", title="test accuracy under distortions")
    return fig


def default_out_dir(model_name: str) -> Path:
    return Path("outputs/evaluations") / datetime.now().strftime(f"%Y-%m-%d/%H-%M-%S.%f_{model_name.lower()}")


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the official test set.")
    parser.add_argument("--ckpt", required=True, type=Path, help="a .ckpt file that train.py wrote")
    parser.add_argument("--dataset", help="mnist or fashion_mnist (default: the checkpoint's own)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="folder holding <Dataset>/raw/*-ubyte (default: $MNIST_LAB_DATA or ./data)",
    )
    parser.add_argument(
        "--robustness",
        action="store_true",
        help="also test on transposed, rotated, shifted, scaled, noisy and inverted digits",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: a new one under outputs/evaluations)")
    parser.add_argument("--batch-size", type=int, default=1000)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    with one_line_errors():
        run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, data_hparams = load_checkpoint(args.ckpt, device)
    out_dir = args.out or default_out_dir(type(model).__name__)
    check_out_dir(out_dir)  # before any work
    datamodule = datamodule_for(data_hparams, args.data_dir, args.dataset and dataset_name(args.dataset))
    images, labels = datamodule.test_set.images, datamodule.test_set.labels
    dataset, mean, std = datamodule.hparams.dataset, datamodule.hparams.mean, datamodule.hparams.std

    metrics, logits = evaluate(model, images, labels, mean, std, args.batch_size)
    result = {"checkpoint": str(args.ckpt), "model": type(model).__name__, "dataset": dataset, **metrics}
    figures = {
        "confusion_matrix": confusion_figure(torch.tensor(metrics["confusion_matrix"])),
        "misclassified": misclassified_figure(images, labels, logits),
    }
    if args.robustness:
        result["robustness"] = robustness(model, images, labels, mean, std, args.batch_size)
        figures["robustness"] = robustness_figure(result["robustness"])

    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    with SummaryWriter(str(out_dir)) as writer:
        writer.add_scalar("evaluate/acc", result["test/acc"])
        writer.add_scalar("evaluate/loss", result["test/loss"])
        for name, figure in figures.items():
            image = to_image(figure)
            image.save(out_dir / f"{name}.png")
            add_image(writer, f"evaluate/{name}", image)
        for name, accuracy in result.get("robustness", {}).items():
            writer.add_scalar(f"robustness/{name.replace(' ', '_')}", accuracy)
    print(report(result, out_dir))
    return result


def check_out_dir(out_dir: Path) -> None:
    """A new folder, or one that holds an earlier evaluation alone: nothing else is overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a folder: pass a new folder")
    if out_dir.is_dir():
        others = [p.name for p in out_dir.iterdir() if not any(fnmatch.fnmatchcase(p.name, o) for o in OUTPUTS)]
        if others:
            raise InputError(
                f"--out {out_dir} holds {others[0]}, which evaluate did not write: pass a new or empty folder"
            )
    ensure_writable(out_dir, fix="pass another folder with --out")


def report(result: dict[str, Any], out_dir: Path) -> str:
    lines = [
        f"{result['model']} on the {result['dataset']} test set ({len(result['confusion_matrix'])} classes)",
        f"test/acc  {result['test/acc']:.4f}",
        f"test/loss {result['test/loss']:.4f}",
        "per class: " + "  ".join(f"{c}: {a:.4f}" for c, a in result["per_class_acc"].items()),
    ]
    if "robustness" in result:
        lines += ["", f"{'distortion':<12} test accuracy"]
        lines += [f"{name:<12} {accuracy:.4f}" for name, accuracy in result["robustness"].items()]
    lines += ["", f"Evaluation folder: {out_dir.resolve()}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
