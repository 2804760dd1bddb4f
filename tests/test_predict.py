import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_lab.errors import InputError
from mnist_lab.predict import Classifier, load_image, to_mnist
from tests.conftest import ROOT


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_lab.predict", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def digit(size: int = 12) -> np.ndarray:
    """A white '1'-like bar on black, off centre, in a 28 x 28 uint8 image."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4 : 4 + size, 3:6] = 255
    return image


# Variants of a real MNIST digit (28 x 28 uint8, white on black) as files of other kinds.
VARIANTS = {
    "big.png": lambda a: Image.fromarray(a).resize((112, 112), Image.Resampling.BILINEAR),
    "inverted_rgb.jpg": lambda a: Image.fromarray(255 - a).resize((60, 75)).convert("RGB"),
    "tiny.bmp": lambda a: Image.fromarray(a).resize((16, 16), Image.Resampling.LANCZOS),
    "gray16.png": lambda a: Image.fromarray(a.astype(np.uint16) * 257),
    "ink_in_alpha.png": lambda a: Image.fromarray(np.dstack([np.zeros_like(a)] * 3 + [a]), "RGBA"),
    "padded_dark_on_light.png": lambda a: Image.fromarray(np.pad(255 - a, 40, constant_values=255)),
}


@pytest.fixture(scope="module")
def confident_digits(real_checkpoint, real_data_dir):
    """Real test digits that the checkpoint gets right with >= 99% in their MNIST form."""
    import torchvision

    classifier = Classifier(real_checkpoint[0])
    test = torchvision.datasets.MNIST(str(real_data_dir), train=False)
    images, labels = test.data[:200], test.targets[:200]
    probs = classifier.probabilities(images.unsqueeze(1).float())
    keep = ((probs.argmax(1) == labels) & (probs.max(1).values >= 0.99)).nonzero().flatten()[:20]
    assert len(keep) == 20
    return classifier, images[keep].numpy(), labels[keep].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_real_digits_in_other_files_are_predicted_correctly(variant, confident_digits, tmp_path):
    classifier, images, labels = confident_digits
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}_{variant}")
        VARIANTS[variant](image).save(paths[-1])
    from mnist_lab.predict import predict

    results = predict(classifier, paths)
    assert [r.get("digit") for r in results] == labels, results


@pytest.mark.slow
def test_cli_prints_a_line_per_file_json_and_fails_only_the_bad_file(real_checkpoint, confident_digits, tmp_path):
    _, images, labels = confident_digits
    good = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(images[0]).resize((50, 50)).save(good[0])
    Image.fromarray(255 - images[1]).save(good[1])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    ckpt = str(real_checkpoint[0])
    result = predict_cli("--ckpt", ckpt, str(good[0]), str(bad), str(good[1]))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"{good[0]}: {labels[0]} (")
    assert result.stdout.splitlines()[1].startswith(f"{good[1]}: {labels[1]} (")
    assert f"Error: {bad}: cannot read it as an image" in result.stderr
    result = predict_cli("--ckpt", ckpt, "--json", *map(str, good))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["path"], r["digit"]) for r in rows] == [(str(p), d) for p, d in zip(good, labels[:2], strict=True)]
    assert all(len(r["probabilities"]) == 10 and r["probability"] == max(r["probabilities"]) for r in rows)


def test_preprocessing_makes_an_mnist_digit():
    # A bar off in a corner of a big, dark-on-light RGB image
    sheet = np.full((300, 200, 3), 240, dtype=np.uint8)
    sheet[20:120, 10:40] = 30
    out = to_mnist(Image.fromarray(sheet))
    assert out.shape == (1, 28, 28) and out.min() == 0 and out.max() > 250
    rows, cols = out[0].nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20  # the longer side scaled to MNIST's 20-pixel box
    assert 5 <= cols.max() - cols.min() + 1 <= 8  # aspect ratio kept: 30 x 100 -> about 6 x 20
    weights = out[0] / out[0].sum()
    com = (weights.sum(1) * torch.arange(28)).sum(), (weights.sum(0) * torch.arange(28)).sum()
    assert all(abs(c - 13.5) <= 0.6 for c in com)  # centred by centre of mass


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(digit()).convert("RGB"),
        lambda: Image.fromarray(digit()).convert("RGBA"),
        lambda: Image.fromarray(255 - digit()),  # inverted
        lambda: Image.fromarray(digit().astype(np.uint16) * 257),  # 16-bit
        lambda: Image.fromarray(digit().astype(np.float32) / 255),  # 32-bit float in [0, 1]
        lambda: Image.fromarray(digit().astype(np.int32) * 257),  # 32-bit integer holding 16-bit values
        lambda: Image.fromarray(digit()).convert("1"),
        lambda: Image.fromarray(digit()).convert("P"),
        lambda: Image.fromarray(digit()).resize((4000, 4000)),  # huge
    ],
)
def test_odd_images_give_the_same_digit(make):
    reference = to_mnist(Image.fromarray(digit()))
    out = to_mnist(make())
    assert out.shape == (1, 28, 28)
    assert (out > 64).float().mean().item() == pytest.approx((reference > 64).float().mean().item(), abs=0.03)
    assert torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1] > 0.8


def test_a_tiny_image_is_scaled_up_to_the_box():
    out = to_mnist(Image.fromarray(digit()).resize((7, 7)))
    rows, _ = (out[0] > 64).nonzero(as_tuple=True)
    assert out.max() > 250 and rows.max() - rows.min() + 1 >= 18  # about 20 pixels tall, like the original


@pytest.mark.parametrize("shade", [0, 128, 255])
def test_blank_image_is_refused(shade):
    with pytest.raises(InputError, match="no digit found"):
        to_mnist(Image.new("L", (40, 40), shade))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(InputError, match="cannot read it as an image"):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_a_non_checkpoint_is_refused_before_any_image(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(digit()).save(image)
    result = predict_cli("--ckpt", str(image), str(image))
    assert result.returncode == 1 and "is not a checkpoint that loads safely" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_image_that_decodes_to_gigabytes_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (6000, 5000)).save(
        path
    )  # 30 megapixels in a few kB, under the 89 million at which Pillow starts to warn
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="6000 x 5000 pixels is more than the 25 megapixels predict reads"):
        load_image(path)


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "I;16"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_pillow_reads_gives_a_digit_and_finite_pixels(mode):
    from PIL import ImageDraw

    image = Image.new(mode, (40, 40))
    ink = {"1": 1, "P": 255, "PA": (255, 255), "I": 2**31 - 1, "F": 3.4e38, "I;16": 65535}.get(mode)
    if ink is None:  # the mode's brightest value in each band (LAB, HSV: the lightness, or value, band)
        ink = tuple(255 if band in "LRGBAVXY" else 0 for band in image.getbands())
        ink = ink[0] if len(ink) == 1 else ink
    if mode == "CMYK":
        ink = (0, 0, 0, 0)
        image = Image.new(mode, (40, 40), (0, 0, 0, 255))  # black: all the key band; the digit white
    if mode in ("P", "PA"):
        image.putpalette([v for i in range(256) for v in (i, i, i)])  # index i: gray i
    ImageDraw.Draw(image).rectangle((18, 8, 22, 32), fill=ink)
    # From a file; HSV, which no format stores, as a PIL image handed to predict in Python.
    pixels = to_mnist(image) if mode == "HSV" else load_image(saved(image, "TIFF"))
    assert torch.isfinite(pixels).all() and pixels.min() == 0 and pixels.max() == 255  # a bar, ink on a background


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_are_refused_in_one_line(value):
    array = np.zeros((40, 40), np.float32)
    array[10:30, 18:22] = value
    with pytest.raises(InputError, match="holds NaN or infinite pixel values: save it with finite ones"):
        load_image(saved(Image.fromarray(array, mode="F"), "TIFF"))


@pytest.mark.parametrize("low", [-1e30, -(2**31)])
def test_signed_pixels_are_read_from_their_lowest_value_up(low):
    array = np.zeros((40, 40), np.float32 if low == -1e30 else np.int32)
    array[10:30, 18:22] = low  # a dark bar on a light ground
    pixels = load_image(saved(Image.fromarray(array, mode="F" if low == -1e30 else "I"), "TIFF"))
    assert pixels.max() == 255


def saved(image: Image.Image, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
