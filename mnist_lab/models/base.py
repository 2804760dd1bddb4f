"""The shared LightningModule: steps, loss, metrics, logging and optimizers for every architecture."""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_lab.compat import batches_done_in_epoch
from mnist_lab.errors import Diverged, InputError, config_errors, is_number, is_whole

if TYPE_CHECKING:
    from mnist_lab.captured import CapturedSteps

DEFAULT_LOSS = {"_target_": "torch.nn.CrossEntropyLoss"}  # conf/loss/cross_entropy.yaml
# Scheduler arguments that give the schedule's length; left null in config, the trainer fills them.
SCHEDULE_LENGTH_ARGS = ("total_steps", "T_max")
# Scheduler arguments PyTorch does not check: a negative or zero one trains on a nonsense learning rate.
POSITIVE_SCHEDULE_ARGS = ("gamma", "max_lr", "div_factor", "final_div_factor", "factor", "start_factor")
NON_NEGATIVE_SCHEDULE_ARGS = ("eta_min", "min_lr", "end_factor")


@dataclass
class HostLosses:
    """The training loss values read on the host in this epoch: every step's on CPU, the logging
    steps' on a GPU (ImageClassifier._check_and_log). A run resumed in the middle of an epoch
    goes on with those read before the stop, which its checkpoint holds."""

    total: float = 0.0
    steps: int = 0
    last: float | None = None  # kept across epochs: the progress bar shows it

    @property
    def mean(self) -> float | None:
        return self.total / self.steps if self.steps else None


def fast_layout(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module`, in place, in the memory layout it convolves fastest in on `device`. On a CPU,
    oneDNN convolves in the channels-last layout several times faster than in the default one
    (benchmarks/fixed_cost.py: the test loop), and a convolution's output, so the next layer,
    follows its weights' layout; only 4-D tensors change, their values do not. On a GPU the
    default layout stays until it is measured there."""
    if torch.device(device).type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


MAX_WIDTH = 16_384  # units or channels in one layer: far more than a 28 x 28 image needs


def activation_layer(name: str) -> nn.Module:
    """A torch.nn activation by its class name, e.g. "ReLU", "Tanh", "GELU"."""
    layer = getattr(nn, name, None) if isinstance(name, str) else None
    if not (isinstance(layer, type) and layer.__module__ == "torch.nn.modules.activation"):
        raise InputError(
            f"model.activation={name}: not a torch.nn activation; give an activation's class name, such as "
            "ReLU, Tanh or GELU"
        )
    try:
        built = layer()
    except TypeError:  # Threshold, MultiheadAttention, ...: arguments a name cannot carry
        raise InputError(
            f"model.activation={name} needs arguments that a name cannot give: use one that needs none, such as "
            "ReLU, Tanh or GELU"
        ) from None
    # It follows linear layers (N, C) and convolutions (N, C, H, W), and keeps their shape.
    for shape in ((2, 3), (2, 3, 4, 4)):
        try:
            fits = built(torch.zeros(shape)).shape == shape
        except Exception:  # noqa: BLE001  Softmax2d on (N, C), GLU on an odd width, ...
            fits = False
        if not fits:
            raise InputError(
                f"model.activation={name} does not work on a layer's outputs of shape {shape} as an activation "
                "does: use one such as ReLU, Tanh or GELU"
            )
    return built


def check_dropout(p: object) -> float:
    """model.dropout: a probability below 1 (at 1 every input is dropped, and the model learns nothing)."""
    if not is_number(p) or not 0 <= p < 1:  # NaN fails both comparisons
        raise InputError(f"model.dropout={p}: give a probability from 0 up to, not including, 1, e.g. 0.2")
    return float(p)


def check_widths(sizes: object, key: str, example: str, least: int = 1, most: int = 32) -> list[int]:
    """A list of `least` to `most` layer widths (MLP's hidden_sizes, CNN's channels), each a whole
    number from 1 to MAX_WIDTH."""
    widths = list(sizes) if isinstance(sizes, (list, tuple)) else None
    if (
        widths is None
        or not all(is_whole(w) and 1 <= w <= MAX_WIDTH for w in widths)
        or not least <= len(widths) <= most
    ):
        raise InputError(
            f"{key}={sizes}: give a list of {least} to {most} whole numbers from 1 to {MAX_WIDTH}, e.g. {example}"
        )
    return widths


class ImageClassifier(pl.LightningModule):
    """Trains `self.net`, built by a subclass, to map (N, 1, 28, 28) images to (N, num_classes) logits.

    A subclass takes its own arguments and passes the rest on (`**kwargs` to `super().__init__`),
    then builds `self.net` with `self.hparams.num_classes` outputs: its arguments and these land in
    `self.hparams` together, and so in the checkpoint.

    `optimizer`, `scheduler` and `loss` are plain dicts with a `_target_` (Hydra's config groups
    hand them over as such), so hyperparameters stay plain data and checkpoints load with
    weights_only=True. `loss` (conf/loss/, cross-entropy when None) is the training loss, and
    val/loss and test/loss are computed with it.
    """

    net: nn.Module

    def __init__(
        self,
        *,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        num_classes: int = 10,
        loss: dict | None = None,
    ) -> None:
        super().__init__()
        if not is_whole(num_classes) or not 2 <= num_classes <= MAX_WIDTH:
            raise InputError(f"model.num_classes={num_classes}: give the data set's number of classes, 10 for MNIST")
        lr = (optimizer or {}).get("lr", 1)
        if not is_number(lr) or not lr > 0:
            raise InputError(f"optimizer.lr must be > 0, got {lr!r}: pass e.g. optimizer.lr=0.01")
        if not lr < torch.finfo(torch.float32).max:  # the optimizer's float32 state could not hold it
            raise InputError(f"optimizer.lr={lr} is beyond float32's range: pass e.g. optimizer.lr=0.01")
        # Collects the subclass's __init__ arguments too.
        self.save_hyperparameters()
        with config_errors("loss"):
            self.criterion: nn.Module = instantiate(loss or DEFAULT_LOSS)
        if isinstance(self.criterion, nn.MultiMarginLoss) and not self.criterion.margin > 0:  # nothing to learn from
            raise InputError(f"loss.margin={self.criterion.margin}: give a margin above 0, e.g. loss.margin=1.0")
        # Training accuracy is counted at the end of the epoch, from each step's predicted classes
        # and labels: an argmax and an append cost the step less than a running count or a
        # torchmetrics update would (docs/speed.md, the cost of a training step), and none reads the device.
        self._train_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (predicted, labels) per step
        # (correct, seen) of the epoch's steps before those: a run resumed in the middle of an epoch
        self.register_buffer("train_counts", torch.zeros(2, dtype=torch.long), persistent=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.captured: CapturedSteps | None = None  # compile=true: set by mnist_lab.recipe.run
        self.losses = HostLosses()  # for the epoch line (mnist_lab.callbacks.EpochLog) and the progress bar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        fast_layout(self, self.trainer.strategy.root_device)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, batch_idx: int
    ) -> torch.Tensor | None:
        if self.captured is not None:  # compile=true: `batch` holds indices; the replay steps the optimizer
            self._check_and_log(self.captured(batch))
            return None  # nothing left for Lightning's optimizer step: it finds no gradients
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self._train_outputs.append((logits.argmax(1), y))
        self._check_and_log(loss)
        return loss

    def _check_and_log(self, loss: torch.Tensor) -> None:
        """Stop a diverged run; write train/loss on the logging steps."""
        logging_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        # On CPU reading the loss is free: check every step (.item() costs a 30th of torch.isfinite).
        # On a GPU it would stall the queue of kernels, so read it where it is logged anyway.
        if not (logging_step or loss.device.type == "cpu"):
            return
        value = loss.item()
        if not math.isfinite(value):
            where = "at" if loss.device.type == "cpu" else "by"
            raise Diverged(
                f"training diverged: the loss is {value} {where} step {self.global_step}; "
                f"lower the learning rate (optimizer.lr={self.hparams.optimizer['lr']})"
            )
        losses = self.losses  # a plain object: no nn.Module.__setattr__ on the step
        losses.total, losses.steps, losses.last = losses.total + value, losses.steps + 1, value
        if logging_step:
            # Straight to the loggers, at the step Lightning would use. Through self.log, the key
            # would join Lightning's results, which it goes through at every step, logged or not.
            for logger in self.loggers:
                logger.log_metrics({"train/loss": value}, step=self.global_step)

    def on_train_epoch_start(self) -> None:  # not called for an epoch resumed in its middle
        self.losses.total, self.losses.steps = 0.0, 0

    def on_train_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._epoch_train_counts(), reduce_op="sum")
        self.log("train/acc", counts[0] / counts[1])  # summed over DDP's processes first: the same on each
        self._train_outputs.clear()
        self.train_counts.zero_()

    def _epoch_train_counts(self) -> torch.Tensor:
        """(correct, seen) over the training steps of this epoch so far."""
        if not self._train_outputs:
            return self.train_counts.clone()
        predicted, labels = (torch.cat(t) for t in zip(*self._train_outputs, strict=True))
        return self.train_counts + torch.stack([(predicted == labels).sum(), labels.new_tensor(len(labels))])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        metrics = self._epoch_metrics("val", self.val_loss, self.val_acc)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(metrics["val/acc"])
            metrics["val/acc_best"] = self.val_acc_best.compute()
        # torchmetrics has already combined DDP's processes: sync_dist only averages equal values.
        self.log_dict(metrics, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_loss, self.test_acc)  # logits, for callbacks such as TestFigures

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._epoch_metrics("test", self.test_loss, self.test_acc), sync_dist=True)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], loss: MeanMetric, acc: MulticlassAccuracy
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss.update(self.criterion(logits, y), weight=len(y))
        acc.update(logits, y)
        return logits

    @staticmethod
    def _epoch_metrics(stage: str, loss: MeanMetric, acc: MulticlassAccuracy) -> dict[str, torch.Tensor]:
        metrics = {f"{stage}/loss": loss.compute(), f"{stage}/acc": acc.compute()}
        loss.reset()
        acc.reset()
        return metrics

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The checkpoint alone then says which class to rebuild (python -m mnist_lab.evaluate --ckpt),
        # and a run resumed from it goes on with the running counts and the best val/acc so far.
        checkpoint["mnist_lab"] = {
            "model_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "train_counts": self._epoch_train_counts().cpu(),
            "val_acc_best": self.val_acc_best.max_value.cpu(),
        }
        try:
            trainer = self.trainer
        except RuntimeError:  # saved by a trainer it is not attached to: no epoch in progress
            return
        if trainer.training and batches_done_in_epoch(trainer) < trainer.num_training_batches:  # a stop mid-epoch
            # the epoch's losses read so far: its mean (the epoch line) counts them after a resume
            checkpoint["mnist_lab"]["host_losses"] = {"total": self.losses.total, "steps": self.losses.steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mnist_lab", {})
        if losses := state.get("host_losses"):  # Lightning goes on in the middle of that epoch
            self.losses.total, self.losses.steps = float(losses["total"]), int(losses["steps"])
        if "train_counts" in state:  # not in checkpoints written before resume existed
            self.train_counts.copy_(state["train_counts"])
            self._train_outputs.clear()
            self.val_acc_best.reset()
            if torch.isfinite(best := state["val_acc_best"]):
                self.val_acc_best.update(best.to(self.val_acc_best.max_value.device))

    def configure_optimizers(self) -> dict[str, Any]:
        if self.hparams.optimizer is None:
            raise InputError(
                f"{type(self).__name__} was built without an optimizer: pass optimizer={{'_target_': ...}}"
            )
        options = {}
        if self.captured is not None:  # the fused optimizer, reading a learning rate the graph can follow
            options = self.captured.optimizer_options(
                self.hparams.optimizer["_target_"], self.hparams.optimizer["lr"], self.device
            )
        with config_errors("optimizer"):
            optimizer = instantiate(self.hparams.optimizer, params=self.parameters(), **options)
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = dict(self.hparams.scheduler)
        interval = scheduler.pop("interval", "epoch")
        length = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        for key in SCHEDULE_LENGTH_ARGS:
            if key in scheduler and scheduler[key] is None:
                scheduler[key] = int(length)
        for key in (*SCHEDULE_LENGTH_ARGS, "step_size"):  # PyTorch divides by them only when it steps
            if key in scheduler and (not is_whole(scheduler[key]) or scheduler[key] < 1):
                raise InputError(
                    f"scheduler.{key} must be a positive integer, got {scheduler[key]!r}: "
                    f"pass e.g. scheduler.{key}=10, or leave it out"
                )
        for key, value in scheduler.items():
            low = 0 if key in NON_NEGATIVE_SCHEDULE_ARGS else None
            if is_number(value) and (
                not math.isfinite(value)
                or (low is not None and value < low)
                or (key in POSITIVE_SCHEDULE_ARGS and not value > 0)
            ):
                which = "above 0" if key in POSITIVE_SCHEDULE_ARGS else "0 or more" if low is not None else "finite"
                raise InputError(
                    f"scheduler.{key}={value}: give a number {which}, or leave it as conf/scheduler sets it"
                )
        if interval not in ("step", "epoch"):
            raise InputError(
                f"scheduler.interval must be step or epoch, got {interval!r}: pass scheduler.interval=step"
            )
        with config_errors("scheduler"):
            built = instantiate(scheduler, optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": built, "interval": interval, "name": "train/lr"}}
