"""mnist_lab's Lightning callbacks, and the rule that keeps the training step free of those that
have nothing to do on it."""

import time
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

# The callback hooks Lightning calls on every training step, for every callback.
STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end",
)


def acts_on_steps(callback: pl.Callback, hook: str) -> bool:
    """Whether `callback` does anything in the per-step `hook`."""
    if getattr(type(callback), hook) is getattr(pl.Callback, hook):
        return False  # the base class's no-op
    if hook == "on_train_batch_end" and isinstance(callback, ModelCheckpoint):
        # It saves at a batch end only when told to every n steps or every so many seconds.
        return bool(callback._every_n_train_steps) or callback._train_time_interval is not None
    return True


def skip_idle_step_hooks(callbacks: Iterable[pl.Callback]) -> None:
    """Lightning visits every callback at each of the six hooks of every training step, even where
    the callback does nothing there, and each visit costs about 1.5 us on a 2-core CPU (a profiler
    context, and the callback's `state_key`, which ModelCheckpoint rebuilds from its settings every
    time): 60 us a step for the default callbacks. Setting such a hook to None on the instance
    skips the visit, because Lightning's dispatcher (`pytorch_lightning.trainer.call.
    _call_callback_hooks`) calls only callable hooks; tests/test_callbacks.py fails if that changes."""
    for callback in callbacks:
        skip_hooks(callback, [hook for hook in STEP_HOOKS if not acts_on_steps(callback, hook)])


def skip_hooks(callback: pl.Callback, hooks: Iterable[str]) -> None:
    """Lightning no longer calls these hooks of `callback` (see skip_idle_step_hooks)."""
    for hook in hooks:
        setattr(callback, hook, None)


def restore_hooks(callback: pl.Callback, hooks: Iterable[str]) -> None:
    """Lightning calls these hooks of `callback` again: its class's methods."""
    for hook in hooks:
        callback.__dict__.pop(hook, None)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without `v_num`, which shows the last four characters of the logger's
    version: a fragment of the run name here ("v_num==0.4"), not a number."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, validation excluded; kept whole across a stop and resume."""

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self.earlier_fit_time = 0.0  # before the run was stopped and resumed
        self._earlier_epoch_time = 0.0  # of the epoch that a run stopped in its middle goes on with
        self._start, self._in_validation, self._in_epoch = time.perf_counter(), 0.0, False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        # Lightning calls no on_train_epoch_start for the epoch that a resumed run goes on with.
        self._start, self._in_validation = self._fit_start - self._earlier_epoch_time, 0.0
        self._in_epoch = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._in_validation, self._in_epoch = time.perf_counter(), 0.0, True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # the sanity check included: a resumed epoch runs one
            self._in_validation += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_times.append(self._epoch_time)
        self._in_epoch = False

    @property
    def _epoch_time(self) -> float:
        return time.perf_counter() - self._start - self._in_validation

    @property
    def fit_time(self) -> float:
        """Seconds in trainer.fit, over every session of a resumed run."""
        return self.earlier_fit_time + time.perf_counter() - self._fit_start

    def state_dict(self) -> dict[str, Any]:
        epoch_time = self._epoch_time if self._in_epoch else 0.0  # a checkpoint in the middle of an epoch
        return {"epoch_times": self.epoch_times, "fit_time": self.fit_time, "epoch_time": epoch_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_times, self.earlier_fit_time = list(state_dict["epoch_times"]), state_dict["fit_time"]
        self._earlier_epoch_time = state_dict.get("epoch_time", 0.0)  # checkpoints from before it was kept
