"""The training step stays free of callbacks with nothing to do on it (issue: framework cost); the
epoch line and the progress bar show what the model has read already."""

import logging
import re
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mnist_lab.callbacks import (
    STEP_HOOKS,
    EpochLog,
    EpochTimer,
    Interrupted,
    ProgressBar,
    TrainingState,
    acts_on_steps,
    epoch_line,
    skip_idle_step_hooks,
)
from mnist_lab.models import SoftmaxRegression


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.layer(x), y)
        self.log("loss", loss)  # for ModelCheckpoint's monitor
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callbacks, tmp_path, steps: int = 6) -> pl.Trainer:
    data = TensorDataset(torch.randn(steps * 2, 4), torch.randint(0, 2, (steps * 2,)))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=2))
    return trainer


def test_which_hooks_are_idle(tmp_path):
    by_epoch = ModelCheckpoint(dirpath=tmp_path, monitor="loss")
    by_steps = ModelCheckpoint(dirpath=tmp_path, monitor="loss", every_n_train_steps=10)
    assert not acts_on_steps(by_epoch, "on_train_batch_end") and acts_on_steps(by_steps, "on_train_batch_end")
    assert acts_on_steps(LearningRateMonitor(), "on_train_batch_start")  # it logs on the logging steps
    assert acts_on_steps(ProgressBar(), "on_train_batch_end")
    assert not any(acts_on_steps(EpochTimer(), hook) for hook in STEP_HOOKS)
    skip_idle_step_hooks([by_epoch, by_steps])
    assert by_epoch.on_train_batch_end is None and by_steps.on_train_batch_end is not None
    assert by_epoch.on_train_epoch_end is not None  # epoch hooks untouched


def test_a_checkpoint_every_n_steps_still_saves(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, monitor="loss")
    skip_idle_step_hooks([checkpoint])
    fit([checkpoint], tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
    ]


@pytest.mark.parametrize("signal_first", [False, True])
def test_training_state_watches_steps_only_once_a_signal_arrives(signal_first, tmp_path):
    state = TrainingState(tmp_path / "last.ckpt")
    trainer = SimpleNamespace(logger=None, loggers=[], world_size=1, received_sigterm=False)
    if signal_first:  # a signal before training started
        state.stop_signal("SIGINT")
    state.on_fit_start(trainer, None)
    assert (state.on_train_batch_end is None) is not signal_first
    state.stop_signal("SIGTERM")
    assert state.on_train_batch_end is not None and state.on_train_batch_start is not None
    assert state.signal_name == ("SIGINT" if signal_first else "SIGTERM")  # the first signal names the stop


class Seen(pl.Callback):
    """What a test reads for itself: each step's loss (a test may read the device) and each
    epoch's val/acc and val/loss, outside the sanity check."""

    def __init__(self) -> None:
        self.losses: list[list[float]] = []
        self.val: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[-1].append(outputs["loss"].item())

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append({k: float(trainer.callback_metrics[k]) for k in ("val/loss", "val/acc")})


def fit_classifier(callbacks, tmp_path, epochs: int = 2) -> tuple[pl.Trainer, SoftmaxRegression]:
    """Softmax regression on 24 random images, 6 steps an epoch, validated after each."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,)))
    model = SoftmaxRegression(optimizer={"_target_": "torch.optim.SGD", "lr": 0.1})
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    return trainer, model


LINE = re.compile(r"Epoch (\d+)/(\d+): train/loss (\S+)  val/loss (\S+)  val/acc (\S+)%  (\S+) s")


def test_each_epoch_logs_one_line_of_its_metrics(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mnist_lab.callbacks")
    seen, timer = Seen(), EpochTimer()
    fit_classifier([timer, EpochLog(), seen], tmp_path)  # with Lightning's sanity check, which logs nothing
    lines = [LINE.fullmatch(r.getMessage()) for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert len(lines) == 2 and all(lines)
    for epoch, line in enumerate(lines):
        assert line.group(1, 2) == (str(epoch + 1), "2")
        assert line[3] == f"{sum(seen.losses[epoch]) / len(seen.losses[epoch]):.4f}"  # every step's, on CPU
        assert (line[4], line[5]) == (f"{seen.val[epoch]['val/loss']:.4f}", f"{100 * seen.val[epoch]['val/acc']:.2f}")
        assert line[6] == f"{timer.epoch_times[epoch]:.1f}"


def test_the_epoch_line_leaves_out_what_it_lacks():
    assert epoch_line(2, 5, 0.15234, {"val/loss": 0.08712, "val/acc": 0.97421}, 11.83) == (
        "Epoch 2/5: train/loss 0.1523  val/loss 0.0871  val/acc 97.42%  11.8 s"
    )
    assert epoch_line(3, 5, None, {}, 2.0) == "Epoch 3/5: 2.0 s"  # no validation in that epoch, no loss read
    assert epoch_line(3, -1, 0.5, {}, None) == "Epoch 3: train/loss 0.5000"  # max_epochs=-1


def test_the_progress_bar_shows_the_last_loss_the_model_read(tmp_path):
    bar, seen = ProgressBar(), Seen()
    trainer, model = fit_classifier([bar, seen], tmp_path, epochs=1)
    metrics = bar.get_metrics(trainer, model)
    assert metrics["loss"] == model.losses.last == pytest.approx(seen.losses[-1][-1])
    assert "v_num" not in metrics
    assert model.losses.steps == 6  # on CPU the model reads every step's loss (one epoch, 6 steps)


class Clock:
    """time.perf_counter for mnist_lab.callbacks: a time set by the test, each reading noted."""

    def __init__(self, seen: list[str]) -> None:
        self.now, self.seen = 0.0, seen

    def __call__(self) -> float:
        self.seen.append("clock")
        return self.now


def test_the_epoch_timer_waits_for_the_gpu_and_counts_the_capture_apart(monkeypatch):
    """A GPU's device and a captured step stood in for: every reading of the clock follows a wait
    for the device, and the seconds the capture took leave the epoch's training time."""
    seen: list[str] = []
    clock, timer = Clock(seen), EpochTimer()
    monkeypatch.setattr("mnist_lab.callbacks.time.perf_counter", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append("wait"))
    captured = SimpleNamespace(capture_time=0.0)
    module = SimpleNamespace(device=torch.device("cuda", 0), captured=captured)
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    timer.on_fit_start(trainer, module)
    timer.on_train_epoch_start(trainer, module)
    clock.now, captured.capture_time = 5.0, 2.0  # 5 s in the epoch, 2 of them warm-up and capture
    timer.on_validation_start(trainer, module)
    clock.now = 6.0  # 1 s of validation
    timer.on_validation_end(trainer, module)
    timer.on_train_epoch_end(trainer, module)
    assert timer.epoch_times == [3.0] and timer.capture_time == 2.0
    assert [a for a, b in zip(seen, seen[1:], strict=False) if b == "clock"] == ["wait"] * seen.count("clock")
    timer.on_train_epoch_start(trainer, module)
    clock.now = 10.0
    timer.on_train_epoch_end(trainer, module)
    assert timer.epoch_times == [3.0, 4.0]  # the capture counted once, in the epoch it happened in
    resumed = EpochTimer()
    resumed.load_state_dict(timer.state_dict())
    assert resumed.capture_time == 2.0  # a resumed run captures anew: its time adds to this


def test_a_stop_records_the_step_its_checkpoint_holds_not_the_trainers(tmp_path):
    """Lightning raises SIGTERMException in the middle of validation, after steps that no checkpoint
    holds: metrics.json names last.ckpt's step, the one a resume goes on from."""
    import json

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mnist_lab.recipe import recording_stops

    state = TrainingState(tmp_path / "checkpoints" / "last.ckpt")
    state.saved_step = 57  # the end of the last epoch
    trainer = SimpleNamespace(is_global_zero=True, global_step=60)
    with pytest.raises(Interrupted), recording_stops(trainer, tmp_path, state):
        raise SIGTERMException
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 57
