"""Export a checkpoint to ONNX and check the file against PyTorch on real test digits.

    python -m mnist_lab.export --ckpt PATH --format onnx --out model.onnx [--data-dir DIR]

The model takes a batch of any size of (1, 28, 28) images normalized as in training; the
normalization (mean, std) and the model class travel in the file's metadata, so that
`python -m mnist_lab.predict --ckpt model.onnx IMAGE` needs nothing else. Needs the optional
dependencies: pip install -e ".[onnx]".
"""

import argparse
import sys
from pathlib import Path

import torch

from mnist_lab.checkpoint import datamodule_for, load_checkpoint
from mnist_lab.data import normalize
from mnist_lab.defaults import default_data_dir
from mnist_lab.errors import InputError, one_line_errors
from mnist_lab.predict import OnnxClassifier, require
from mnist_lab.run_folder import ensure_writable

TOLERANCE = 1e-4  # largest absolute logit difference between ONNX Runtime and PyTorch accepted
PARITY_IMAGES = 1000  # real test digits compared


def export_onnx(model: torch.nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """Write `model` to `out` with a dynamic batch dimension and `metadata` in the file."""
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's exporter builds the graph with it
    model = model.cpu().eval()
    example = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        model,
        (example,),
        str(out),
        dynamo=True,
        external_data=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def parity(model: torch.nn.Module, onnx_model: OnnxClassifier, images: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits for `images`."""
    x = normalize(images, onnx_model.mean, onnx_model.std)
    with torch.inference_mode():
        expected = model.cpu()(x)
    return (onnx_model(x) - expected).abs().max().item()


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX and check it against PyTorch.")
    parser.add_argument("--ckpt", required=True, type=Path, help="a .ckpt file that train.py wrote")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--out", required=True, type=Path, help="the file to write, e.g. model.onnx")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="folder holding <Dataset>/raw/*-ubyte, for the parity check (default: $MNIST_LAB_DATA or ./data)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors():
        difference = run(args)
    if difference >= TOLERANCE:
        sys.exit(
            f"Error: ONNX Runtime's logits differ from PyTorch's by up to {difference:.2e} (limit {TOLERANCE:.0e})"
        )


def run(args: argparse.Namespace) -> float:
    check_out(args.out, args.ckpt)
    model, data = load_checkpoint(args.ckpt)
    datamodule = datamodule_for(data, args.data_dir)  # before exporting: a missing data set fails fast
    dataset, mean, std = datamodule.hparams.dataset, datamodule.hparams.mean, datamodule.hparams.std
    export_onnx(
        model,
        args.out,
        {
            "mnist_lab.mean": str(mean),
            "mnist_lab.std": str(std),
            "mnist_lab.dataset": dataset,
            "mnist_lab.model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        },
    )
    difference = parity(model, OnnxClassifier(args.out), datamodule.test_set.images[:PARITY_IMAGES])
    print(f"Wrote {args.out.resolve()} ({args.out.stat().st_size / 1e3:.0f} kB, batch dimension dynamic)")
    print(
        f"Parity on {PARITY_IMAGES} real {dataset} test digits: max |ONNX Runtime - PyTorch| logit difference "
        f"{difference:.2e} (limit {TOLERANCE:.0e})"
    )
    return difference


def check_out(out: Path, ckpt: Path) -> None:
    """A new .onnx file in a writable folder: never the checkpoint, a folder, or a file already there."""
    if out.suffix != ".onnx":
        raise InputError(f"--out {out} must end in .onnx (predict tells ONNX files by it): pass e.g. --out model.onnx")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: pass a file name in it, e.g. --out {out / 'model.onnx'}")
    if out.exists() or out.is_symlink():
        what = "the checkpoint given as --ckpt" if ckpt.exists() and out.samefile(ckpt) else "a file"
        raise InputError(f"--out {out} is {what} already there: pass a new file name, or delete it first")
    if not out.parent.is_dir():
        raise InputError(f"no folder {out.parent} to write {out.name} into: create it or pass another --out")
    ensure_writable(out.parent, fix="pass an --out in a writable folder")


if __name__ == "__main__":
    main()
