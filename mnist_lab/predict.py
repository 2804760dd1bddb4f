"""Classify image files with a trained checkpoint (or its ONNX export).

    python -m mnist_lab.predict --ckpt PATH IMAGE [IMAGE ...] [--json]

Any size, colour mode and format Pillow reads. Each image is made into an MNIST digit the way
MNIST itself was made: grayscale, light ink on a dark background, cropped to the digit, scaled
to fit 20 x 20 keeping its aspect ratio, then placed in 28 x 28 with its centre of mass at the
centre.
"""

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist_lab.checkpoint import load_checkpoint
from mnist_lab.data import normalize
from mnist_lab.defaults import MNIST_MEAN, MNIST_STD
from mnist_lab.errors import InputError, first_line, one_line_errors

FIELD, BOX = 28, 20  # MNIST: digits fit a 20 x 20 box inside a 28 x 28 image
INK_THRESHOLD = 0.2  # of the brightest ink: what counts as digit when cropping
MAX_PIXELS = 25_000_000  # a phone photo passes; a decompression bomb does not
MIN_CONTRAST = 0.1  # brightest ink minus background, in [0, 1]; below it, an image is blank


def grayscale(image: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1], whatever the mode: 1-bit, 8/16/32-bit gray, palette, RGB(A)."""
    if image.mode.startswith(("I;16", "I", "F")):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise InputError("it holds NaN or infinite pixel values: save it with finite ones (0-255, or 0-1)")
        array -= min(0.0, float(array.min()))  # signed values: from the lowest up
        # 16-bit, or 32-bit holding 8- or 16-bit values; float images may already lie in [0, 1]
        top = next(t for t in (1.0, 255.0, 65535.0, float(array.max())) if array.max() <= t)
        if image.mode.startswith("I;16"):
            top = 65535.0
        return np.clip(array / top, 0, 1).astype(np.float32)
    if image.mode in ("LAB", "HSV"):  # which Pillow does not convert to gray: their lightness band
        return np.asarray(image.getchannel("L" if image.mode == "LAB" else "V"), dtype=np.float32) / 255
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        alpha = rgba[..., 3]
        if alpha.min() < 1:  # drawn on a transparent sheet: the opaque part is the ink
            return alpha
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def to_mnist(image: Image.Image) -> torch.Tensor:
    """(1, 28, 28) float tensor, 0 = background, 255 = ink, as MNIST's pixels."""
    gray = grayscale(image)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = gray - background if background < 0.5 else background - gray  # dark on light: inverted
    ink = np.clip(ink, 0, None)
    if ink.max() < MIN_CONTRAST:
        raise InputError("no digit found: the image is blank (one shade throughout)")
    ink /= ink.max()
    rows, cols = np.nonzero(ink > INK_THRESHOLD)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # crop to the digit
    height, width = ink.shape
    factor = BOX / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    digit = np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 1)
    # Place the box so that its centre of mass lands on the field's centre, inside the field.
    total = digit.sum()
    com_y = (digit.sum(1) * np.arange(digit.shape[0])).sum() / total
    com_x = (digit.sum(0) * np.arange(digit.shape[1])).sum() / total
    top = int(np.clip(round((FIELD - 1) / 2 - com_y), 0, FIELD - digit.shape[0]))
    left = int(np.clip(round((FIELD - 1) / 2 - com_x), 0, FIELD - digit.shape[1]))
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return torch.from_numpy(field * 255).unsqueeze(0)


def load_image(source: Path | bytes) -> torch.Tensor:
    """(1, 28, 28) MNIST-style pixels of an image file, or of its bytes (the demo page's uploads)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:  # reads the header only
            if image.width * image.height > MAX_PIXELS:  # Pillow refuses only above 179 million: gigabytes as floats
                raise InputError(
                    f"{image.width} x {image.height} pixels is more than the {MAX_PIXELS / 1e6:.0f} megapixels "
                    "predict reads: scale the image down (a digit needs a few hundred pixels)"
                )
            image.load()
            return to_mnist(image)
    except FileNotFoundError:
        raise InputError("no such file") from None
    except UnidentifiedImageError:
        raise InputError(
            "cannot read it as an image: not a format Pillow knows (PNG, JPEG, BMP, GIF, TIFF, ...)"
        ) from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:  # Pillow's other ways of failing
        raise InputError(f"cannot read it as an image ({first_line(e)})") from None


def as_mnist_batch(images: Any) -> torch.Tensor:
    """(N, 1, 28, 28) MNIST-style pixels (0-255) of a file path, a PIL image, a tensor of MNIST's
    own pixels ((28, 28), (N, 28, 28) or (N, 1, 28, 28); 0-255, or floats in 0-1), or a list of those."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given: pass a path, a PIL image, a tensor, or a list of them")
        return torch.cat([as_mnist_batch(image) for image in images])
    if isinstance(images, (str, Path)):
        try:
            return load_image(Path(images)).unsqueeze(0)
        except InputError as e:
            raise InputError(f"{images}: {e}") from None
    if isinstance(images, Image.Image):
        return to_mnist(images).unsqueeze(0)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if (
        not isinstance(images, torch.Tensor)
        or images.shape[-2:] != (FIELD, FIELD)
        or images.dim() > 4
        or (images.dim() == 4 and images.shape[1] != 1)
    ):
        raise InputError(
            f"cannot classify {type(images).__name__} {tuple(getattr(images, 'shape', ()))}: pass a path, "
            "a PIL image, or a tensor of 28 x 28 pixels shaped (28, 28), (N, 28, 28) or (N, 1, 28, 28)"
        )
    pixels = images.detach().cpu().float().reshape(-1, 1, FIELD, FIELD)
    if not torch.isfinite(pixels).all():
        raise InputError("the images hold NaN or infinite pixels: pass pixels from 0 to 255 (or 0 to 1)")
    return pixels * 255 if images.is_floating_point() and pixels.max() <= 1 else pixels


def require(module: str):
    """An optional dependency of ONNX export and inference, or a one-line InputError."""
    try:
        return __import__(module)
    except ImportError:
        raise InputError(
            f'{module} is not installed: pip install -e ".[onnx]" adds onnx, onnxscript and onnxruntime'
        ) from None


class OnnxClassifier:
    """Logits of normalized (N, 1, 28, 28) images through ONNX Runtime; `mean` and `std` read
    from the file's metadata."""

    def __init__(self, path: Path) -> None:
        ort = require("onnxruntime")
        if not path.is_file():
            raise InputError(
                f"no ONNX file at {path}: write one with python -m mnist_lab.export --ckpt ... --out {path}"
            )
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(f"{path} is not an ONNX model ONNX Runtime can load ({first_line(e)[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "mnist_lab.mean" not in meta:
            raise InputError(
                f"{path} was not exported by mnist_lab (no normalization in its metadata): "
                "export it with python -m mnist_lab.export"
            )
        try:
            self.mean, self.std = float(meta["mnist_lab.mean"]), float(meta["mnist_lab.std"])
        except (KeyError, ValueError):
            raise InputError(
                f"{path} has a malformed mnist_lab.mean or mnist_lab.std in its metadata: export it again "
                "with python -m mnist_lab.export"
            ) from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input: images.float().contiguous().numpy()})
        return torch.from_numpy(logits)


class Classifier:
    """Class probabilities of MNIST-shaped images from a checkpoint or an ONNX file."""

    def __init__(self, path: Path) -> None:
        if path.suffix == ".onnx":
            self.model = OnnxClassifier(path)
            self.mean, self.std = self.model.mean, self.model.std
        else:
            self.model, data = load_checkpoint(path)
            self.mean, self.std = data.get("mean", MNIST_MEAN), data.get("std", MNIST_STD)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) raw images (0-255) -> (N, C) probabilities."""
        return self.model(normalize(images, self.mean, self.std)).softmax(1)


def predict(classifier: Classifier, paths: list[Path]) -> list[dict[str, Any]]:
    """One result per path, in order: the digit and probabilities, or the error."""
    results, images, readable = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            readable.append(len(results))
            results.append({"path": str(path)})
        except InputError as e:
            results.append({"path": str(path), "error": str(e)})
    if images:
        for index, probs in zip(readable, classifier.probabilities(torch.stack(images)), strict=True):
            digit, rounded = int(probs.argmax()), [round(float(p), 6) for p in probs]
            results[index].update(digit=digit, probability=rounded[digit], probabilities=rounded)
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description="Classify image files with a trained checkpoint or ONNX file.")
    parser.add_argument("--ckpt", required=True, type=Path, help="a .ckpt file train.py wrote, or an .onnx export")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument(
        "--json", action="store_true", help='print a JSON list of {"path", "digit", "probability", "probabilities"}'
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors():
        results = predict(Classifier(args.ckpt), args.images)
    for result in results:
        if "error" in result:
            print(f"Error: {result['path']}: {result['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" not in result:
                print(f"{result['path']}: {result['digit']} ({result['probability']:.1%})")
    sys.exit(1 if any("error" in result for result in results) else 0)


if __name__ == "__main__":
    main()
