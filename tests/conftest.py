import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 300, 100
ARCHITECTURES = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))  # every model=<name>


def write_idx(folder: Path, split: str, n: int, seed: int) -> None:
    """Write an IDX image/label pair; image i carries its index in its first two pixels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
    images[:, 0, 0], images[:, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    # A bright square whose place depends on the label, so a model has something to learn.
    for digit in range(10):
        images[labels == digit, 4 + 2 * digit : 8 + 2 * digit, 10:18] = 255
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}-images-idx3-ubyte").write_bytes(
        struct.pack(">4i", 0x0803, n, 28, 28) + images.numpy().tobytes()
    )
    (folder / f"{split}-labels-idx1-ubyte").write_bytes(
        struct.pack(">2i", 0x0801, n) + labels.to(torch.uint8).numpy().tobytes()
    )


def make_dataset(root: Path, name: str = "MNIST") -> Path:
    write_idx(root / name / "raw", "train", N_TRAIN, seed=0)
    write_idx(root / name / "raw", "t10k", N_TEST, seed=1)
    return root


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A data folder with tiny synthetic MNIST and FashionMNIST files; never the network."""
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "MNIST")
    make_dataset(root, "FashionMNIST")
    return root


@pytest.fixture
def fresh_data_dir(tmp_path) -> Path:
    """A data folder of one's own, for tests that damage files."""
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MNIST, where MNIST_LAB_DATA points at it (.ci/run arranges that)."""
    folder = os.environ.get("MNIST_LAB_DATA")
    if not folder or not (Path(folder) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip("MNIST_LAB_DATA does not point at the real MNIST files")
    return Path(folder)


def compose_train(*overrides: str):
    """compose() the app config with overrides, as train.py would see it."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", list(overrides))


@pytest.fixture
def make_cfg():
    return compose_train


def smoke_overrides(data_dir: Path, *extra: str) -> list[str]:
    """A couple of batches per epoch on synthetic data: seconds, with checkpoints and logs."""
    return [
        f"data.data_dir={data_dir}",
        "data.download=false",
        "data.verify_checksums=false",
        "data.val_size=100",
        "data.batch_size=32",
        "data.eval_batch_size=50",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "+trainer.limit_train_batches=3",
        "+trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
        *extra,
    ]


def run_train(*args: str, cwd: Path | None = None, timeout: int = 180, env: dict | None = None):
    """Run train.py in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a process started for a test and reap it; SIGKILL if it does not end in `timeout` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_train_together(arg_lists: list[list[str]], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Run train.py once per argument list, all processes at the same time (their output goes to
    files, so that none blocks on a full pipe while another is waited for)."""
    started = []
    try:
        for args in arg_lists:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=out, stderr=err, text=True
            )
            started.append((proc, out, err))
        for proc, _, _ in started:
            proc.wait(timeout=timeout)
    finally:  # none left running, whatever failed
        for proc, _, _ in started:
            proc.kill()
    results = []
    for proc, out, err in started:
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


@pytest.fixture(scope="session")
def real_checkpoint(real_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """LeNet-5 trained for one epoch on the real MNIST (about 98% test accuracy): the best
    checkpoint and the run's metrics.json."""
    import json

    from mnist_lab.recipe import run

    out_dir = tmp_path_factory.mktemp("lenet")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                f"data.data_dir={real_data_dir}",
                "model=lenet",
                "trainer=cpu",
                "trainer.max_epochs=1",
                "callbacks.progress_bar=null",
            ],
        )
    run(cfg, out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return out_dir / metrics["best_checkpoint"], metrics


@pytest.fixture
def small_checkpoint(tmp_path):
    """An untrained LeNet-5 saved by Lightning, as train.py saves its checkpoints."""
    import pytorch_lightning as pl

    from mnist_lab.models import LeNet

    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(LeNet())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path
