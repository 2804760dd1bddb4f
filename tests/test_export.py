import re
import subprocess
import sys

import pytest
import torch

from mnist_lab.errors import InputError
from mnist_lab.predict import OnnxClassifier
from tests.conftest import ROOT

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_file(real_checkpoint, real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "lenet.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_lab.export",
            "--ckpt",
            str(real_checkpoint[0]),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--data-dir",
            str(real_data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.mark.slow
def test_export_passes_its_parity_check_on_real_digits(onnx_file):
    _, stdout = onnx_file
    match = re.search(
        r"Parity on 1000 real MNIST test digits: max \|ONNX Runtime - PyTorch\| logit difference (\S+)", stdout
    )
    assert match and float(match.group(1)) < 1e-4, stdout


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_onnx_batch_dimension_is_dynamic_and_matches_pytorch(batch, onnx_file, real_checkpoint):
    from mnist_lab.checkpoint import load_checkpoint

    model, _ = load_checkpoint(real_checkpoint[0])
    onnx_model = OnnxClassifier(onnx_file[0])
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        torch.testing.assert_close(onnx_model(x), model(x), atol=1e-4, rtol=0)
    assert (onnx_model.mean, onnx_model.std) == (0.1307, 0.3081)


@pytest.mark.slow
def test_predict_reads_the_onnx_file_like_the_checkpoint(onnx_file, real_checkpoint, real_data_dir, tmp_path):
    import torchvision
    from PIL import Image

    test = torchvision.datasets.MNIST(str(real_data_dir), train=False)
    paths = []
    for i in range(10):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(test.data[i].numpy()).resize((64, 64)).save(paths[-1])
    outputs = [
        subprocess.run(
            [sys.executable, "-m", "mnist_lab.predict", "--ckpt", str(model), *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for model in (onnx_file[0], real_checkpoint[0])
    ]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    digits = [[line.split(": ")[1].split()[0] for line in o.stdout.splitlines()] for o in outputs]
    assert digits[0] == digits[1] and len(digits[0]) == 10


def test_a_broken_onnx_file_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not onnx")
    with pytest.raises(InputError, match="is not an ONNX model ONNX Runtime can load"):
        OnnxClassifier(path)
    with pytest.raises(InputError, match="no ONNX file at"):
        OnnxClassifier(tmp_path / "missing.onnx")


@pytest.mark.parametrize(
    "out, message",
    [
        ("model.ckpt", "must end in .onnx"),  # the checkpoint itself: the export once overwrote it
        ("folder.onnx", "is a folder"),
        ("taken.onnx", "is a file already there"),
        ("/proc/model.onnx", "cannot write to the output folder /proc"),
        ("missing/model.onnx", "no folder"),
    ],
)
def test_an_output_that_is_an_input_a_folder_or_unwritable_is_refused(out, message, small_checkpoint, tmp_path):
    from mnist_lab.export import main

    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "taken.onnx").write_text("the user's")
    before = small_checkpoint.read_bytes()
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(small_checkpoint), "--out", str(tmp_path / out), "--data-dir", str(tmp_path)])
    assert str(stop.value).startswith("Error: ") and message in str(stop.value) and "\n" not in str(stop.value)
    assert small_checkpoint.read_bytes() == before and (tmp_path / "taken.onnx").read_text() == "the user's"
