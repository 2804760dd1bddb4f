"""mnist_lab's Lightning callbacks (progress bar, model summary, epoch timer and epoch line, test
figures, the state a stopped run resumes from, and stopping on a signal), and the rule that
keeps the training step free of callbacks that have nothing to do on it."""

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint, RichModelSummary, TQDMProgressBar
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_lab.compat import checkpoint_saves_on_steps, restore_callback_hooks, skip_callback_hooks
from mnist_lab.errors import InputError, is_whole
from mnist_lab.figures import Mistakes, confusion_figure, digit_grid, mistakes_figure, most_confident
from mnist_lab.loggers import log_figure
from mnist_lab.models.base import HostLosses

log = logging.getLogger(__name__)

# The callback hooks Lightning calls on every training step, for every callback.
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def acts_on_steps(callback: pl.Callback, hook: str) -> bool:
    """Whether `callback` does anything in the per-step `hook`."""
    if getattr(type(callback), hook) is getattr(pl.Callback, hook):
        return False  # the base class's no-op
    if hook == "on_train_batch_end" and isinstance(callback, ModelCheckpoint):
        return checkpoint_saves_on_steps(callback)
    return True


def skip_idle_step_hooks(callbacks: Iterable[pl.Callback]) -> None:
    """Lightning visits every callback at each of the six hooks of every training step, even where
    the callback does nothing there, and each visit costs a profiler context and the callback's
    `state_key`, which ModelCheckpoint rebuilds from its settings every time (docs/speed.md: the
    cost of a training step). mnist_lab.compat.skip_callback_hooks skips those visits."""
    for callback in callbacks:
        skip_callback_hooks(callback, [hook for hook in STEP_HOOKS if not acts_on_steps(callback, hook)])


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the training loss last read on the host (no extra device read: see
    ImageClassifier._check_and_log), and without `v_num`, which shows the last four characters of
    the logger's version: a fragment of the run name here ("v_num==0.4"), not a number."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        losses = getattr(pl_module, "losses", None)
        if isinstance(losses, HostLosses) and losses.last is not None:
            metrics["loss"] = losses.last
        return metrics

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        before = self.train_progress_bar
        super().on_train_epoch_start(trainer, *args)
        if before is not self.train_progress_bar and not before.disable:  # leave=True: a bar per epoch
            before.leave = False  # on_train_start's bar, never used: cleared rather than left as "Training: 0/?"
            before.close()
        # Counted from 1, as the epoch line is (Lightning's counts from 0); this redraws the bar too.
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


class NetSummary(RichModelSummary):
    """Lightning's rich model summary of the model's layers alone: `net` and, to `max_depth`, what
    is inside it. Lightning's also lists the metrics and the loss (modules without weights), and
    FLOPs, which it counts only for a model with an `example_input_array`: 0 everywhere here.

    `summarize` is the public method that Lightning's callbacks override to draw the summary; the
    columns it is given are the ones Lightning's summary has (tests/test_train.py reads this table)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = dict(summary_data)  # column name -> a value per row
        rows = [i for i, name in enumerate(columns["Name"]) if name == "net" or name.startswith("net.")]
        shown = [name for name in columns if name not in (" ", "FLOPs")]  # the row numbers, FLOPs
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name in shown:
            table.add_column(name, justify="right" if name == "Params" else "left", no_wrap=name == "Name")
        for i in rows:
            table.add_row(*(columns[name][i] for name in shown))
        console = get_console()
        console.print(table)
        count = lambda n: get_human_readable_count(n).strip()  # noqa: E731  "0  " for 0
        console.print(
            f"Params: {count(trainable_parameters)} trainable, "
            f"{count(total_parameters - trainable_parameters)} non-trainable, {get_formatted_model_size(model_size)} MB"
        )


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, validation excluded; kept whole across a stop and resume.

    On a GPU it waits for the device at each mark (an epoch's queued kernels are its training, not
    the validation after it). The captured step's warm-up and capture (compile=true) are counted
    apart, in `capture_time`, not as training."""

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self.earlier_fit_time = self.earlier_capture_time = 0.0  # before the run was stopped and resumed
        self._earlier_epoch_time = 0.0  # of the epoch that a run stopped in its middle goes on with
        self._start, self._in_validation, self._in_epoch = time.perf_counter(), 0.0, False
        self._captured: Any = None  # the model's CapturedSteps, which times its capture
        self._capture_at_start = 0.0  # its capture time when the epoch started

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._captured = getattr(pl_module, "captured", None)
        self._fit_start = self._now(pl_module)
        # Lightning calls no on_train_epoch_start for the epoch that a resumed run goes on with.
        self._start, self._in_validation = self._fit_start - self._earlier_epoch_time, 0.0
        self._in_epoch, self._capture_at_start = True, self._session_capture_time

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._in_validation, self._in_epoch = self._now(pl_module), 0.0, True
        self._capture_at_start = self._session_capture_time

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = self._now(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # the sanity check included: a resumed epoch runs one
            self._in_validation += self._now(pl_module) - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(pl_module.device)
        self.epoch_times.append(self._epoch_time)
        self._in_epoch = False

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        synchronize(pl_module.device)
        return time.perf_counter()

    @property
    def epoch_time(self) -> float:
        """Seconds of training in the current epoch, validation excluded; once it has ended, its total."""
        return self._epoch_time if self._in_epoch or not self.epoch_times else self.epoch_times[-1]

    @property
    def _epoch_time(self) -> float:
        capture = self._session_capture_time - self._capture_at_start
        return time.perf_counter() - self._start - self._in_validation - capture

    @property
    def _session_capture_time(self) -> float:
        return self._captured.capture_time if self._captured is not None else 0.0

    @property
    def fit_time(self) -> float:
        """Seconds in trainer.fit, over every session of a resumed run."""
        return self.earlier_fit_time + time.perf_counter() - self._fit_start

    @property
    def capture_time(self) -> float:
        """Seconds of the captured step's warm-up and capture, over every session of a resumed run
        (each captures its graph anew); in fit_time, not in the epochs' times."""
        return self.earlier_capture_time + self._session_capture_time

    def state_dict(self) -> dict[str, Any]:
        epoch_time = self._epoch_time if self._in_epoch else 0.0  # a checkpoint in the middle of an epoch
        return {
            "epoch_times": self.epoch_times,
            "fit_time": self.fit_time,
            "epoch_time": epoch_time,
            "capture_time": self.capture_time,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_times, self.earlier_fit_time = list(state_dict["epoch_times"]), state_dict["fit_time"]
        # Each absent from checkpoints written before it was kept.
        self._earlier_epoch_time = state_dict.get("epoch_time", 0.0)
        self.earlier_capture_time = state_dict.get("capture_time", 0.0)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that the clock read next counts it; nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochLog(pl.Callback):
    """One line per training epoch, to the console and train.log, of what is computed already:
    `Epoch 2/5: train/loss 0.1523  val/loss 0.0871  val/acc 97.42%  11.8 s`. The training loss is
    the mean of the values the model read on the host (HostLosses), those before a mid-epoch stop
    included; DDP's are the first process's steps. The seconds are
    EpochTimer's. A value missing from an epoch (no validation in it) is left out of its line."""

    def __init__(self) -> None:
        self._val: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:  # the sanity check's two batches say nothing of this epoch
            metrics = trainer.callback_metrics
            self._val = {key: float(metrics[key]) for key in ("val/loss", "val/acc") if key in metrics}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        losses = getattr(pl_module, "losses", None)
        mean = losses.mean if isinstance(losses, HostLosses) else None
        timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
        if trainer.is_global_zero:
            log.info(
                epoch_line(
                    trainer.current_epoch + 1, trainer.max_epochs, mean, self._val, timer.epoch_time if timer else None
                )
            )
            if mean is not None:  # the same number in the loggers (Run.history reads it), at the epoch's last step
                for logger in trainer.loggers:
                    logger.log_metrics({"train/loss_epoch": mean}, step=max(trainer.global_step - 1, 0))
        self._val = {}


def epoch_line(
    epoch: int, epochs: int | None, train_loss: float | None, val: dict[str, float], seconds: float | None
) -> str:
    """`Epoch 2/5: train/loss 0.1523  val/loss 0.0871  val/acc 97.42%  11.8 s`, less what is None or missing."""
    parts = [
        f"train/loss {train_loss:.4f}" if train_loss is not None else "",
        f"val/loss {val['val/loss']:.4f}" if "val/loss" in val else "",
        f"val/acc {100 * val['val/acc']:.2f}%" if "val/acc" in val else "",
        f"{seconds:.1f} s" if seconds is not None else "",
    ]
    of = f"/{epochs}" if epochs and epochs > 0 else ""  # max_epochs=-1: no end set
    return f"Epoch {epoch}{of}: " + "  ".join(part for part in parts if part)


class OptunaPruning(pl.Callback):
    """A job of sweep=optuna: reports val/acc to its trial after every epoch, and ends the run
    after the epoch where the study's pruner calls the trial hopeless (`pruned_at`, in epochs)."""

    def __init__(self, storage: str, study_name: str, pruner: Any, trial_number: int) -> None:
        import optuna  # only sweeps with Optuna pay for importing it

        storage = optuna.storages.get_storage(storage)
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        study_id = storage.get_study_id_from_name(study_name)
        self.trial = optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, trial_number))
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epochs = trainer.current_epoch + 1
        self.trial.report(float(trainer.callback_metrics["val/acc"]), step=epochs)
        if self.trial.should_prune():
            self.pruned_at, trainer.should_stop = epochs, True


def gather_mistakes(mistakes: Mistakes, count: int, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> Mistakes:
    """The most confident of every process's mistakes (DDP). Each process pads its own to `count`,
    as all_gather needs the same shapes everywhere; padding has confidence -1 and is dropped."""
    pad = count - len(mistakes[3])
    padded = [torch.cat([t, t.new_full((pad, *t.shape[1:]), -1 if i == 3 else 0)]) for i, t in enumerate(mistakes)]
    gathered = [all_gather(t).flatten(0, 1) for t in padded]  # (processes * count, ...)
    real = gathered[3] >= 0
    return most_confident(tuple(t[real] for t in gathered), count)


class TestFigures(pl.Callback):
    """At test time, logs sample digits with predicted/true labels, the most confidently wrong
    digits and the confusion matrix to TensorBoard (the notebook's classify_an_example, and more).
    In DDP the confusion matrix and the mistakes cover every process's share of the test set; the
    sample digits are the first process's."""

    def __init__(self, samples: int = 32) -> None:
        if not is_whole(samples) or not 1 <= samples <= 1024:
            raise InputError(
                f"callbacks.test_figures.samples must be from 1 to 1024 digits, got {samples!r}: "
                "pass e.g. callbacks.test_figures.samples=32"
            )
        self.samples = samples

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(pl_module.device)
        self.first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.wrong: Mistakes | None = None

    def on_test_batch_end(
        self, trainer, pl_module, outputs: torch.Tensor, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        confidence, predicted = outputs.softmax(1).max(1)
        self.confusion.update(predicted, labels)
        if self.first is None:
            self.first = images[: self.samples], predicted[: self.samples], labels[: self.samples]
        wrong = predicted != labels
        batch_mistakes = (images[wrong], predicted[wrong], labels[wrong], confidence[wrong])
        # Keep only the most confident mistakes so far: memory stays at `samples` images.
        if self.wrong is not None:
            batch_mistakes = tuple(torch.cat(pair) for pair in zip(self.wrong, batch_mistakes, strict=True))
        self.wrong = most_confident(batch_mistakes, self.samples)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers or self.first is None:
            return
        matrix = self.confusion.compute()  # torchmetrics sums it over the DDP processes
        mistakes = self.wrong
        if trainer.world_size > 1:  # each process has tested its share of the test set
            mistakes = gather_mistakes(mistakes, self.samples, pl_module.all_gather)
        if not trainer.is_global_zero:
            return
        images, predicted, labels = self.first
        log_figure(
            trainer,
            "test/samples",
            digit_grid(images, [f"{p} (true {t})" for p, t in zip(predicted.tolist(), labels.tolist(), strict=True)]),
        )
        log_figure(trainer, "test/misclassified", mistakes_figure(*mistakes))
        log_figure(trainer, "test/confusion_matrix", confusion_figure(matrix))


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
        self.mlflow_run_id: str | None = None
        self.saved_step: int | None = None  # the global step last.ckpt holds, once this process wrote it
        self._stopping = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is not None:
            self.logger_version = trainer.logger.version
        self.mlflow_run_id = next((lg.run_id for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if trainer.world_size == 1:  # DDP's processes must agree on the stopping batch at every step
            self._watch_steps(self.signal_name is not None or trainer.received_sigterm)

    def stop_signal(self, signal_name: str) -> None:
        """Stop at the end of the current training batch, with a checkpoint of that point. The first
        signal names the stop (a sweep's launcher passes SIGTERM on to jobs that had Ctrl-C too)."""
        self.signal_name = self.signal_name or signal_name
        self._watch_steps(True)

    def _watch_steps(self, on: bool) -> None:
        hooks = ("on_train_batch_start", "on_train_batch_end")
        if not on:
            skip_callback_hooks(self, hooks)
        if on or self.signal_name is not None:  # a signal may have come in between
            restore_callback_hooks(self, hooks)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At the end of every epoch, a killed run must find that epoch's state. ModelCheckpoint's own
        # save_last is off (conf/callbacks): it writes last.ckpt only with a new best, and next to
        # this file it would write last-v1.ckpt.
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt whole or not at all: a full disk or a kill mid-write leaves the previous one."""
        partial = self.last_checkpoint.with_name(f".{self.last_checkpoint.name}.partial")
        try:
            trainer.save_checkpoint(partial, weights_only=False)  # the whole state, not the weights alone
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if trainer.is_global_zero:  # the process that wrote it
            os.replace(partial, self.last_checkpoint)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        stop = self.signal_name is not None or trainer.received_sigterm
        if trainer.world_size > 1:  # every process saves and stops at the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not self._stopping:
            self._save(trainer)
            self._stopping = True  # stop once Lightning has logged this batch: at the next one

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._stopping:
            raise Interrupted(self.signal_name or "SIGTERM")

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.signal_name is not None:  # training is over: its last checkpoint is complete
            raise Interrupted(self.signal_name)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch_rng": torch.get_rng_state(),
            "logger_version": self.logger_version,
            "mlflow_run_id": self.mlflow_run_id,
        }
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
