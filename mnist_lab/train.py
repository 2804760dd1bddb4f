"""The training recipe: seed, build data / model / trainer from config, fit, test the best checkpoint."""

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard.summary import hparams

# ProgressBar too: the .hydra/config.yaml of a run started before it moved names mnist_lab.train.ProgressBar.
from mnist_lab.callbacks import EpochTimer, ProgressBar, skip_idle_step_hooks  # noqa: F401
from mnist_lab.captured import CapturedSteps, check_capture
from mnist_lab.errors import InputError
from mnist_lab.figures import plot_curves
from mnist_lab.report import SWEEP_FILE, run_name
from mnist_lab.resume import (
    LAST_CHECKPOINT, Interrupted, TrainingState, check_resumable, check_run_folder, claim, stop_on_signals,
)

log = logging.getLogger(__name__)
# Lightning advertises its cloud logger at every Trainer start, in every run's log: drop that line.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())

# The metrics of TensorBoard's HPARAMS tab, in its column order: scalar tags, at their last value.
HPARAM_METRICS = ("val/acc", "test/acc", "test/loss", "val/acc_best", "val/loss")


def ensure_writable(folder: Path) -> None:
    """Create `folder` and prove it writable, or raise an InputError that says how to fix it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(
            f"cannot write to the output folder {folder} ({e.strerror}): pass a writable one with "
            "hydra.run.dir=... (hydra.sweep.dir=... for -m), or run from a writable directory"
        ) from None


class CheckOutputDir(HydraCallback):
    """Before Hydra writes into the run or sweep folder, refuses one that is unwritable, holds
    another run or sweep, or is a bad resume=, with one message; then locks it for this process."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # DDP's other processes run in the first one's folder
            return
        folder = Path(config.hydra.run.dir)
        if config.get("resume"):
            self._check(folder, lambda: check_resume_command(folder, config.hydra.overrides.task))
        else:
            self._check(folder, lambda: check_run_folder(folder, config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        def check() -> None:
            check_sweep_folder(Path(config.hydra.sweep.dir))
            # trainer=ddp for the whole sweep: refused before any job
            check_multirun_strategy(config, OmegaConf.select(config, "hydra.launcher._target_"))

        self._check(Path(config.hydra.sweep.dir), check)

    @staticmethod
    def _check(folder: Path, check: Callable[[], Any]) -> None:
        try:
            check()
            ensure_writable(folder)
            claim(folder)
        except InputError as e:
            sys.exit(f"Error: {e}")
        except Exception as e:  # Hydra would only warn and go on: fail closed instead
            sys.exit(f"Error: could not check the output folder {folder}: {type(e).__name__}: {e}")


def check_resume_command(folder: Path, overrides: Sequence[str]) -> None:
    """resume=<folder> alone: the run goes on with the settings it was started with."""
    if others := [o for o in overrides if not o.startswith("resume=")]:
        raise InputError(
            f"resume= continues a run with the settings it was started with; {' '.join(others)} would not "
            "apply: drop it, or start a new run"
        )
    check_resumable(folder)


def check_sweep_folder(folder: Path) -> None:
    if (folder / SWEEP_FILE).exists() or (folder / "multirun.yaml").exists():
        raise InputError(f"{folder} already holds a sweep: pass a new folder with hydra.sweep.dir=..., or delete that one")


def check_multirun_strategy(cfg: DictConfig, launcher: str | None) -> None:
    """Lightning starts DDP's other processes by running the command line again: inside -m that
    would start the whole sweep again. With the SLURM launcher (`launcher`, the hydra.launcher
    target) and one task per device, the tasks are the processes."""
    strategy = str(cfg.trainer.get("strategy", ""))
    on_slurm = (launcher or "").endswith("SlurmLauncher") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if strategy.startswith("ddp") and not on_slurm:
        raise InputError(
            f"trainer.strategy={strategy} cannot run inside -m here: Lightning would start each extra process by "
            "running this whole sweep again. Run it without -m, one configuration at a time, or sweep on a "
            "cluster with hydra/launcher=slurm and hydra.launcher.tasks_per_node=<devices> (one task per device)"
        )


def threads_per_job(hydra_cfg: DictConfig) -> int | None:
    """CPU threads for each job when a launcher runs jobs side by side, so that they share the
    cores instead of fighting over them: the cores over hydra.launcher.n_jobs (joblib), or
    hydra.launcher.cpus_per_task (submitit); None when jobs run one at a time."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    if cpus := OmegaConf.select(hydra_cfg, "launcher.cpus_per_task"):
        return cpus
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs")
    if n_jobs is None:
        return None
    cores = os.cpu_count() or 1
    return max(1, cores // (cores if n_jobs < 0 else min(n_jobs, cores)))


def hparams_of(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HPARAMS tab shows: a fixed set, plus every key set on the
    command line. Every job of a sweep gets the same keys, so the table lines up."""
    short = lambda target: target.rsplit(".", 1)[-1]  # noqa: E731
    params: dict[str, Any] = {
        "model": short(cfg.model._target_), "optimizer": short(cfg.optimizer._target_),
        "scheduler": short(cfg.scheduler._target_), "optimizer.lr": cfg.optimizer.lr,
        "augment": short(cfg.data.augment._target_) if cfg.data.get("augment") else "none",
        "data.dataset": cfg.data.dataset, "data.batch_size": cfg.data.batch_size, "seed": cfg.seed,
        "trainer.max_epochs": cfg.trainer.max_epochs,
    }
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        value = OmegaConf.select(cfg, key, default=None)
        if key not in params and not key.startswith("hydra.") and not isinstance(value, DictConfig):
            # A config group (model=mlp) shows through the fixed keys; a value shows as itself.
            params[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return params


def check_config(cfg: DictConfig) -> None:
    """Refuse what no object checks for itself, before any work is done."""
    if not cfg.trainer.max_epochs >= 1:
        raise InputError(f"trainer.max_epochs must be at least 1, got {cfg.trainer.max_epochs}: pass e.g. trainer.max_epochs=5")
    if "spawn" in str(cfg.trainer.get("strategy", "")):
        raise InputError(
            f"trainer.strategy={cfg.trainer.strategy} is not supported: it trains in processes of its own, where "
            "mnist_lab's callbacks (timing, checkpoints for resume, signals) do not reach. Use trainer=ddp or trainer=ddp_cpu"
        )
    check_capture(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise InputError("trainer=gpu, but PyTorch sees no CUDA GPU here: use trainer=cpu, or the default, which picks one")


def log_hparams(logger: TensorBoardLogger, params: dict[str, Any], swept: Sequence[str] = ()) -> None:
    """Give TensorBoard's HPARAMS tab this run's hyperparameters and the metrics to show.

    Written after testing, so each metric's last logged value is the final one (Lightning's own
    call at fit start would show a -1 placeholder). The experiment summary, the same for every
    job of a sweep, lists the swept keys first and marks them as differing, so that they are
    among the five columns TensorBoard shows by default, then HPARAM_METRICS, val/acc first.
    """
    experiment, session_start, session_end = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
    plugin_data = experiment.value[0].metadata.plugin_data
    content = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    infos = sorted(content.experiment.hparam_infos, key=lambda info: info.name not in swept)  # stable
    for info in infos:
        info.differs = info.name in swept
        if info.type == api_pb2.DATA_TYPE_STRING:
            info.ClearField("domain_discrete")  # this run's value alone; a sweep has several
    del content.experiment.hparam_infos[:]
    content.experiment.hparam_infos.extend(infos)
    plugin_data.content = content.SerializeToString()
    file_writer = logger.experiment._get_file_writer()
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    file_writer.flush()


def run(cfg: DictConfig, out_dir: str | Path, overrides: Sequence[str] = (), swept: Sequence[str] = (),
        resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train and test one configuration; write out_dir/metrics.json and return the metrics.

    `overrides` are the command line's (Hydra's task overrides): their keys join the HPARAMS tab.
    `swept`, the keys a sweep varies, name the TensorBoard run: the event files go into
    out_dir/<lr=0.01,batch_size=64>, checkpoints into out_dir/checkpoints either way.
    `resume_from`, a checkpoint of this run, continues it: same TensorBoard run, steps going on.
    Stopped by SIGINT/SIGTERM, it raises mnist_lab.resume.Interrupted after saving a checkpoint.
    """
    out_dir = Path(out_dir)
    ensure_writable(out_dir)
    check_config(cfg)
    # In-memory batches need no loader workers; Lightning's advice to add some does not apply.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    log.info("torch uses %d CPU threads", torch.get_num_threads())
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    timer, state = EpochTimer(), TrainingState(out_dir / LAST_CHECKPOINT)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [timer, state]
    best = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if best is None:
        raise InputError(
            "callbacks.checkpoint=null leaves no best checkpoint to test: keep callbacks.checkpoint (drop that override)"
        )
    if best.dirpath is None:
        best.dirpath = str(out_dir / "checkpoints")  # not under the logger's run name
    skip_idle_step_hooks(callbacks)
    logger_kwargs = logger_run(out_dir, swept, overrides, resume_from)
    logger = instantiate(cfg.logger, save_dir=str(out_dir), **logger_kwargs)
    trainer: pl.Trainer = instantiate(cfg.trainer, default_root_dir=str(out_dir), logger=logger, callbacks=callbacks)

    # Data errors surface in prepare_data/setup, before the first training step.
    try:
        with stop_on_signals(state):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
            # Read now: testing the best checkpoint restores the callbacks' state as it was then.
            fit_time, epoch_times = timer.fit_time, list(timer.epoch_times)
            (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=best.best_model_path, verbose=False,
                                   weights_only=True)
    except (Interrupted, SIGTERMException) as e:
        stopped = e if isinstance(e, Interrupted) else Interrupted("SIGTERM")
        if trainer.is_global_zero:
            record_interruption(out_dir, stopped, trainer.global_step)
        raise stopped from None

    metrics = {
        "status": "ok",
        "val/acc": best.best_model_score.item(),
        "test/acc": test["test/acc"],
        "test/loss": test["test/loss"],
        "epochs": trainer.current_epoch,
        "fit_time_s": round(fit_time, 3),
        "epoch_train_time_s": [round(t, 3) for t in epoch_times],
        "best_checkpoint": str(Path(best.best_model_path).relative_to(out_dir)),
    }
    if resume_from is not None:
        metrics["resumed_from_step"] = logger_kwargs["purge_step"]
    if not trainer.is_global_zero:  # DDP: one process writes the run's files
        return metrics
    if isinstance(logger, TensorBoardLogger):
        log_hparams(logger, hparams_of(cfg, overrides), swept)
        plot_curves(out_dir, Path(logger.log_dir))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logdir = "outputs" if out_dir.resolve().is_relative_to(Path("outputs").resolve()) else out_dir
    log.info(
        "Run folder: %s\nTest accuracy: %.2f%% (best val/acc %.2f%%, %d epochs, %.1f s)\nTensorBoard: tensorboard --logdir %s",
        out_dir, 100 * metrics["test/acc"], 100 * metrics["val/acc"], metrics["epochs"], fit_time, logdir,
    )
    return metrics


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """The data module and the model of a configuration; with compile=true, the captured step
    between them, and the whole data set on the training device for it to gather from."""
    captured = {"captured_steps": cfg.steps_per_replay, "on_device": True} if cfg.get("compile") else {}
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all", **captured)  # data.augment stays plain data
    model = instantiate(cfg.model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False, _convert_="all")
    if captured:
        train_set = lambda: (datamodule.train_set.images, datamodule.train_set.labels)  # noqa: E731  once set up
        model.captured = CapturedSteps(model, train_set, datamodule.normalize, cfg.steps_per_replay)
        # The captured step returns no loss for Lightning to step on (it has stepped), and the
        # learning rate is a tensor, which LearningRateMonitor copies with torch.tensor: no warnings.
        warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
        warnings.filterwarnings("ignore", "To copy construct from a tensor", module="pytorch_lightning.callbacks.lr_monitor")
    return datamodule, model


def logger_run(out_dir: Path, swept: Sequence[str], overrides: Sequence[str], resume_from: str | Path | None) -> dict[str, Any]:
    """The logger's run: named by the swept values in a sweep; for a resumed run, the one in its
    checkpoint, with `purge_step` so that TensorBoard drops the steps logged after that
    checkpoint by the stopped process (they are trained and logged again)."""
    if resume_from is None:
        run = {"version": run_name(swept, overrides)} if swept else {}
        if any(out_dir.rglob("events.out.tfevents.*")):  # a run killed before its first checkpoint
            run["purge_step"] = 0
        return run
    checkpoint = torch.load(resume_from, map_location="cpu", weights_only=True)
    state = checkpoint.get("callbacks", {}).get(TrainingState.__qualname__, {})
    run = {"purge_step": checkpoint["global_step"]}  # the first step the resumed run logs
    if state.get("logger_version") is not None:
        run["version"] = state["logger_version"]
    return run


def record_interruption(out_dir: Path, stopped: Interrupted, step: int) -> None:
    """metrics.json says the run was stopped, where, and how to go on."""
    metrics = {
        "status": "interrupted",
        "signal": stopped.signal_name,
        "step": step,
        "checkpoint": str(LAST_CHECKPOINT) if (out_dir / LAST_CHECKPOINT).is_file() else None,
        "resume": f"python train.py resume={out_dir}",
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
