"""The shared LightningModule: steps, loss, metrics, logging and optimizers for every architecture."""

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_lab.errors import InputError

# Scheduler arguments that give the schedule's length; left null in config, the trainer fills them.
SCHEDULE_LENGTH_ARGS = ("total_steps", "T_max")


def activation_layer(name: str) -> nn.Module:
    """A torch.nn activation by its class name, e.g. "ReLU", "Tanh", "GELU"."""
    layer = getattr(nn, name, None)
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise InputError(f"unknown activation {name!r}: use a torch.nn class name such as ReLU, Tanh or GELU")
    return layer()


class ImageClassifier(pl.LightningModule):
    """Trains `self.net`, built by a subclass, to map (N, 1, 28, 28) images to (N, num_classes) logits.

    `optimizer` and `scheduler` are plain dicts with a `_target_` (Hydra's config groups hand them
    over as such), so hyperparameters stay plain data and checkpoints load with weights_only=True.
    """

    net: nn.Module

    def __init__(self, optimizer: dict | None = None, scheduler: dict | None = None, num_classes: int = 10) -> None:
        super().__init__()
        lr = (optimizer or {}).get("lr", 1)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise InputError(f"optimizer.lr must be > 0, got {lr!r}: pass e.g. optimizer.lr=0.01")
        # Collects the subclass's __init__ arguments too.
        self.save_hyperparameters()
        # Training accuracy is a running count: a torchmetrics update took 0.1 ms here, 2% of a
        # LeNet-5 step on a 2-core CPU; two tensor ops take a seventh of that and never sync the host.
        # In-place adds also skip nn.Module.__setattr__, itself microseconds a call.
        self.register_buffer("train_correct", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("train_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_correct.add_((logits.argmax(1) == y).sum())
        self.train_seen.add_(len(y))
        # self.log has a cost on every call: make it only on the steps Lightning writes to the logger.
        logging_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        # On CPU reading the loss is free: check every step. On a GPU it would stall the queue of
        # kernels, so check where the host reads the loss anyway, on the logging steps.
        if (logging_step or loss.device.type == "cpu") and not torch.isfinite(loss):
            where = "at" if loss.device.type == "cpu" else "by"
            raise InputError(
                f"training diverged: the loss is {loss.item()} {where} step {self.global_step}; "
                f"lower the learning rate (optimizer.lr={self.hparams.optimizer['lr']})"
            )
        if logging_step:
            self.log("train/loss", loss)
        return loss

    def on_train_epoch_end(self) -> None:
        correct, seen = self.trainer.strategy.reduce(torch.stack([self.train_correct, self.train_seen]), reduce_op="sum")
        self.log("train/acc", correct / seen)  # summed over DDP's processes first: the same on each
        self.train_correct.zero_()
        self.train_seen.zero_()

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

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], loss: MeanMetric, acc: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
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
            "train_counts": torch.stack([self.train_correct, self.train_seen]).cpu(),
            "val_acc_best": self.val_acc_best.max_value.cpu(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mnist_lab", {})
        if "train_counts" in state:  # not in checkpoints written before resume existed
            self.train_correct.copy_(state["train_counts"][0])
            self.train_seen.copy_(state["train_counts"][1])
            self.val_acc_best.reset()
            if torch.isfinite(best := state["val_acc_best"]):
                self.val_acc_best.update(best.to(self.val_acc_best.max_value.device))

    def configure_optimizers(self) -> dict[str, Any]:
        if self.hparams.optimizer is None:
            raise InputError(f"{type(self).__name__} was built without an optimizer: pass optimizer={{'_target_': ...}}")
        optimizer = instantiate(self.hparams.optimizer, params=self.parameters())
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = dict(self.hparams.scheduler)
        interval = scheduler.pop("interval", "epoch")
        length = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        for key in SCHEDULE_LENGTH_ARGS:
            if key in scheduler and scheduler[key] is None:
                scheduler[key] = int(length)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": instantiate(scheduler, optimizer=optimizer), "interval": interval, "name": "train/lr"},
        }
