"""Callbacks that tests start runs with (+callbacks.x._target_=tests.callbacks.X): targets outside
mnist_lab's own config groups, as a user's own would be."""

import os
import signal

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
