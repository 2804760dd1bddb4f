"""Stopping and resuming runs: a signal leaves a checkpoint, a stopped or killed run goes on from
its last one with `resume=<run folder>`, and a run folder belongs to one run at a time."""

import fcntl
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from mnist_lab.callbacks import restore_hooks, skip_hooks
from mnist_lab.errors import InputError

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
CONFIG_FILE = Path(".hydra") / "config.yaml"
LOCK_FILE = ".lock"
_held_locks: list[IO[str]] = []  # open for the life of the process: the lock goes with it, even on SIGKILL


class Interrupted(BaseException):
    """Training stopped by a signal (its last.ckpt, if any, is where to resume). A BaseException,
    like KeyboardInterrupt, so that a sweep stops too rather than going on to its next job."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value  # the shell's convention: 130, 143


class TrainingState(Checkpoint):
    """Writes last.ckpt at the end of every epoch, with the rest of what a resumed run needs to
    match an uninterrupted one (the global random generators, the TensorBoard run's name), and
    stops on SIGINT/SIGTERM at the end of the current training batch with a checkpoint of that point.

    A Checkpoint, so that Lightning calls it after the ModelCheckpoint given before it, which saves
    the best checkpoint at the end of the training epoch too: last.ckpt then knows that epoch's
    best, and a resumed run tests the same checkpoint as an uninterrupted one.

    Lightning itself sets `trainer.received_sigterm` on SIGTERM; `stop_signal` is called by
    `stop_on_signals`. A second Ctrl-C stops at once, without a checkpoint. In one process its
    per-step hooks are off until a signal arrives: a training step then costs nothing here.
    """

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = Path(last_checkpoint)
        self.signal_name: str | None = None
        self.logger_version: str | int | None = None
        self._stopping = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is not None:
            self.logger_version = trainer.logger.version
        if trainer.world_size == 1:  # DDP's processes must agree on the stopping batch at every step
            self._watch_steps(self.signal_name is not None or trainer.received_sigterm)

    def stop_signal(self, signal_name: str) -> None:
        """Stop at the end of the current training batch, with a checkpoint of that point."""
        self.signal_name = signal_name
        self._watch_steps(True)

    def _watch_steps(self, on: bool) -> None:
        hooks = ("on_train_batch_start", "on_train_batch_end")
        if not on:
            skip_hooks(self, hooks)
        if on or self.signal_name is not None:  # a signal may have come in between
            restore_hooks(self, hooks)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At the end of every epoch, a killed run must find that epoch's state. ModelCheckpoint's own
        # save_last is off (conf/callbacks): it writes last.ckpt only with a new best, and next to
        # this file it would write last-v1.ckpt.
        trainer.save_checkpoint(self.last_checkpoint, weights_only=False)  # the whole state, not the weights alone

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        stop = self.signal_name is not None or trainer.received_sigterm
        if trainer.world_size > 1:  # every process saves and stops at the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not self._stopping:
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)  # the whole state, not the weights alone
            self._stopping = True  # stop once Lightning has logged this batch: at the next one

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._stopping:
            raise Interrupted(self.signal_name or "SIGTERM")

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.signal_name is not None:  # training is over: its last checkpoint is complete
            raise Interrupted(self.signal_name)

    def state_dict(self) -> dict[str, Any]:
        state = {"torch_rng": torch.get_rng_state(), "logger_version": self.logger_version}
        if torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch_rng"])
        cuda_states = state_dict.get("cuda_rng", [])
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def stop_on_signals(state: TrainingState) -> Iterator[None]:
    """While training, SIGINT and SIGTERM ask `state` to checkpoint and stop at the end of the
    batch, instead of killing the process mid-step; a second Ctrl-C interrupts at once."""

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and state.signal_name == "SIGINT":
            raise KeyboardInterrupt
        state.stop_signal(signal.Signals(signum).name)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def read_status(folder: Path) -> str | None:
    """The status a run folder's metrics.json records (ok, failed, interrupted), or None."""
    try:
        return json.loads((folder / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def claim(folder: Path) -> None:
    """Lock `folder` for this process, or refuse: two runs must never write into one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise InputError(
            f"{folder} is in use by another run (process {owner}): wait for it to end, or pass another "
            "folder with hydra.run.dir=... (hydra.sweep.dir=... for -m)"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held_locks.append(lock)


def check_resumable(folder: Path) -> Path:
    """The last checkpoint of the run in `folder`, or an InputError saying why it cannot go on."""
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(f"resume={folder}: not a run folder (no {CONFIG_FILE} in it): pass a folder under outputs/runs/")
    status = read_status(folder)
    if status == "ok":
        raise InputError(f"resume={folder}: that run finished already ({folder / 'metrics.json'}): nothing to resume")
    if status == "failed":
        raise InputError(f"resume={folder}: that run failed ({folder / 'metrics.json'} says why); start a new run instead")
    if not (folder / LAST_CHECKPOINT).is_file():
        raise InputError(
            f"resume={folder}: the run has no checkpoint to resume from ({LAST_CHECKPOINT} is written at the end of "
            "each epoch and when the run is stopped with Ctrl-C or SIGTERM); start it again instead"
        )
    return folder / LAST_CHECKPOINT


def check_run_folder(folder: Path, config: DictConfig) -> None:
    """Refuse to start a run in a folder that holds another one. A run stopped or killed there,
    with the same settings, is resumed: that is rerunning a command with the same hydra.run.dir."""
    status = read_status(folder)
    if status in ("ok", "failed"):
        raise InputError(
            f"{folder} already holds a {'finished' if status == 'ok' else 'failed'} run: pass a new folder with "
            "hydra.run.dir=..., or delete that one to run again there"
        )
    saved = folder / CONFIG_FILE
    if not (folder / LAST_CHECKPOINT).is_file() or not saved.is_file():
        return
    task = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True)
    differences = _differences(OmegaConf.to_container(OmegaConf.load(saved), resolve=True), task)
    if differences:
        raise InputError(
            f"{folder} holds a stopped run with other settings ({', '.join(differences[:5])}): resume it as it was "
            f"with resume={folder}, or pass a new folder with hydra.run.dir=..."
        )


def _differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs, as key=saved->new."""
    if isinstance(saved, dict) and isinstance(new, dict):
        return [d for k in sorted(saved.keys() | new.keys()) for d in _differences(saved.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if saved == new else [f"{prefix[:-1]}={saved}->{new}"]
