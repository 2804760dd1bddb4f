"""docs/own-model.md's "Add your own model", executed exactly as written, in a copy of the project: the model
trains, resumes after SIGKILL and SIGTERM with the plain resume=, sweeps with -m and with
sweep=optuna, and its checkpoint goes through evaluate and predict (issue 18)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def page_files() -> dict[str, str]:
    """docs/own-model.md's fenced blocks that begin with `# <path>`: {path: the block as the reader copies it}."""
    blocks = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", (ROOT / "docs" / "own-model.md").read_text(), re.S)
    return {path: body for path, body in blocks}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the checkout with the page's model added as the reader would add it."""
    copy = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("mnist_lab", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / part, copy / part, symlinks=True, ignore=ignore)
    shutil.copy(ROOT / "train.py", copy)
    files = page_files()
    assert {"mnist_lab/models/tiny.py", "conf/model/tiny.yaml"} <= files.keys(), files.keys()
    for path, text in files.items():
        (copy / path).write_text(text)
    return copy


def run_in(project: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in the copy (`train.py ...` or `-m mnist_lab.<tool> ...`), as the reader runs it."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(project)},
    )


def start_in(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(project)},
    )


def short(data_dir: Path, *extra: str) -> list[str]:
    """The page's model on the real MNIST, with short epochs and no figures."""
    return [
        f"data.data_dir={data_dir}",
        "data.download=false",
        "model=tiny",
        "model.width=32",
        "trainer=cpu",
        "+trainer.limit_train_batches=30",
        "data.val_size=1000",
        "+trainer.limit_test_batches=2",
        "callbacks.test_figures=null",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        *extra,
    ]


def signal_after_checkpoint(process: subprocess.Popen, checkpoint: Path, signum: int, newer_than: float = 0) -> str:
    """Send `signum` once `checkpoint` is (re)written, and return the process's output."""
    deadline = time.monotonic() + 120
    while not (checkpoint.is_file() and checkpoint.stat().st_mtime > newer_than):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signum)
    return process.communicate(timeout=120)[0]


def test_own_model_trains_stops_resumes_and_is_evaluated_and_predicted(project, real_data_dir, tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    first = start_in(project, "train.py", *short(real_data_dir, "trainer.max_epochs=40"), f"hydra.run.dir={run}")
    signal_after_checkpoint(first, last, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL and not (run / "metrics.json").exists()

    resumed = start_in(project, "train.py", f"resume={run}")
    output = signal_after_checkpoint(resumed, last, signal.SIGTERM, newer_than=last.stat().st_mtime)
    assert resumed.returncode == 143, output
    stopped = json.loads((run / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["resume"] == f"python train.py resume={run}"

    finished = run_in(project, "train.py", f"resume={run}")
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs"] == 40 and metrics["resumed_from_step"] > 0
    assert metrics["test/acc"] > 0.8  # a 32-unit hidden layer learns MNIST within a few epochs of 30 batches

    best = run / metrics["best_checkpoint"]
    evaluated = run_in(
        project,
        "-m",
        "mnist_lab.evaluate",
        "--ckpt",
        str(best),
        "--data-dir",
        str(real_data_dir),
        "--out",
        str(tmp_path / "evaluation"),
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["test/acc"] > 0.8

    raw = (real_data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    Image.fromarray(np.frombuffer(raw[16 : 16 + 784], np.uint8).reshape(28, 28)).save(tmp_path / "seven.png")
    predicted = run_in(project, "-m", "mnist_lab.predict", "--ckpt", str(best), "--json", str(tmp_path / "seven.png"))
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["digit"] == 7  # the test set's first digit


def test_own_model_sweeps_on_a_grid_and_with_optuna(project, real_data_dir, tmp_path):
    grid = run_in(
        project,
        "train.py",
        "-m",
        *short(real_data_dir, "trainer.max_epochs=1", "optimizer.lr=0.05,0.1"),
        f"hydra.sweep.dir={tmp_path / 'grid'}",
    )
    assert grid.returncode == 0, grid.stderr
    assert [json.loads((tmp_path / "grid" / job / "metrics.json").read_text())["status"] for job in "01"] == ["ok"] * 2
    assert (tmp_path / "grid" / "summary.md").is_file()

    optuna = run_in(
        project,
        "train.py",
        "-m",
        "sweep=optuna",
        *short(real_data_dir, "trainer.max_epochs=1"),
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={tmp_path / 'optuna'}",
    )
    assert optuna.returncode == 0, optuna.stderr
    assert "model.dropout is left out of this search: model=tiny takes no dropout" in optuna.stdout + optuna.stderr
    assert json.loads((tmp_path / "optuna" / "0" / "metrics.json").read_text())["status"] == "ok"
