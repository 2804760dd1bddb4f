import json
import pickle
import subprocess
import sys

import pytest
import torch

from mnist_lab.checkpoint import load_checkpoint
from mnist_lab.errors import InputError
from mnist_lab.evaluate import DISTORTIONS
from mnist_lab.models import LeNet
from tests.conftest import ROOT


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_lab.evaluate", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_evaluation_matches_training_and_writes_its_files(real_checkpoint, real_data_dir, tmp_path):
    ckpt, metrics = real_checkpoint
    out = tmp_path / "eval"
    result = evaluate_cli("--ckpt", str(ckpt), "--data-dir", str(real_data_dir), "--robustness", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"Evaluation folder: {out.resolve()}" in result.stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["model"] == "LeNet" and evaluation["dataset"] == "MNIST"
    assert evaluation["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)  # the same 10,000 digits, same model
    assert evaluation["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)
    matrix = torch.tensor(evaluation["confusion_matrix"])
    assert matrix.sum() == 10_000 and matrix.trace() / 10_000 == pytest.approx(evaluation["test/acc"], abs=1e-6)
    per_class = matrix.diag() / matrix.sum(1)
    assert [evaluation["per_class_acc"][str(c)] for c in range(10)] == pytest.approx(per_class.tolist(), abs=1e-6)
    robust = evaluation["robustness"]
    assert list(robust) == list(DISTORTIONS) and robust["clean"] == pytest.approx(evaluation["test/acc"], abs=1e-6)
    assert robust["transpose"] < 0.5 < robust["rotate 15"]  # the notebook's point: transposed digits fool it
    for name in ("confusion_matrix.png", "misclassified.png", "robustness.png"):
        assert (out / name).stat().st_size > 5000
    assert list(out.glob("events.out.tfevents.*"))
    assert "transpose" in result.stdout and "test/acc" in result.stdout


@pytest.mark.slow
def test_another_dataset_is_read_from_its_config(real_checkpoint, real_data_dir, tmp_path):
    ckpt, _ = real_checkpoint
    result = evaluate_cli(
        "--ckpt", str(ckpt), "--data-dir", str(real_data_dir), "--dataset", "fashion_mnist", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["dataset"] == "FashionMNIST" and evaluation["test/acc"] < 0.5  # digits are not clothes


def test_transpose_transposes_and_clean_is_identity():
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    assert torch.equal(DISTORTIONS["transpose"](images)[1, 0], images[1, 0].T)
    assert torch.equal(DISTORTIONS["clean"](images), images)
    assert torch.equal(DISTORTIONS["invert"](images[:, :, :1, :1] * 0 + 55), images[:, :, :1, :1] * 0 + 200)
    noisy = DISTORTIONS["noise 0.3"](torch.full((4, 1, 28, 28), 128.0))
    assert noisy.min() >= 0 and noisy.max() <= 255 and 60 < noisy.std() < 90  # 0.3 of the 255 range, clipped
    assert torch.equal(noisy, DISTORTIONS["noise 0.3"](torch.full((4, 1, 28, 28), 128.0)))  # seeded


def test_checkpoint_names_its_class_and_loads_without_unpickling(tmp_path):
    import pytorch_lightning as pl

    model = LeNet(dropout=0.1)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["mnist_lab"]["model_class"] == "mnist_lab.models.lenet.LeNet"
    loaded, _ = load_checkpoint(path)
    assert type(loaded) is LeNet and loaded.hparams.dropout == 0.1 and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no checkpoint file at"),
        (b"not a checkpoint at all", "is not a checkpoint that loads safely"),
        (pickle.dumps(object()), "is not a checkpoint that loads safely"),  # an arbitrary object: never unpickled
    ],
)
def test_bad_checkpoints_are_refused(content, message, tmp_path):
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_checkpoint(path)


def test_a_torch_file_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(InputError, match="not a Lightning checkpoint of mnist_lab"):
        load_checkpoint(path)
    torch.save({"state_dict": {}, "hyper_parameters": {}, "mnist_lab": {"model_class": "os.system"}}, path)
    with pytest.raises(InputError, match="does not say which mnist_lab model"):
        load_checkpoint(path)
    lenet = "mnist_lab.models.lenet.LeNet"
    torch.save({"state_dict": {}, "hyper_parameters": {"width": 3}, "mnist_lab": {"model_class": lenet}}, path)
    with pytest.raises(InputError, match="does not fit LeNet"):
        load_checkpoint(path)
    torch.save(
        {"state_dict": {"net.0.weight": torch.zeros(1)}, "hyper_parameters": {}, "mnist_lab": {"model_class": lenet}},
        path,
    )
    with pytest.raises(InputError, match="does not fit LeNet"):
        load_checkpoint(path)


def test_cli_errors_are_one_line(tmp_path):
    result = evaluate_cli("--ckpt", str(tmp_path / "missing.ckpt"))
    assert result.returncode == 1 and result.stderr.startswith("Error: no checkpoint file at")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cifar"], "unknown dataset 'cifar': use one of mnist, fashion_mnist, kmnist"),
        (["--out", "/proc/evaluation"], "cannot write to the output folder /proc/evaluation"),
    ],
)
def test_bad_arguments_stop_with_one_line(args, message, small_checkpoint, tmp_path, capsys):
    from mnist_lab.evaluate import main

    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(small_checkpoint), *args])
    assert str(stop.value).startswith("Error: ") and message in str(stop.value)


def test_a_small_checkpoint_describing_a_huge_model_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.ckpt"
    mlp = "mnist_lab.models.mlp.MLP"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"hidden_sizes": [16_384] * 32},  # the widest and deepest MLP takes
            "mnist_lab": {"model_class": mlp},
        },
        path,
    )  # 33 GB of weights described in a few hundred bytes
    with pytest.raises(InputError, match=r"describe a model of 33,\d{3} MB, but it holds 0.0 MB"):
        load_checkpoint(path)


def test_a_checkpoint_with_compressed_entries_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "packed.ckpt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(10_000_000))  # 10 MB of zeros in 10 kB
    with pytest.raises(InputError, match="holds compressed entries"):
        load_checkpoint(path)
