"""The jobs Hydra runs: `job(cfg)`, one run or one job of a sweep in its folder (resumed, kept
from an earlier attempt or trained by mnist_lab.recipe, its failure recorded), the Hydra
callbacks that check the run and sweep folders before Hydra writes into them (CheckOutputDir)
and write the sweep report after every job (SweepReport), and how jobs share a machine."""

import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from mnist_lab.callbacks import Interrupted, OptunaPruning
from mnist_lab.errors import InputError, cause_of, described
from mnist_lab.recipe import run
from mnist_lab.report import write_report
from mnist_lab.resume import (
    check_resume_command,
    check_run_folder,
    check_sweep_folder,
    earlier_attempt,
    record_failed,
    resume_checkpoint,
    resume_config,
)
from mnist_lab.run_folder import (
    LAST_CHECKPOINT,
    claim,
    ensure_writable,
    record_pruned,
    release,
    resume_command,
    study_storage,
    write_metrics,
)
from mnist_lab.sweep_folder import (
    first_failure,
    in_sweep,
    load_jobs,
    record_first_failure,
    record_sweep_keys,
    recorded_sweep_keys,
)

log = logging.getLogger(__name__)
# What this process started, for mnist_lab.fit and mnist_lab.sweep to hand back (in the order started).
runs_started: list[Path] = []
sweep_started: Path | None = None
OPTUNA_SWEEPER = "hydra_plugins.mnist_lab_plugins.optuna_sweeper.OptunaSweeper"  # hydra/sweeper=optuna
JOB_FOLDER_WAIT_S = 90.0  # longer than an orphaned launcher worker takes to stop (its STOP_GRACE_S)


def job(cfg: DictConfig) -> float:
    """One run, or one job of a sweep, in the folder Hydra made for it: val/acc for a sweeper. A
    failed job of a sweep is recorded and the sweep goes on; SweepReport sums up at the end."""
    hydra_cfg = HydraConfig.get()
    if threads := threads_per_job(hydra_cfg):
        torch.set_num_threads(threads)
    out_dir = Path(hydra_cfg.runtime.output_dir)
    runs_started.append(out_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    if multirun and (gpus := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        log.info("Job %d sees GPU %s (CUDA_VISIBLE_DEVICES)", hydra_cfg.job.num, gpus)  # hydra/launcher=gpus pins it
    if not multirun or rank_zero_only.rank != 0:  # CheckOutputDir holds a run's folder; rank 0 a DDP job's
        return attempt(cfg, hydra_cfg, out_dir, overrides, multirun)
    try:  # an earlier attempt's job, stopping, may still hold this folder for a few seconds
        claimed = claim(out_dir, wait_s=JOB_FOLDER_WAIT_S)
    except InputError as e:
        log.error("Error: job %d not started: %s", hydra_cfg.job.num, e)
        return math.nan
    try:
        return attempt(cfg, hydra_cfg, out_dir, overrides, multirun)
    finally:
        if claimed:
            release(out_dir)


def attempt(cfg: DictConfig, hydra_cfg: DictConfig, out_dir: Path, overrides: list[str], multirun: bool) -> float:
    """job's work, in the folder it holds."""
    try:
        if cfg.resume:  # the run's own settings, rebuilt from conf/ and the overrides it was started with
            cfg, overrides = resume_config(out_dir, compose_train, cfg.trusted_targets)
        if multirun and (earlier := earlier_attempt(out_dir, cfg.rerun_failed)) is not None:
            return kept(hydra_cfg.job.num, earlier)  # the same sweep again: this job is done
        if multirun and cfg.fail_fast and (first := first_failure(Path(hydra_cfg.sweep.dir))) is not None:
            return not_started(out_dir, hydra_cfg.job.num, first)
        if multirun:  # again for each job: a swept trainer (trainer=cpu,ddp_cpu) is not in the sweep's config
            check_multirun_strategy(cfg, hydra_cfg.launcher.get("_target_"))
        # In a sweep, the TensorBoard run is named by the swept values: lr=0.01,batch_size=64.
        swept = recorded_sweep_keys(hydra_cfg.sweep.dir) if multirun else []
        resume_from = resume_checkpoint(out_dir)  # a stopped run's folder, given again: it goes on
        pruning = optuna_pruning(hydra_cfg) if multirun else None
        metrics = run(cfg, out_dir, overrides, swept, resume_from, [pruning] if pruning else [])
        if pruning and pruning.pruned_at:
            log.info("Pruned: Optuna's pruner stopped this trial after epoch %d", pruning.pruned_at)
            record_pruned(out_dir, pruning.pruned_at)
    except Interrupted as e:
        if not (out_dir / LAST_CHECKPOINT).is_file():
            print(f"Stopped by {e.signal_name} before the first checkpoint: start the run again", file=sys.stderr)
        else:
            how = f"Resume with:\n  {resume_command(out_dir)}"
            if multirun:
                how = (
                    f"Resume the sweep with:\n  {resume_command(Path(hydra_cfg.sweep.dir))}\nor this job alone with:"
                    f"\n  {resume_command(out_dir)}"
                )
            print(f"Stopped by {e.signal_name}; a checkpoint is saved. {how}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001  every failure is recorded; bad input and the machine's get one line
        if multirun and cfg.get("fail_fast"):
            record_first_failure(Path(hydra_cfg.sweep.dir), out_dir.name)
        return failed(out_dir, e, multirun)
    if resume_from and in_sweep(out_dir):
        write_report(out_dir.parent)  # a sweep job resumed on its own: the sweep's report catches up
    return metrics["val/acc"]


def optuna_pruning(hydra_cfg: DictConfig) -> OptunaPruning | None:
    """The callback that reports a sweep=optuna job's val/acc to its trial, which has the job's number."""
    sweeper = hydra_cfg.sweeper
    if sweeper.get("_target_") != OPTUNA_SWEEPER:
        return None
    storage = study_storage(sweeper.storage, Path(hydra_cfg.sweep.dir))
    return OptunaPruning(storage, sweeper.study_name, instantiate(sweeper.pruner), hydra_cfg.job.num)


def kept(job: int, metrics: dict[str, Any]) -> float:
    """A job that an earlier attempt at the same sweep ended: its result, not run again."""
    if metrics["status"] in ("ok", "pruned"):
        ended = "finished" if metrics["status"] == "ok" else "was pruned"
        log.info("Job %d %s in an earlier attempt at this sweep: kept (val/acc %.4f)", job, ended, metrics["val/acc"])
        return metrics["val/acc"]
    log.error(
        "Error: job %d failed in an earlier attempt at this sweep (%s): kept; add rerun_failed=true to run it again",
        job,
        metrics.get("error"),
    )
    return math.nan


def not_started(out_dir: Path, job: int, first: str) -> float:
    """fail_fast=true, after job `first` failed: this job does not start. Its folder says so, and
    the same sweep again (resume=<sweep folder>) runs it."""
    write_metrics(out_dir, {"status": "not started", "error": f"fail_fast=true: job {first} failed first"})
    log.error("Job %d not started: job %s failed and fail_fast=true stops the sweep", job, first)
    return math.nan


def failed(out_dir: Path, error: Exception, multirun: bool) -> float:
    """Record a failed run in its metrics.json and say so in one line: bad input, or the machine's
    fault (a full disk, memory), with how to go on. A bug's traceback goes to the log too."""
    error = cause_of(error)
    resume = record_failed(out_dir, error) if rank_zero_only.rank == 0 else None
    expected = isinstance(error, (InputError, OSError, MemoryError, torch.cuda.OutOfMemoryError))  # not a bug
    line = str(error) if isinstance(error, InputError) else described(error)
    if resume:
        line += f". The run can go on from its last checkpoint: {resume}"
    if multirun:
        if not expected:
            log.error("job failed", exc_info=error)
        log.error("Error: %s", line)
        return math.nan  # a failed trial to a sweeper; the basic sweeper goes on to the next job
    if expected:
        sys.exit(f"Error: {line}")
    raise error


def compose_train(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, inside the running Hydra app."""
    return compose("train", overrides)


class CheckOutputDir(Callback):
    """Before Hydra writes into the run or sweep folder, refuses one that is unwritable, holds
    files mnist_lab did not write or another run or sweep, or is a bad resume=, with one message;
    then locks it for this process."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # DDP's other processes run in the first one's folder
            return
        folder = Path(config.hydra.run.dir)
        if config.get("resume"):

            def check() -> None:
                check_resume_command(folder, config.hydra.overrides.task)
                resume_config(folder, compose_train, config.trusted_targets)  # refuses code the folder names

            self._check(folder, check)
        else:
            self._check(folder, lambda: check_run_folder(folder, config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        def check() -> None:
            check_sweep_folder(Path(config.hydra.sweep.dir), list(config.hydra.overrides.task))
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
        except Exception as e:  # noqa: BLE001  Hydra would only warn and go on: fail closed instead
            sys.exit(f"Error: could not check the output folder {folder}: {described(e)}")


class SweepReport(Callback):
    """Records the swept keys when a multirun starts (jobs name their TensorBoard runs by them),
    rewrites the sweep's report after every job, and ends a sweep with a failed job with its
    summary and a non-zero exit."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global sweep_started
        sweep_started = record_sweep_keys(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_report(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not Path(config.hydra.sweep.dir).is_dir():
            return
        print(f"Sweep report: {write_report(config.hydra.sweep.dir)}")
        jobs = load_jobs(Path(config.hydra.sweep.dir))
        failed_jobs = [job["job"] for job in jobs if job.get("status") == "failed"]
        which = f"{len(failed_jobs)} job(s) failed (job {', '.join(failed_jobs)})"
        if waiting := [job["job"] for job in jobs if job.get("status") == "not started"]:
            sys.exit(
                f"Error: {which} and fail_fast=true left {len(waiting)} not started: the same command, or "
                f"python train.py resume={config.hydra.sweep.dir}, runs them"
            )
        if failed_jobs:
            sys.exit(f"Error: {which}: their errors are in the report, summary.md")
        if stopped := [job["job"] for job in jobs if job.get("status") == "interrupted"]:
            sys.exit(
                f"Error: {len(stopped)} job(s) stopped before they finished (job {', '.join(stopped)}): the same "
                f"command, or python train.py resume={config.hydra.sweep.dir}, goes on from their last checkpoint"
            )


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
