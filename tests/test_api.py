"""mnist_lab from Python: fit, load and sweep go the command line's way, again and again in one
process, and a Run gives back its metrics, history, curves and model (issue 18)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import mnist_lab
from mnist_lab.api import main
from tests.conftest import ROOT, run_train, smoke_overrides

INTERRUPT = "tests.callbacks.InterruptAtEpoch"


@pytest.fixture(scope="module")
def fitted(synthetic_dir, tmp_path_factory) -> mnist_lab.Run:
    """A short run through the API, in a folder of its own."""
    return mnist_lab.fit(
        *smoke_overrides(synthetic_dir, "model=softmax"), out_dir=tmp_path_factory.mktemp("fit") / "run"
    )


def test_fit_writes_the_run_folder_the_command_line_writes(fitted):
    assert {".hydra", "checkpoints", "metrics.json", "train.log", "curves.png"} <= {
        p.name for p in fitted.folder.iterdir()
    }
    assert fitted.metrics["status"] == "ok" and fitted.metrics["epochs"] == 2
    assert fitted.best_checkpoint.is_file() and fitted.best_checkpoint.parent == fitted.folder / "checkpoints"
    assert "Test accuracy" in (fitted.folder / "train.log").read_text()


def test_history_has_one_row_per_epoch_with_the_logged_values(fitted):
    history = fitted.history
    assert [row["epoch"] for row in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train/loss", "val/loss", "val/acc", "lr", "seconds"}
    assert max(row["val/acc"] for row in history) == pytest.approx(fitted.metrics["val/acc"])
    assert [row["seconds"] for row in history] == fitted.metrics["epoch_train_time_s"]
    assert all(row["train/loss"] > 0 and row["val/loss"] > 0 and row["lr"] > 0 for row in history)


def test_plot_is_the_three_curves(fitted):
    figure = fitted.plot()
    assert isinstance(figure, Figure)
    assert [ax.get_title() for ax in figure.axes] == ["training loss", "validation loss", "validation accuracy"]
    assert all(ax.lines for ax in figure.axes)


def test_classify_takes_tensors_images_and_paths_as_predict_does(fitted, synthetic_dir, tmp_path):
    from mnist_lab.predict import Classifier, predict

    raw = (synthetic_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    pixels = torch.frombuffer(bytearray(raw[16 : 16 + 3 * 784]), dtype=torch.uint8).reshape(3, 28, 28)
    digits, probabilities = fitted.classify(pixels)
    assert probabilities.shape == (3, 10) and torch.allclose(probabilities.sum(1), torch.ones(3))
    assert digits == probabilities.argmax(1).tolist() and all(isinstance(d, int) for d in digits)
    assert fitted.classify(pixels.float() / 255)[1] == pytest.approx(probabilities, abs=1e-6)  # 0-1 floats alike
    Image.fromarray(pixels[0].numpy()).save(tmp_path / "digit.png")
    by_path = fitted.classify(tmp_path / "digit.png")
    expected = predict(Classifier(fitted.best_checkpoint), [tmp_path / "digit.png"])[0]
    assert by_path[0] == [expected["digit"]]
    assert by_path[1][0].tolist() == pytest.approx(expected["probabilities"], abs=1e-6)
    assert fitted.classify(Image.open(tmp_path / "digit.png"))[1] == pytest.approx(by_path[1], abs=1e-6)
    assert len(fitted.classify([tmp_path / "digit.png", pixels[1]])[0]) == 2
    with pytest.raises(mnist_lab.InputError, match="28 x 28 pixels"):
        fitted.classify(torch.zeros(3, 32, 32))
    with pytest.raises(mnist_lab.InputError, match="no such file"):
        fitted.classify(tmp_path / "missing.png")


def test_evaluate_gives_the_test_accuracy_the_run_measured(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # evaluate writes under ./outputs/evaluations, as the command does
    result = fitted.evaluate()
    assert result["test/acc"] == pytest.approx(fitted.metrics["test/acc"], abs=1e-6)
    assert "robustness" not in result and "transpose" in fitted.evaluate(robustness=True)["robustness"]


def test_load_gives_back_a_finished_run_from_its_folder_or_checkpoint(fitted):
    assert mnist_lab.load(fitted.folder).metrics == fitted.metrics
    assert mnist_lab.load(fitted.best_checkpoint).checkpoint == fitted.best_checkpoint
    with pytest.raises(mnist_lab.InputError, match="not a run folder"):
        mnist_lab.load(fitted.folder / "checkpoints")


def test_a_finished_folder_is_refused_and_each_call_is_a_new_run(fitted, synthetic_dir, tmp_path, monkeypatch):
    with pytest.raises(mnist_lab.InputError, match="already holds a finished run"):
        mnist_lab.fit(*smoke_overrides(synthetic_dir, "model=softmax"), out_dir=fitted.folder)
    assert fitted.metrics["status"] == "ok"  # untouched
    monkeypatch.chdir(tmp_path)
    first, second = (
        mnist_lab.fit(*smoke_overrides(synthetic_dir, "model=softmax", "trainer.max_epochs=1")) for _ in range(2)
    )
    assert first.folder != second.folder and first.folder.parent.parent == tmp_path / "outputs" / "runs"
    assert first.metrics["test/acc"] == second.metrics["test/acc"]  # the same seed


def test_bad_input_raises_the_line_the_command_line_prints(synthetic_dir, tmp_path, capsys):
    with pytest.raises(
        mnist_lab.InputError, match=r"^trainer.max_epoch: no such option; did you mean trainer.max_epochs\?$"
    ):
        mnist_lab.fit("trainer.max_epoch=1")
    with pytest.raises(
        SystemExit, match=r"^Error: trainer.max_epoch: no such option; did you mean trainer.max_epochs\?$"
    ):
        main(["trainer.max_epoch=1"])
    with pytest.raises(
        mnist_lab.InputError, match=r"model=lenett: no such option in conf/model/; did you mean model=lenet\?"
    ):
        mnist_lab.fit("model=lenett")
    with pytest.raises(mnist_lab.InputError, match="fit trains one configuration"):
        mnist_lab.fit("-m", "optimizer.lr=0.1,0.2")
    assert "+trainer.max_epoch" not in capsys.readouterr().err  # not Hydra's advice, which leads to a TypeError


def test_a_trainer_argument_that_conf_does_not_set_is_added_with_a_plus_and_a_misspelled_one_is_named(synthetic_dir):
    with pytest.raises(
        mnist_lab.InputError,
        match=r"not set in conf/trainer/: a Trainer argument is added with a \+, "
        r"\+trainer.limit_val_batches=2$",
    ):
        mnist_lab.fit("trainer.limit_val_batches=2")
    with pytest.raises(
        mnist_lab.InputError,
        match=r"^trainer.limit_val_batchs: pytorch_lightning.Trainer takes no such argument; "
        r"did you mean trainer.limit_val_batches\?$",
    ):
        mnist_lab.fit(*smoke_overrides(synthetic_dir, "+trainer.limit_val_batchs=2"))


def test_a_configuration_refused_before_training_leaves_nothing_to_resume(synthetic_dir, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(
        mnist_lab.InputError, match=r"trainer.max_epochs must be at least 1 .*: pass e.g. trainer.max_epochs=5"
    ):
        mnist_lab.fit(*smoke_overrides(synthetic_dir, "trainer.max_epochs=0"), out_dir=folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["refused"] is True and metrics["resumable"] is False
    assert "resume" not in metrics
    with pytest.raises(
        mnist_lab.InputError, match="refused before it trained .* start a new run with a corrected value"
    ):
        mnist_lab.fit(f"resume={folder}")


def test_an_interrupt_saves_a_checkpoint_and_fit_resume_finishes_the_run(synthetic_dir, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    overrides = smoke_overrides(
        synthetic_dir, "model=softmax", "trainer.max_epochs=3", f"+callbacks.stop._target_={INTERRUPT}"
    )
    monkeypatch.setenv("MNIST_LAB_TEST_INTERRUPT_AT_EPOCH", "1")
    with pytest.raises(KeyboardInterrupt) as stopped:
        mnist_lab.fit(*overrides, out_dir=folder)
    assert isinstance(stopped.value, mnist_lab.RunInterrupted) and stopped.value.folder == folder
    assert f"mnist_lab.fit('resume={folder}')" in str(stopped.value)
    assert json.loads((folder / "metrics.json").read_text())["status"] == "interrupted"
    monkeypatch.delenv("MNIST_LAB_TEST_INTERRUPT_AT_EPOCH")
    run = mnist_lab.fit(f"resume={folder}", f"trusted_targets=[{INTERRUPT}]")
    assert run.folder == folder and run.metrics["status"] == "ok" and run.metrics["epochs"] == 3
    assert run.metrics["resumed_from_step"] == 4  # 3 batches an epoch, and the batch the signal came in
    assert [row["epoch"] for row in run.history] == [1, 2, 3]


@pytest.mark.slow
def test_fit_and_the_command_line_give_the_same_metrics(fitted, synthetic_dir, tmp_path):
    result = run_train(*smoke_overrides(synthetic_dir, "model=softmax"), f"hydra.run.dir={tmp_path / 'cli'}")
    assert result.returncode == 0, result.stderr
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for key in ("val/acc", "test/acc", "test/loss", "epochs", "best_checkpoint"):
        assert cli[key] == fitted.metrics[key], key


def test_sweep_runs_every_job_with_its_report(synthetic_dir, tmp_path):
    sweep = mnist_lab.sweep(
        *smoke_overrides(synthetic_dir, "model=softmax", "trainer.max_epochs=1"),
        "optimizer.lr=0.05,0.1",
        out_dir=tmp_path / "sweep",
    )
    assert sweep.folder == tmp_path / "sweep" and (sweep.folder / "summary.md").is_file()
    assert [(job["job"], job["status"], job["overrides"]["optimizer.lr"]) for job in sweep.jobs] == [
        ("0", "ok", "0.05"),
        ("1", "ok", "0.1"),
    ]
    best = max(sweep.jobs, key=lambda job: job["val/acc"])
    assert sweep.best.folder == sweep.folder / best["job"] and sweep.best.metrics["val/acc"] == best["val/acc"]
    assert len(sweep.best.history) == 1


@pytest.mark.slow
def test_an_installed_copy_fits_from_any_folder(synthetic_dir, tmp_path):
    """pip install . (not editable): the configs travel inside the package."""
    source, target = tmp_path / "source", tmp_path / "site"
    for part in ("mnist_lab", "conf", "hydra_plugins"):  # a copy, so that the build leaves no build/ in the checkout
        shutil.copytree(ROOT / part, source / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert (target / "mnist_lab" / "conf" / "model" / "lenet.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import mnist_lab, sys; run = mnist_lab.fit(*sys.argv[1:]); "
        "print(mnist_lab.__file__); print(run.folder); print(run.metrics['status'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *smoke_overrides(synthetic_dir, "model=softmax")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert result.returncode == 0, result.stderr
    module, folder, status = result.stdout.strip().splitlines()[-3:]
    assert Path(module).is_relative_to(target) and Path(folder).is_relative_to(elsewhere / "outputs") and status == "ok"
    cli = subprocess.run(
        [sys.executable, "-m", "mnist_lab", "model=lenett"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert cli.returncode == 1 and "did you mean model=lenet?" in cli.stderr


def test_an_interrupted_sweep_says_how_to_go_on_and_sweep_resume_finishes_it(synthetic_dir, tmp_path, monkeypatch):
    folder = tmp_path / "sweep"
    overrides = smoke_overrides(synthetic_dir, "model=softmax", f"+callbacks.stop._target_={INTERRUPT}")
    monkeypatch.setenv("MNIST_LAB_TEST_INTERRUPT_AT_EPOCH", "1")
    with pytest.raises(mnist_lab.RunInterrupted) as stopped:
        mnist_lab.sweep(*overrides, "optimizer.lr=0.05,0.1", out_dir=folder)
    assert stopped.value.folder == folder and f"mnist_lab.sweep('resume={folder}')" in str(stopped.value)
    assert json.loads((folder / "0" / "metrics.json").read_text())["status"] == "interrupted"
    monkeypatch.delenv("MNIST_LAB_TEST_INTERRUPT_AT_EPOCH")
    sweep = mnist_lab.sweep(f"resume={folder}", f"trusted_targets=[{INTERRUPT}]")
    assert sweep.folder == folder and [job["status"] for job in sweep.jobs] == ["ok", "ok"]


def test_history_has_the_training_loss_the_epoch_line_printed(fitted):
    lines = [
        line
        for line in (fitted.folder / "train.log").read_text().splitlines()
        if "Epoch " in line and "train/loss" in line
    ]
    printed = [float(line.split("train/loss ")[1].split()[0]) for line in lines]
    assert [round(row["train/loss"], 4) for row in fitted.history] == printed
