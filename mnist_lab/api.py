"""mnist_lab from Python: the command line's runs and sweeps as functions, and what they leave.

    import mnist_lab
    run = mnist_lab.fit("model=lenet", "trainer.max_epochs=5")
    run.metrics["test/acc"], run.history, run.plot(), run.classify("digit.png")
    sweep = mnist_lab.sweep("optimizer.lr=0.02,0.05,0.1")
    sweep.jobs, sweep.best

`fit` and `sweep` take the command line's override strings and go the command line's own way
(`main`, which `python train.py` calls): the same run folders, checks, outputs and refusals.
Bad input raises InputError with the line the command line prints; a stop (Ctrl-C, a Jupyter
interrupt) saves a checkpoint and raises RunInterrupted, which says how to go on.
"""

import difflib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from mnist_lab.defaults import default_data_dir
from mnist_lab.errors import InputError, first_line
from mnist_lab.resolvers import register as register_resolvers
from mnist_lab.resume import resumed_sweep_argv
from mnist_lab.run_folder import CONF_DIR, CONFIG_FILE, METRICS_FILE, read_metrics, release_locks

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

__all__ = ["Run", "RunInterrupted", "Sweep", "fit", "load", "main", "sweep"]

# conf/train.yaml's resolvers, before Hydra composes it here or in a launcher's worker process,
# which imports this module to run the app.
register_resolvers()


class RunInterrupted(KeyboardInterrupt):
    """A run or sweep stopped by a signal, with a checkpoint to go on from (`folder`)."""

    def __init__(self, folder: Path | None, code: int, call: str = "fit") -> None:
        how = f": mnist_lab.{call}('resume={folder}') goes on" if folder is not None else ""
        super().__init__(f"stopped ({'SIGINT' if code == 130 else 'SIGTERM'}){how}")
        self.folder = folder


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _app(cfg: DictConfig) -> float:
    from mnist_lab.jobs import job  # torch and Lightning take seconds: --help and a typo answer before

    return job(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """`python train.py ARGS`: the command line, in this process. Bad input ends it with one line."""
    try:
        _hydra(list(sys.argv[1:] if argv is None else argv))
    except InputError as e:
        sys.exit(f"Error: {e}")


def fit(*overrides: str, out_dir: str | Path | None = None) -> "Run":
    """Train and test one configuration, as `python train.py OVERRIDES` does (`out_dir`: its
    hydra.run.dir; by default a new folder under outputs/runs/). `fit("resume=<folder>")` goes
    on with a stopped run."""
    if any(o in ("-m", "--multirun") for o in overrides):
        raise InputError("fit trains one configuration: pass a sweep's overrides to mnist_lab.sweep instead")
    argv = [*overrides, *([f"hydra.run.dir={_quoted(out_dir)}"] if out_dir is not None else [])]
    from mnist_lab.compat import one_hydra_run

    with one_hydra_run():  # a run, never a sweep: Hydra composes its config once
        started = _started(argv)
    if not started:
        raise InputError(f"no run was started by fit{tuple(overrides)}")  # --help, --cfg and the like
    return Run(started[-1])


def sweep(*overrides: str, out_dir: str | Path | None = None) -> "Sweep":
    """Run a multirun, as `python train.py -m OVERRIDES` does (`out_dir`: its hydra.sweep.dir),
    with its report; failed jobs are listed in `.jobs` (the command line exits non-zero)."""
    argv = [
        "-m",
        *(o for o in overrides if o not in ("-m", "--multirun")),
        *([f"hydra.sweep.dir={_quoted(out_dir)}"] if out_dir is not None else []),
    ]
    from mnist_lab import jobs

    try:
        _started(argv)
    except InputError:
        if jobs.sweep_started is None or not (jobs.sweep_started / "summary.md").is_file():
            raise  # refused before any job: nothing to show
    if jobs.sweep_started is None:
        raise InputError(f"no sweep was started by sweep{tuple(overrides)}")
    return Sweep(jobs.sweep_started)


def load(path: str | Path) -> "Run":
    """A finished run, from its folder or one of its checkpoints."""
    path = Path(path)
    folder = path.parent.parent if path.suffix == ".ckpt" else path
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(
            f"{path} is not a run folder, nor a checkpoint in one (no {CONFIG_FILE}): pass a folder under "
            "outputs/runs/, or its checkpoints/<name>.ckpt"
        )
    status = read_metrics(folder).get("status")
    if status not in ("ok", "pruned"):
        raise InputError(
            f"{folder} holds no finished run (status {status or 'unknown'} in {METRICS_FILE}): "
            f"mnist_lab.fit('resume={folder}') goes on with a stopped one"
        )
    run = Run(folder)
    if path.suffix == ".ckpt":
        run.checkpoint = path
    return run


@dataclass
class Run:
    """A run folder that training wrote: its metrics, per-epoch history, curves and model."""

    folder: Path
    checkpoint: Path | None = None  # the one classify and evaluate use; default: the best
    _classifier: Any = field(default=None, init=False, repr=False, compare=False)  # loaded at the first classify

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).absolute()  # still right when the working directory changes

    @property
    def metrics(self) -> dict[str, Any]:
        """What metrics.json holds: status, val/acc, test/acc, epochs, times, best_checkpoint."""
        return read_metrics(self.folder)

    @property
    def best_checkpoint(self) -> Path:
        best = self.metrics.get("best_checkpoint")
        if not isinstance(best, str):
            raise InputError(f"{self.folder} has no best checkpoint yet (the run has not finished)")
        return self.folder / best

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch: epoch, train/loss (the mean of the epoch's logged values), val/loss,
        val/acc, lr and seconds (training time, validation excluded)."""
        from mnist_lab.figures import epoch_history

        return epoch_history(self._events(), self.metrics.get("epoch_train_time_s", []))

    def plot(self) -> "Figure":
        """The notebook's curves: training loss, validation loss and validation accuracy. A
        Figure, which Jupyter shows inline."""
        from mnist_lab.figures import curves_figure

        return _shown_inline(curves_figure(self._events()))

    def classify(self, images: Any) -> tuple[list[int], "torch.Tensor"]:
        """(digits, (N, classes) probabilities) of images: a file path, a PIL image, an MNIST-style
        tensor of pixels ((28, 28), (N, 28, 28) or (N, 1, 28, 28); 0-255, or 0-1 floats), or a list
        of those. Paths and PIL images are made into MNIST digits as `predict` does; tensors are
        taken as MNIST's own pixels."""
        from mnist_lab.predict import Classifier, as_mnist_batch

        if self._classifier is None:
            self._classifier = Classifier(self.checkpoint or self.best_checkpoint)
        probabilities = self._classifier.probabilities(as_mnist_batch(images))
        return probabilities.argmax(1).tolist(), probabilities

    def evaluate(self, robustness: bool = False) -> dict[str, Any]:
        """evaluate's numbers for the checkpoint on its test set (and, with `robustness`, on
        transposed, rotated, shifted, scaled, noisy and inverted digits), written beside it under
        outputs/evaluations/ as the command does."""
        import argparse

        from mnist_lab.evaluate import run

        data_dir = OmegaConf.select(
            OmegaConf.load(self.folder / CONFIG_FILE), "data.data_dir", default=str(default_data_dir())
        )
        args = argparse.Namespace(
            ckpt=self.checkpoint or self.best_checkpoint,
            dataset=None,
            data_dir=Path(data_dir),
            robustness=robustness,
            out=None,
            batch_size=1000,
        )
        return run(args)

    def _events(self) -> Path:
        """The folder of the run's TensorBoard event files (a sweep job's are in a folder named by its values)."""
        found = sorted(self.folder.rglob("events.out.tfevents.*"))
        if not found:
            raise InputError(f"{self.folder} holds no TensorBoard event files: no curves to show")
        return found[0].parent


@dataclass
class Sweep:
    """A sweep folder: one row per job as its report lists them, and the best job as a Run."""

    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).absolute()

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """One dict per job: its number, overrides, status and metrics (summary.csv's rows)."""
        from mnist_lab.sweep_folder import load_jobs

        return load_jobs(self.folder)

    @property
    def best(self) -> Run | None:
        """The finished job with the best val/acc, or None."""
        from mnist_lab.sweep_folder import best_job

        best = best_job(self.jobs)
        return Run(self.folder / best["job"]) if best else None


def _started(argv: list[str]) -> list[Path]:
    """The run folders that `python train.py ARGV`, run here, started; Python's exceptions for its
    exits: InputError for bad input, RunInterrupted for a stop."""
    from mnist_lab import jobs

    jobs.runs_started.clear()
    jobs.sweep_started = None
    try:
        _hydra(argv)
    except SystemExit as e:
        if e.code in (130, 143):  # a stop: the job has printed how to go on
            if jobs.sweep_started is not None:
                raise RunInterrupted(jobs.sweep_started, e.code, "sweep") from None
            raise RunInterrupted(jobs.runs_started[-1] if jobs.runs_started else None, e.code) from None
        if isinstance(e.code, str):
            raise InputError(e.code.removeprefix("Error: ")) from None
        if e.code not in (None, 0):
            raise InputError(f"stopped with exit status {e.code}: see the lines above") from None
    return list(jobs.runs_started)


def _hydra(argv: list[str]) -> None:
    """Hydra's app on `argv`, in this process and again and again: its errors raised here."""
    argv = resumed_sweep_argv(argv)  # resume=<sweep folder>: that sweep's command, again
    with _argv(argv):
        try:
            _app()
        except CompactHydraException as e:  # a config or override that does not compose
            raise InputError(composition_error(e)) from None


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved_argv[0] if saved_argv else "train.py", *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them and exiting
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        GlobalHydra.instance().clear()  # the next call (a notebook's next cell) starts afresh
        release_locks()


def composition_error(error: CompactHydraException) -> str:
    """One line for an override that does not compose: a misspelled key gets the nearest real one
    (Hydra's advice to add it with + would only lead to a TypeError), a missing option the list."""
    cause = error.__cause__
    if (
        isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        and isinstance(cause.parent_node, DictConfig)
        and cause.full_key
    ):
        parent, _, key = str(cause.full_key).rpartition(".")
        options = [str(k) for k in cause.parent_node.keys() if str(k) != "hydra" and not str(k).startswith("_")]
        where = f"{parent} has" if parent else "the config has"
        if close := difflib.get_close_matches(key, options, n=1, cutoff=0.6):
            return f"{cause.full_key}: no such option; did you mean {parent + '.' if parent else ''}{close[0]}?"
        if parent == "trainer":  # conf/trainer/ sets a few of the Trainer's arguments; + adds any other
            added = re.search(r"use (\+\S+)", str(error))  # Hydra's advice names the override with its value
            return (
                f"{cause.full_key} is not set in conf/trainer/: a Trainer argument is added with a +, "
                f"{added.group(1) if added else '+' + str(cause.full_key) + '=...'}"
            )
        return (
            f"{cause.full_key}: no such option ({where} {', '.join(options)}); python train.py --cfg job "
            "shows the whole config"
        )
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(choice, error.options, n=1, cutoff=0.6)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={choice}: no such option in conf/{group}/{hint} (the options: {', '.join(error.options)})"
    if isinstance(error, OverrideParseException):
        return (
            f"{error.override}: not an override that Hydra's grammar reads ({first_line(error)}): quote values "
            "that hold brackets, commas or spaces, e.g. 'model.channels=[8,16]'"
        )
    return first_line(error)


def _shown_inline(figure: "Figure") -> "Figure":
    """In a Jupyter kernel, a Figure a cell returns shows as an image, even before anything has
    imported pyplot (which is what registers that display otherwise)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.core.pylabtools import select_figure_formats

        if type(figure) not in shell.display_formatter.formatters["image/png"].type_printers:
            select_figure_formats(shell, {"png"})
    return figure


def _quoted(path: str | Path) -> str:
    """A path as one value in Hydra's override grammar, whatever characters it holds."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"
