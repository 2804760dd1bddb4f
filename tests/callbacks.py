"""Callbacks that tests start runs with (+callbacks.x._target_=tests.callbacks.X): targets outside
mnist_lab's own config groups, as a user's own would be."""

import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig


class KillAtEpoch(pl.Callback):
    """SIGKILLs its own process as epoch $MNIST_LAB_TEST_KILL_AT_EPOCH starts, when that is set (in a
    sweep, in job $MNIST_LAB_TEST_KILL_JOB only): the previous epoch's last.ckpt is written, as
    after a crash or an OOM kill between epochs."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        job = os.environ.get("MNIST_LAB_TEST_KILL_JOB")
        if job is not None and str(HydraConfig.get().job.num) != job:
            return
        if str(trainer.current_epoch) == os.environ.get("MNIST_LAB_TEST_KILL_AT_EPOCH"):
            os.kill(os.getpid(), signal.SIGKILL)


class MeetAtFirstEpoch(pl.Callback):
    """Proves that jobs run at the same time: each waits at its first epoch until
    $MNIST_LAB_TEST_MEET jobs have got there (files in $MNIST_LAB_TEST_MEET_DIR), and fails after
    60 s alone, as it would if jobs ran one after the other."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder, count = Path(os.environ["MNIST_LAB_TEST_MEET_DIR"]), int(os.environ["MNIST_LAB_TEST_MEET"])
        (folder / str(HydraConfig.get().job.num)).touch()
        deadline = time.monotonic() + 60
        while len(list(folder.iterdir())) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"alone at the first epoch: {len(list(folder.iterdir()))} of {count} jobs met")
            time.sleep(0.1)


class InterruptAtEpoch(pl.Callback):
    """Sends its own process SIGINT, as Ctrl-C or a Jupyter kernel interrupt does, as epoch
    $MNIST_LAB_TEST_INTERRUPT_AT_EPOCH starts, when that is set."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if str(trainer.current_epoch) == os.environ.get("MNIST_LAB_TEST_INTERRUPT_AT_EPOCH"):
            os.kill(os.getpid(), signal.SIGINT)
