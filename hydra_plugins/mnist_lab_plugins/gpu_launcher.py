"""hydra/launcher=gpus: several jobs at once on each GPU, each job pinned to one GPU.

One small job (LeNet-5 on MNIST) leaves a large GPU waiting on the host; several side by side use
it. The launcher keeps `jobs_per_gpu` worker processes for each GPU, started with spawn (never a
fork of a parent that may hold CUDA) and with CUDA_VISIBLE_DEVICES set to their GPU alone, so
every job in one sees one device, cuda:0. Jobs go to whichever worker is free; a worker runs one
job at a time and stays up for the next, so Python, torch and Lightning load once per worker, not
once per job. The cores are shared out: each worker's torch takes cores / workers threads.

With no GPU (gpus: [] or none found), `jobs_per_gpu` workers run jobs at once on the CPU.

Stopping the sweep stops its workers. SIGTERM or Ctrl-C of the launching process is passed on to
every worker: the running jobs save a checkpoint and stop, as a run on its own does. Each worker
also watches its parent: if the sweep's process dies outright (SIGKILL), its job is stopped the
same way and the worker exits within seconds, so that no worker is left training into a folder
that the same command, run again, also writes. A worker killed mid-job leaves that job stopped,
with its report and one line; the same command goes on from its last checkpoint.
"""

import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from hydra_plugins.mnist_lab_plugins._worker import call, pin
from mnist_lab.errors import InputError, is_whole, one_line_errors
from mnist_lab.run_folder import record_interrupted, resume_command

log = logging.getLogger(__name__)
MAX_JOBS_PER_GPU = 64  # each a process holding torch and a CUDA context: far more than a GPU has room for


class GpuLauncher(Launcher):
    def __init__(self, jobs_per_gpu: int, gpus: Sequence[int] | str = "auto") -> None:
        with one_line_errors():  # before any job; Hydra would wrap an exception in two paragraphs
            if not is_whole(jobs_per_gpu) or not 1 <= jobs_per_gpu <= MAX_JOBS_PER_GPU:
                raise InputError(
                    f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: jobs at once on each GPU must be a whole number "
                    f"from 1 to {MAX_JOBS_PER_GPU}, e.g. 4"
                )
            self.devices = visible_gpus(gpus)
        self.jobs_per_gpu = jobs_per_gpu

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        slots = [device for device in self.devices or [None] for _ in range(self.jobs_per_gpu)]
        # Started at their first job; kept for the next launch (an Optuna search launches batch after batch).
        self.workers: queue.Queue[Worker] = queue.Queue()
        for slot in slots:
            self.workers.put(Worker(slot, threads=max(1, (os.cpu_count() or 1) // len(slots))))
        self.slots = len(slots)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        where = (
            f"{self.jobs_per_gpu} at once on each of GPUs {','.join(self.devices)}"
            if self.devices
            else f"{self.jobs_per_gpu} at once on the CPU"
        )
        log.info("Launching %d jobs, %s, in %s", len(job_overrides), where, self.config.hydra.sweep.dir)
        state = Singleton.get_state()

        stopped = threading.Event()

        def run(num: int, overrides: Sequence[str]) -> JobReturn:
            worker = self.workers.get()
            try:
                if stopped.is_set():  # stopped while this job waited for a free worker: it does not start
                    raise KeyboardInterrupt
                log.info(
                    "\t#%d : %s%s",
                    num,
                    " ".join(filter_overrides(overrides)),
                    f" (GPU {worker.gpu})" if worker.gpu is not None else "",
                )
                return worker.run(
                    run_sweep_job, num, overrides, self.hydra_context, self.config, self.task_function, state
                )
            except WorkerDied:
                return self._died(num, overrides)
            except SystemExit:  # the job was stopped by a signal; this process may not have seen it (only
                stopped.set()  # the main thread acts on signals, and the kernel may hand it to another)
                raise
            finally:
                self.workers.put(worker)

        threads = ThreadPoolExecutor(self.slots)
        futures = [
            threads.submit(run, num, overrides) for num, overrides in enumerate(job_overrides, start=initial_job_idx)
        ]
        try:
            with passing_on_sigterm():
                return [future.result() for future in futures]
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or a job stopped by a signal (SIGTERM: 143)
            stopped.set()  # the running jobs save a checkpoint and say how to resume; no other starts
            stop_workers()  # a Ctrl-C given to this process alone (not the terminal's group) reaches them too
            sys.exit(e.code if isinstance(e, SystemExit) else 130)
        finally:
            threads.shutdown(wait=True, cancel_futures=True)

    def _died(self, num: int, overrides: Sequence[str]) -> JobReturn:
        """Job `num`'s worker died mid-job (killed, or out of memory): its folder says it stopped and
        how to go on, the sweep's callbacks see the job end (the report is written), one line says so,
        and the sweeper gets a failed trial's NaN rather than an exception."""
        config = job_config(self.hydra_context, self.config, num, overrides)
        folder = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        if folder.is_dir():
            record_interrupted(folder, "killed", None)  # by which signal (or for memory) is not known here
        resume = resume_command(Path(config.hydra.sweep.dir))
        log.error(
            "Error: job %d's process died before it finished (killed, or out of memory): the same command, or %s, "
            "goes on from its last checkpoint",
            num,
            resume,
        )
        ret = JobReturn(overrides=list(overrides), cfg=config, hydra_cfg=config, status=JobStatus.COMPLETED)
        ret.return_value = math.nan
        with open_dict(config):
            config.hydra.runtime.output_dir = str(folder)
        self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
        return ret


class WorkerDied(Exception):
    """A worker process ended in the middle of a job."""


def stop_workers() -> None:
    """SIGTERM to every worker process: their running jobs save a checkpoint and stop."""
    for worker in multiprocessing.active_children():
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:  # ended meanwhile
            pass


@contextmanager
def passing_on_sigterm() -> Iterator[None]:
    """While jobs run, SIGTERM to this process stops the workers' jobs too (each saves a checkpoint),
    then this process, once they have: `kill <sweep>` leaves nothing running."""

    def handler(signum: int, frame: Any) -> None:
        stop_workers()
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep_job(
    num: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> JobReturn:
    """Job `num` of the sweep, in a worker process, through Hydra's plugin API as Hydra's joblib and
    submitit launchers run theirs: the launching process's Hydra state, the job's config, run_job."""
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = job_config(hydra_context, config, num, overrides)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def job_config(hydra_context: HydraContext, config: DictConfig, num: int, overrides: Sequence[str]) -> DictConfig:
    """Job `num`'s config, as Hydra's own launchers build it: the sweep's, with its overrides, id and number."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
        sweep_config.hydra.job.num = num
    return sweep_config


def visible_gpus(gpus: Sequence[int] | str) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each GPU to use: `gpus` ("auto": all that this process
    may use) as indices among the GPUs CUDA_VISIBLE_DEVICES lets this process see."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",") if name.strip()] if visible is not None else None
    if gpus == "auto":
        import torch  # CUDA that counting may start here is never inherited: workers are spawned

        return (names or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]
    if isinstance(gpus, str) or not all(is_whole(i) and i >= 0 for i in gpus):
        raise InputError(f"hydra.launcher.gpus={gpus}: give auto, or a list of GPU indices such as [0,1]")
    if names is not None and any(i >= len(names) for i in gpus):
        raise InputError(
            f"hydra.launcher.gpus={list(gpus)}: CUDA_VISIBLE_DEVICES={visible} leaves "
            f"{len(names)} GPU(s) visible: give indices below {len(names)}"
        )
    return [names[i] if names is not None else str(i) for i in gpus]


class Worker:
    """One process that runs jobs one after the other, pinned to one GPU (None: CPU only)."""

    def __init__(self, gpu: str | None, threads: int) -> None:
        self.gpu, self.threads = gpu, threads
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            1, mp_context=get_context("spawn"), initializer=pin, initargs=(self.gpu, self.threads)
        )

    def run(self, fn: Any, num: int, *args: Any) -> JobReturn:
        try:
            return cloudpickle.loads(self._pool.submit(call, cloudpickle.dumps((fn, (num, *args)))).result())
        except BrokenProcessPool:  # killed (out of memory?): this job stops here, the next gets a new process
            # Waited for: its manager thread closes its pipes itself, and an exit then finds none half-closed.
            self._pool.shutdown(wait=True)
            self._pool = self._start()
            raise WorkerDied from None
