"""Export a checkpoint to ONNX and check the file against PyTorch on real test digits.

    python -m mnist_lab.export --ckpt PATH --format onnx --out model.onnx [--data-dir DIR]

The model takes a batch of any size of (1, 28, 28) images normalized as in training; the
normalization (mean, std) and the model class travel in the file's metadata, so that
`python -m mnist_lab.predict --ckpt model.onnx IMAGE` needs nothing else. Needs the optional
dependencies: pip install -e ".[onnx]".
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from mnist_lab.checkpoint import load_checkpoint
from mnist_lab.data import MNISTDataModule, normalize
from mnist_lab.errors import InputError

TOLERANCE = 1e-4  # largest absolute logit difference between ONNX Runtime and PyTorch accepted
PARITY_IMAGES = 1000  # real test digits compared


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"{module} is not installed: pip install -e \".[onnx]\" adds onnx, onnxscript and onnxruntime") from None


def export_onnx(model: torch.nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """Write `model` to `out` with a dynamic batch dimension and `metadata` in the file."""
    onnx = _require("onnx")
    _require("onnxscript")  # torch.onnx's exporter builds the graph with it
    model = model.cpu().eval()
    example = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(model, (example,), str(out), dynamo=True, external_data=False, input_names=["images"],
                      output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


class OnnxClassifier:
    """Logits of normalized (N, 1, 28, 28) images through ONNX Runtime; `mean` and `std` read
    from the file's metadata."""

    def __init__(self, path: Path) -> None:
        ort = _require("onnxruntime")
        if not path.is_file():
            raise InputError(f"no ONNX file at {path}: write one with python -m mnist_lab.export --ckpt ... --out {path}")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(f"{path} is not an ONNX model ONNX Runtime can load ({str(e).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "mnist_lab.mean" not in meta:
            raise InputError(f"{path} was not exported by mnist_lab (no normalization in its metadata): "
                             "export it with python -m mnist_lab.export")
        self.mean, self.std = float(meta["mnist_lab.mean"]), float(meta["mnist_lab.std"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input: images.float().contiguous().numpy()})
        return torch.from_numpy(logits)


def parity(model: torch.nn.Module, onnx_model: OnnxClassifier, images: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits for `images`."""
    x = normalize(images, onnx_model.mean, onnx_model.std)
    with torch.inference_mode():
        expected = model.cpu()(x)
    return (onnx_model(x) - expected).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX and check it against PyTorch.")
    parser.add_argument("--ckpt", required=True, type=Path, help="a .ckpt file that train.py wrote")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--out", required=True, type=Path, help="the file to write, e.g. model.onnx")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_LAB_DATA", "data")),
                        help="folder holding <Dataset>/raw/*-ubyte, for the parity check (default: $MNIST_LAB_DATA or ./data)")
    args = parser.parse_args(argv)
    try:
        difference = run(args)
    except InputError as e:
        sys.exit(f"Error: {e}")
    if difference >= TOLERANCE:
        sys.exit(f"Error: ONNX Runtime's logits differ from PyTorch's by up to {difference:.2e} (limit {TOLERANCE:.0e})")


def run(args: argparse.Namespace) -> float:
    model, data = load_checkpoint(args.ckpt)
    if args.out.parent and not args.out.parent.is_dir():
        raise InputError(f"no folder {args.out.parent} to write {args.out.name} into: create it or pass another --out")
    dataset = data.get("dataset", "MNIST")
    datamodule = MNISTDataModule(data_dir=str(args.data_dir), dataset=dataset, download=data.get("download", True),
                                 verify_checksums=data.get("verify_checksums", True))
    datamodule.prepare_data()
    datamodule.setup("test")  # before exporting: a missing data set fails fast
    mean, std = data.get("mean", datamodule.hparams.mean), data.get("std", datamodule.hparams.std)
    export_onnx(model, args.out, {"mnist_lab.mean": str(mean), "mnist_lab.std": str(std), "mnist_lab.dataset": dataset,
                                  "mnist_lab.model_class": f"{type(model).__module__}.{type(model).__qualname__}"})
    difference = parity(model, OnnxClassifier(args.out), datamodule.test_set.images[:PARITY_IMAGES])
    print(f"Wrote {args.out.resolve()} ({args.out.stat().st_size / 1e3:.0f} kB, batch dimension dynamic)")
    print(f"Parity on {PARITY_IMAGES} real {dataset} test digits: max |ONNX Runtime - PyTorch| logit difference "
          f"{difference:.2e} (limit {TOLERANCE:.0e})")
    return difference


if __name__ == "__main__":
    main()
