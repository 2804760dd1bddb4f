"""mnist_lab.compat against the installed libraries: one test per function, each failing with the
function's name and the library's version when an upgrade changes the private part it relies on."""

import functools
import importlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from importlib.metadata import version

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard.summary import hparams

from mnist_lab import compat

BATCHES = 3  # per epoch, in each fit here


@contextmanager
def names(function: Callable, package: str, what: str) -> Iterator[None]:
    """Any failure inside names `function` and the installed `package`: an upgrade changed `what`."""
    try:
        yield
    except Exception as error:  # an assertion or the library's own error
        pytest.fail(
            f"mnist_lab.compat.{function.__name__}: {package} {version(package)} changed {what} "
            f"({type(error).__name__}: {error})"
        )


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.layer(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", F.cross_entropy(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    data = TensorDataset(torch.randn(2 * BATCHES, 4), torch.randint(0, 2, (2 * BATCHES,)))
    return DataLoader(data, batch_size=2)


def make_trainer(tmp_path, callbacks=(), epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


def test_checkpoint_saves_on_steps(tmp_path):
    with names(compat.checkpoint_saves_on_steps, "pytorch-lightning", "ModelCheckpoint's private attributes"):
        assert not compat.checkpoint_saves_on_steps(ModelCheckpoint(dirpath=tmp_path, monitor="loss"))
        assert not compat.checkpoint_saves_on_steps(ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2))
        assert compat.checkpoint_saves_on_steps(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3))
        assert compat.checkpoint_saves_on_steps(ModelCheckpoint(dirpath=tmp_path, train_time_interval=timedelta(0)))


class Steps(pl.Callback):
    """Records the step hooks Lightning calls on it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_batch_start(self, *args) -> None:
        self.calls.append("on_train_batch_start")

    def on_before_backward(self, *args) -> None:
        self.calls.append("on_before_backward")

    def on_train_batch_end(self, *args) -> None:
        self.calls.append("on_train_batch_end")


def test_skip_callback_hooks(tmp_path):
    callback = Steps()
    compat.skip_callback_hooks(callback, ["on_before_backward", "on_train_batch_end"])
    with names(
        compat.skip_callback_hooks,
        "pytorch-lightning",
        "which callback hooks its dispatcher (pytorch_lightning.trainer.call._call_callback_hooks) calls",
    ):
        make_trainer(tmp_path, [callback]).fit(Tiny(), loader())
        assert callback.calls == ["on_train_batch_start"] * BATCHES


def test_restore_callback_hooks(tmp_path):
    callback = Steps()
    compat.skip_callback_hooks(callback, ["on_before_backward", "on_train_batch_end"])
    compat.restore_callback_hooks(callback, ["on_before_backward", "on_train_batch_end"])
    with names(compat.restore_callback_hooks, "pytorch-lightning", "how it calls callback hooks"):
        make_trainer(tmp_path, [callback]).fit(Tiny(), loader())
        assert callback.calls == ["on_train_batch_start", "on_before_backward", "on_train_batch_end"] * BATCHES


class BatchesDone(pl.Callback):
    """batches_done_in_epoch at each training batch's end and each epoch's end; a checkpoint in
    the middle of the first epoch, as TrainingState writes one on a signal."""

    def __init__(self, checkpoint=None) -> None:
        self.seen: list[tuple[str, int]] = []
        self.checkpoint = checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(("batch", compat.batches_done_in_epoch(trainer)))
        if self.checkpoint is not None and trainer.current_epoch == 0 and batch_idx == 1:
            trainer.save_checkpoint(self.checkpoint)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seen.append(("epoch end", compat.batches_done_in_epoch(trainer)))


def test_batches_done_in_epoch(tmp_path):
    first, resumed, checkpoint = BatchesDone(tmp_path / "mid.ckpt"), BatchesDone(), tmp_path / "mid.ckpt"
    with names(compat.batches_done_in_epoch, "pytorch-lightning", "its training loop's batch progress"):
        make_trainer(tmp_path, [first], epochs=2).fit(Tiny(), loader())
        epoch = [*(("batch", n) for n in range(1, BATCHES + 1)), ("epoch end", BATCHES)]
        assert first.seen == epoch * 2  # counted from 0 again each epoch
        # Resumed from the checkpoint after batch 2: the count goes on from there (data.py's state_dict).
        make_trainer(tmp_path, [resumed], epochs=2).fit(Tiny(), loader(), ckpt_path=checkpoint, weights_only=True)
        assert resumed.seen[:2] == [("batch", 3), ("epoch end", 3)] and resumed.seen[2:] == epoch


def shown_by_tensorboard(experiment) -> list[str]:
    """The hyperparameter columns TensorBoard's HPARAMS tab ticks: its backend sorts the
    experiment's hparam_infos (with its dashboard's hparamsLimit of 1000), its dashboard ticks
    the first five."""
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

    _sort_and_reduce_to_hparams_limit(experiment, 1000)
    return [info.name for info in experiment.hparam_infos][:5]


def test_tick_hparams():
    params = {name: 1.0 for name in "abcdefg"}
    experiment, _, _ = hparams(params, {"val/acc": 0.0})
    content = plugin_data_pb2.HParamsPluginData.FromString(experiment.value[0].metadata.plugin_data.content)
    compat.tick_hparams(content.experiment, ["g", "c", "e", "a", "f"])
    with names(compat.tick_hparams, "tensorboard", "how its HPARAMS backend orders the hyperparameters"):
        assert shown_by_tensorboard(content.experiment) == ["a", "c", "e", "f", "g"]


def test_ignore_lightning_pytree_deprecation(tmp_path):
    with names(
        compat.ignore_lightning_pytree_deprecation,
        "pytorch-lightning",
        f"where torch's LeafSpec deprecation comes from (or torch {version('torch')} no longer gives it: "
        "drop the filter)",
    ):
        with warnings.catch_warnings(record=True) as unfiltered:
            warnings.simplefilter("always")
            make_trainer(tmp_path).fit(Tiny(), loader())
        sources = {w.filename for w in unfiltered if "LeafSpec" in str(w.message)}
        assert sources and all(path.endswith("pytorch_lightning/utilities/_pytree.py") for path in sources), sources
        with warnings.catch_warnings(record=True) as filtered:
            warnings.simplefilter("always")
            compat.ignore_lightning_pytree_deprecation()
            make_trainer(tmp_path).fit(Tiny(), loader())
        assert not [w for w in filtered if "LeafSpec" in str(w.message)]


def test_phase_methods(tmp_path, monkeypatch):
    calls: dict[str, list[tuple]] = {}
    for role, (module, path) in compat.phase_methods().items():
        with names(compat.phase_methods, "pytorch-lightning", f"{module}.{path}"):
            owner = importlib.import_module(module)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, name)

        def counted(*args, _role=role, _original=original, **kwargs):
            calls.setdefault(_role, []).append(args[1:] + tuple(kwargs.values()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, functools.wraps(original)(counted))
    checkpoint = tmp_path / "model.ckpt"
    with names(compat.phase_methods, "pytorch-lightning", "the methods that run a fit's phases"):
        fitted = make_trainer(tmp_path)
        fitted.fit(Tiny(), loader(), loader())
        fitted.save_checkpoint(checkpoint)
        fitted.test(Tiny(), loader(), ckpt_path=checkpoint, weights_only=True)
        assert len(calls["training epoch"]) == 1  # one epoch
        assert len(calls["evaluation"]) == 3  # the sanity check, validation, test
        assert any(str(checkpoint) in map(str, args) for args in calls["checkpoint load"]), calls["checkpoint load"]


def run_hydra_app(config_dir, run_dir, monkeypatch) -> tuple[int, list[str]]:
    """Hydra's command line, run once on a one-key app: how many times it composed the config, and
    the hydra.mode of each run of the app."""
    import hydra
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    composed, modes = [], []
    compose = Hydra.compose_config

    def counted(self, *args, **kwargs):
        composed.append(1)
        return compose(self, *args, **kwargs)

    @hydra.main(version_base="1.3", config_path=str(config_dir), config_name="app")
    def app(cfg) -> None:
        modes.append(str(HydraConfig.get().mode))

    monkeypatch.setattr(Hydra, "compose_config", counted)
    monkeypatch.setattr("sys.argv", ["app.py", "x=2", f"hydra.run.dir={run_dir}"])
    try:
        app()
    finally:
        GlobalHydra.instance().clear()
    return len(composed), modes


def test_one_hydra_run(tmp_path, monkeypatch):
    from hydra._internal.hydra import Hydra

    (tmp_path / "app.yaml").write_text("x: 1\n")
    get_mode = Hydra.get_mode
    with names(compat.one_hydra_run, "hydra-core", "how its command line finds the run mode (Hydra.get_mode)"):
        assert run_hydra_app(tmp_path, tmp_path / "plain", monkeypatch) == (2, ["RunMode.RUN"])
        with compat.one_hydra_run():
            assert run_hydra_app(tmp_path, tmp_path / "fenced", monkeypatch) == (1, ["RunMode.RUN"])
    assert Hydra.get_mode is get_mode
