"""The run's loggers: TensorBoard always, and beside it Lightning's CSVLogger (logger=csv) and
MLFlowLogger (logger=mlflow; logger=[csv,mlflow] for both). Each gets the same metrics; at the end,
the same hyperparameters (the HPARAMS tab's) and, where it keeps files, the figures.

MLflow keeps its runs in SQLite beside the run (`<run folder>/mlflow.db`), or beside a sweep's jobs
(`<sweep folder>/mlflow.db`, one run per job), with artifacts in `mlartifacts/` next to it, unless
`logger.mlflow.tracking_uri` names a store or a server. MLflow is an optional dependency:
pip install "mnist_lab[mlflow]".
"""

import csv
import importlib.util
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from mnist_lab.errors import InputError, config_errors
from mnist_lab.figures import to_image
from mnist_lab.run_folder import MLFLOW_ARTIFACTS, MLFLOW_STORE
from mnist_lab.sweep_folder import in_sweep

log = logging.getLogger(__name__)


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` scalar that Lightning adds to every metric
    it logs: TensorBoard plots against the step already, and that one tag, with no section of its
    own, would be the first chart of the SCALARS page, above train/ and val/. CSV keeps it."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {key: value for key, value in metrics.items() if key != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)


def build_loggers(
    cfg: DictConfig, out_dir: Path, tensorboard: dict[str, Any], run_name: str, mlflow_run_id: str | None = None
) -> list[Logger]:
    """cfg.logger's loggers, TensorBoard first (the trainer's `logger`, which names the run's
    folders): `tensorboard` are its run's arguments (name, purge_step), `run_name` the name of
    the run elsewhere, `mlflow_run_id` an MLflow run to go on with (a resumed run's)."""
    if not isinstance(cfg.logger, DictConfig) or cfg.logger.get("tensorboard") is None:
        raise InputError(
            "logger: TensorBoard is always on; add others with logger=csv, logger=mlflow or logger=[csv,mlflow]"
        )
    loggers = []
    for key in ["tensorboard", *(k for k in cfg.logger if k != "tensorboard")]:
        with config_errors(f"logger.{key}"):
            if key == "tensorboard":
                loggers.append(instantiate(cfg.logger.tensorboard, save_dir=str(out_dir), **tensorboard))
            elif key == "csv":
                loggers.append(instantiate(cfg.logger.csv, save_dir=str(out_dir)))
            elif key == "mlflow":
                loggers.append(mlflow_logger(cfg.logger.mlflow, out_dir, run_name, mlflow_run_id))
            elif cfg.logger[key] is not None:
                loggers.append(instantiate(cfg.logger[key]))
    return loggers


def mlflow_logger(conf: DictConfig, out_dir: Path, run_name: str, run_id: str | None) -> Logger:
    """MLflow's logger, storing in SQLite in the sweep folder for a sweep's job, else in the run folder."""
    if importlib.util.find_spec("mlflow") is None:  # an optional dependency
        raise InputError('logger=mlflow needs MLflow: pip install "mnist_lab[mlflow]" (mlflow-skinny)')
    folder = out_dir.parent if in_sweep(out_dir) else out_dir
    uri = conf.get("tracking_uri")
    if not uri:
        store = {
            "tracking_uri": f"sqlite:///{(folder / MLFLOW_STORE).resolve()}",
            "artifact_location": str((folder / MLFLOW_ARTIFACTS).resolve()),
        }
    elif uri.startswith("sqlite:///") and not conf.get("artifact_location"):  # not MLflow's ./mlruns in the cwd
        store = {"artifact_location": str(Path(uri.removeprefix("sqlite:///")).resolve().parent / MLFLOW_ARTIFACTS)}
    else:  # a server keeps its own artifacts
        store = {}
    # A new store's set-up lines (MLflow's, its database migrations', Lightning's "not found. Creating it").
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning.loggers.mlflow").addFilter(lambda r: "Creating it" not in r.getMessage())
    return instantiate(conf, run_name=conf.get("run_name") or run_name, run_id=run_id, **store)


def forget_after(loggers: Sequence[Logger], step: int) -> None:
    """A run resumed from `step`: its CSV goes on from the rows logged before that step, and drops
    those its stopped process logged from there on (TensorBoard is told the same by purge_step),
    so that no step shows twice."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path, rows = Path(logger.log_dir) / "metrics.csv", []
        if path.is_file():
            with open(path, newline="") as f:
                rows = [
                    {k: v for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)
                    if not row.get("step") or int(float(row["step"])) < step
                ]
        with warnings.catch_warnings():  # Lightning's writer starts by deleting the file: its rows are kept here
            warnings.simplefilter("ignore")
            writer = logger.experiment
        for row in rows:  # before the trainer exists: nothing is logged yet
            writer.log_metrics({k: v for k, v in row.items() if k != "step"}, row.get("step"))
        logger.save()  # on disk again at once, should this process be stopped too


def log_figure(trainer: pl.Trainer, tag: str, figure: Figure | Image.Image) -> None:
    """A figure to every logger that keeps figures: TensorBoard's IMAGES, MLflow's artifacts."""
    image = to_image(figure)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            add_image(logger.experiment, tag, image, trainer.global_step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, artifact_file=f"{tag}.png")


def add_image(writer: SummaryWriter, tag: str, image: Image.Image, step: int | None = None) -> None:
    """A Pillow image (grayscale or RGB) into TensorBoard's IMAGES tab."""
    writer.add_image(tag, np.asarray(image), step, dataformats="HW" if image.mode == "L" else "HWC")


def finish_loggers(loggers: Sequence[Logger], params: dict[str, Any], files: Sequence[Path]) -> None:
    """The loggers beside TensorBoard (whose HPARAMS tab mnist_lab.hparams writes): the
    hyperparameters, and `files` (curves.png, metrics.json) where a logger keeps files."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            continue
        logger.log_hyperparams(params)
        if isinstance(logger, MLFlowLogger):
            for path in files:
                if path.is_file():
                    logger.experiment.log_artifact(logger.run_id, str(path))
        logger.save()
