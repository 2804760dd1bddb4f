"""The training recipe: seed, build data / model / trainer from config, fit, test the best checkpoint."""

import difflib
import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mnist_lab.callbacks import EpochTimer, Interrupted, TrainingState, skip_idle_step_hooks, stop_on_signals
from mnist_lab.captured import CapturedSteps, check_capture
from mnist_lab.checkpoint import read_checkpoint
from mnist_lab.compat import ignore_lightning_pytree_deprecation
from mnist_lab.errors import InputError, config_errors, is_whole
from mnist_lab.figures import plot_curves
from mnist_lab.hparams import hparams_of, log_hparams
from mnist_lab.loggers import build_loggers, finish_loggers, forget_after
from mnist_lab.resume import check_run_start
from mnist_lab.run_folder import (
    LAST_CHECKPOINT,
    METRICS_FILE,
    ensure_writable,
    holding,
    record_finished,
    record_interrupted,
)
from mnist_lab.sweep_folder import run_name

log = logging.getLogger(__name__)
# Lightning advertises its cloud logger at every Trainer start, in every run's log: drop that line.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
# Nor is its note that it adds no default summary beside ours (callbacks.model_summary) news to anyone.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "Skipping setting a default `ModelSummary` callback" not in record.getMessage()
)
# A resumed run goes on in its own checkpoints/ folder: that it is not empty is the point.
warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty\.", UserWarning)
# A run resumed mid-epoch goes on with the batches it had not trained on: MNISTDataModule keeps
# that position itself (its state_dict), where Lightning looks for it on the loader.
warnings.filterwarnings("ignore", r"You're resuming from a checkpoint that ended before the epoch ended", UserWarning)
# In-memory batches need no loader workers; Lightning's advice to add some does not apply.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# On a machine with SLURM installed, Lightning advises prepending srun to every command; here a
# sweep goes to SLURM through hydra/launcher=slurm, whose jobs do run under srun.
warnings.filterwarnings("ignore", ".*The `srun` command is available on your system but is not used.*")
ignore_lightning_pytree_deprecation()  # in every fit: Lightning's to change, nothing a user can act on


def run(
    cfg: DictConfig,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    swept: Sequence[str] = (),
    resume_from: str | Path | None = None,
    extra_callbacks: Sequence[pl.Callback] = (),
) -> dict[str, Any]:
    """Train and test one configuration in out_dir and return its metrics. `overrides` (the command
    line's) join the HPARAMS tab where they can change the results (mnist_lab.hparams.hparams_of);
    `swept` (a sweep's keys) name the TensorBoard run and get HPARAMS' ticked columns; `resume_from`,
    a checkpoint of this run, continues it; `extra_callbacks` join the configured ones (a sweeper's).
    A signal raises Interrupted after saving a checkpoint. Refused (InputError) when out_dir holds
    files that are not mnist_lab's, a finished run, or a stopped one not given as `resume_from`, or
    while another process has it."""
    out_dir = Path(out_dir)
    if rank_zero_only.rank != 0:  # DDP's other processes train in the first one's folder, which holds it
        return train(cfg, out_dir, overrides, swept, resume_from, extra_callbacks)
    check_run_start(out_dir, resume_from is not None)  # before the lock, which would mark the folder as ours
    with holding(out_dir):
        return train(cfg, out_dir, overrides, swept, resume_from, extra_callbacks)


def train(
    cfg: DictConfig,
    out_dir: Path,
    overrides: Sequence[str],
    swept: Sequence[str],
    resume_from: str | Path | None,
    extra_callbacks: Sequence[pl.Callback],
) -> dict[str, Any]:
    """run's work, in a folder it has checked and holds."""
    ensure_writable(out_dir)
    check_config(cfg)
    log.info("torch uses %d CPU threads", torch.get_num_threads())
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    best, timer, state = best_checkpoint(cfg, out_dir), EpochTimer(), TrainingState(out_dir / LAST_CHECKPOINT)
    configured = [c for key in cfg.callbacks if key != "checkpoint" and (c := build_callback(cfg, key)) is not None]
    # The timer first: it has recorded the epoch's time when the epoch line (callbacks.epoch_log) reads it.
    callbacks = [timer, *configured, *extra_callbacks, best, state]
    skip_idle_step_hooks(callbacks)
    logger_kwargs = logger_run(out_dir, swept, overrides, resume_from, model)
    trainer = build_trainer(cfg, out_dir, logger_kwargs, callbacks)
    with recording_stops(trainer, out_dir, state), stop_on_signals(state):
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        finally:
            if model.captured is not None:  # its graph goes now, even when the fit failed: see release
                model.captured.release()
        # Read now: testing the best checkpoint restores the callbacks' state as it was then.
        fit_time, epoch_times, capture_time = timer.fit_time, list(timer.epoch_times), timer.capture_time
        (test,) = trainer.test(
            model, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False, weights_only=True
        )
    metrics = {
        "status": "ok",
        "val/acc": best.best_model_score.item(),
        "test/acc": test["test/acc"],
        "test/loss": test["test/loss"],
        "epochs": trainer.current_epoch,
        "fit_time_s": round(fit_time, 3),
        "epoch_train_time_s": [round(t, 3) for t in epoch_times],
        **({"capture_time_s": round(capture_time, 3)} if cfg.get("compile") else {}),
        "best_checkpoint": str(Path(best.best_model_path).relative_to(out_dir)),
        **({"resumed_from_step": logger_kwargs["purge_step"]} if resume_from else {}),
    }
    if trainer.is_global_zero:  # DDP: one process writes the run's files
        finish(cfg, out_dir, trainer.loggers, metrics, overrides, swept)
    return metrics


def best_checkpoint(cfg: DictConfig, out_dir: Path) -> ModelCheckpoint:
    """The callback that keeps the best checkpoint by val/acc, which the run tests."""
    if cfg.callbacks.get("checkpoint") is None:
        raise InputError(
            "callbacks.checkpoint=null leaves no best checkpoint to test: "
            "keep callbacks.checkpoint (drop that override)"
        )
    best = build_callback(cfg, "checkpoint")
    if not isinstance(best, ModelCheckpoint):
        raise InputError(
            f"callbacks.checkpoint must be a ModelCheckpoint, got {type(best).__name__}: drop that override"
        )
    if (best.monitor, best.mode) != ("val/acc", "max"):  # the run reports its best_model_score as val/acc
        raise InputError(
            f"callbacks.checkpoint keeps the best val/acc (monitor=val/acc, mode=max), got "
            f"monitor={best.monitor}, mode={best.mode}: drop those overrides"
        )
    if best.dirpath is None:
        best.dirpath = str(out_dir / "checkpoints")  # not under the logger's run name
    elif not Path(best.dirpath).resolve().is_relative_to(out_dir.resolve()):
        raise InputError(
            f"callbacks.checkpoint.dirpath={best.dirpath} is outside the run folder {out_dir}: checkpoints stay in "
            "it (drop that override)"
        )
    return best


def build_trainer(
    cfg: DictConfig, out_dir: Path, logger_kwargs: dict[str, Any], callbacks: list[pl.Callback]
) -> pl.Trainer:
    """The trainer, writing into out_dir through the configured loggers (TensorBoard first)."""
    tensorboard = {k: v for k, v in logger_kwargs.items() if k in ("version", "purge_step")}
    loggers = build_loggers(
        cfg,
        out_dir,
        tensorboard,
        run_name=logger_kwargs.get("version") or out_dir.name,
        mlflow_run_id=logger_kwargs.get("mlflow_run_id"),
    )
    if "purge_step" in logger_kwargs:
        forget_after(loggers, logger_kwargs["purge_step"])
    with config_errors("trainer"):
        return instantiate(cfg.trainer, default_root_dir=str(out_dir), logger=loggers, callbacks=callbacks)


def build_callback(cfg: DictConfig, key: str) -> pl.Callback | None:
    """callbacks.<key>, or None where it is set to null."""
    if cfg.callbacks[key] is None:
        return None
    with config_errors(f"callbacks.{key}"):
        return instantiate(cfg.callbacks[key])


@contextmanager
def recording_stops(trainer: pl.Trainer, out_dir: Path, state: TrainingState) -> Iterator[None]:
    """A run stopped by a signal records where it goes on from, in metrics.json, and raises
    Interrupted. That is last.ckpt's step: Lightning itself stops mid-validation on SIGTERM, after
    steps that no checkpoint holds."""
    try:
        yield
    except (Interrupted, SIGTERMException) as e:
        stopped = e if isinstance(e, Interrupted) else Interrupted("SIGTERM")
        if trainer.is_global_zero:
            step = state.saved_step if state.saved_step is not None else trainer.global_step
            record_interrupted(out_dir, stopped.signal_name, step)
        raise stopped from None


def finish(
    cfg: DictConfig,
    out_dir: Path,
    loggers: Sequence[pl.loggers.Logger],
    metrics: dict[str, Any],
    overrides: Sequence[str],
    swept: Sequence[str],
) -> None:
    """The run's last files: HPARAMS with the final metrics, curves.png, metrics.json, the same to
    the other loggers; a summary."""
    params = hparams_of(cfg, overrides, swept)
    if loggers and isinstance(loggers[0], TensorBoardLogger):
        log_hparams(loggers[0], params, swept)
        plot_curves(out_dir, Path(loggers[0].log_dir))
    record_finished(out_dir, metrics)
    finish_loggers(loggers, params, [out_dir / "curves.png", out_dir / METRICS_FILE])
    logdir = "outputs" if out_dir.resolve().is_relative_to(Path("outputs").resolve()) else out_dir
    log.info(
        "Run folder: %s\nTest accuracy: %.2f%% (best val/acc %.2f%%, %d epoch%s, %.1f s)\n"
        "TensorBoard: tensorboard --logdir %s",
        out_dir,
        100 * metrics["test/acc"],
        100 * metrics["val/acc"],
        metrics["epochs"],
        "" if metrics["epochs"] == 1 else "s",
        metrics["fit_time_s"],
        logdir,
    )


def check_config(cfg: DictConfig) -> None:
    """Refuse what no object checks for itself, before any work is done."""
    for key, low, example in (("seed", 0, 1), ("trainer.max_epochs", 1, 5), ("trainer.log_every_n_steps", 1, 50)):
        value = OmegaConf.select(cfg, key)
        if not is_whole(value) or not low <= value < 2**32:
            raise InputError(
                f"{key} must be at least {low} (a whole number below 2**32), got {value!r}: pass e.g. {key}={example}"
            )
    if not isinstance(cfg.compile, bool):
        raise InputError(f"compile must be true or false, got {cfg.compile!r}: pass compile=true or compile=false")
    check_trainer_arguments(cfg.trainer)
    if "spawn" in str(cfg.trainer.get("strategy", "")):
        raise InputError(
            f"trainer.strategy={cfg.trainer.strategy} is not supported: it trains in processes of its own, where "
            "mnist_lab's callbacks (timing, checkpoints for resume, signals) do not reach. "
            "Use trainer=ddp or trainer=ddp_cpu"
        )
    check_capture(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise InputError(
            "trainer=gpu, but PyTorch sees no CUDA GPU here: use trainer=cpu, or the default, which picks one"
        )


def check_trainer_arguments(trainer: DictConfig) -> None:
    """A trainer.* key that the Trainer does not take (a `+trainer.limit_train_batchs=2`) is
    refused with the nearest argument it does take, not with the TypeError of its __init__."""
    with config_errors("trainer"):
        parameters = inspect.signature(get_class(trainer._target_)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # a Trainer of the user's own that takes any keyword
    for key in trainer:
        if not str(key).startswith("_") and key not in parameters:  # _target_, _convert_: Hydra's own
            close = difflib.get_close_matches(str(key), list(parameters), n=1, cutoff=0.6)
            hint = f"did you mean trainer.{close[0]}?" if close else f"its arguments: {', '.join(parameters)}"
            raise InputError(f"trainer.{key}: {trainer._target_} takes no such argument; {hint}")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The data module and the model of a configuration; with compile=true, the captured step
    between them, and the whole data set on the training device for it to gather from."""
    captured = {"captured_steps": cfg.steps_per_replay, "on_device": True} if cfg.get("compile") else {}
    with config_errors("data"):  # data.augment stays plain data, built by the data module
        datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all", **captured)
    with config_errors("model"):
        model = instantiate(
            cfg.model,
            optimizer=cfg.optimizer,
            scheduler=cfg.scheduler,
            loss=cfg.loss,
            _recursive_=False,
            _convert_="all",
        )
    classes = len(datamodule.dataset_cls.classes) if hasattr(datamodule, "dataset_cls") else None
    if classes is not None and model.hparams.get("num_classes", classes) != classes:
        raise InputError(
            f"model.num_classes={model.hparams.num_classes}, but {datamodule.dataset_cls.__name__} has {classes} "
            f"classes: drop that override (the default is {classes})"
        )
    if captured:
        train_set = lambda: (datamodule.train_set.images, datamodule.train_set.labels)  # noqa: E731  once set up
        model.captured = CapturedSteps(model, train_set, datamodule.normalize, cfg.steps_per_replay)
        # The captured step returns no loss for Lightning to step on (it has stepped), and the
        # learning rate is a tensor, which LearningRateMonitor copies with torch.tensor: no warnings.
        warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
        warnings.filterwarnings(
            "ignore", "To copy construct from a tensor", module="pytorch_lightning.callbacks.lr_monitor"
        )
    return datamodule, model


def logger_run(
    out_dir: Path,
    swept: Sequence[str],
    overrides: Sequence[str],
    resume_from: str | Path | None,
    model: pl.LightningModule,
) -> dict[str, Any]:
    """The logger's run: named by the swept values in a sweep; for a resumed run, the one in its
    checkpoint, with `purge_step` so that TensorBoard drops the steps logged after that
    checkpoint by the stopped process (they are trained and logged again)."""
    if resume_from is None:
        run = {"version": run_name(swept, overrides)} if swept else {}
        if any(out_dir.rglob("events.out.tfevents.*")):  # a run killed before its first checkpoint
            run["purge_step"] = 0
        return run
    checkpoint = read_checkpoint(resume_from)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")} != expected:
        raise InputError(
            f"{resume_from} does not hold this run's {type(model).__name__}: its weights have other "
            f"names or shapes; start a new run instead"
        )
    state = checkpoint.get("callbacks", {}).get(TrainingState.__qualname__, {})
    run = {"purge_step": checkpoint["global_step"]}  # the first step the resumed run logs
    if state.get("logger_version") is not None:
        run["version"] = state["logger_version"]
    if state.get("mlflow_run_id") is not None:  # logger=mlflow: the same MLflow run goes on
        run["mlflow_run_id"] = state["mlflow_run_id"]
    return run
