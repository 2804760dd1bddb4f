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
import os
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

from mnist_lab.errors import InputError, config_errors, first_line
from mnist_lab.figures import to_image
from mnist_lab.run_folder import MLFLOW_ARTIFACTS, MLFLOW_STORE, check_store_path
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
        if key in ("tensorboard", "csv"):
            check_inside(loggers[-1], key, out_dir)
    return loggers


def check_inside(logger: Logger, key: str, out_dir: Path) -> None:
    """TensorBoard's and CSV's files go inside the run folder: a name or version (from the command
    line, or a run folder's overrides on resume=) may not move them out, over someone's files."""
    folder = Path(logger.log_dir).resolve()
    if not folder.is_relative_to(out_dir.resolve()):
        raise InputError(
            f"logger.{key}.name={logger.name} and version={logger.version} would put its files in {folder}, outside "
            f"the run folder {out_dir}: give a relative name inside it, or leave them as conf/logger sets them"
        )


def mlflow_logger(conf: DictConfig, out_dir: Path, run_name: str, run_id: str | None) -> Logger:
    """MLflow's logger, storing in SQLite in the sweep folder for a sweep's job, else in the run folder."""
    if importlib.util.find_spec("mlflow") is None:  # an optional dependency
        raise InputError('logger=mlflow needs MLflow: pip install "mnist_lab[mlflow]" (mlflow-skinny)')
    folder = out_dir.parent if in_sweep(out_dir) else out_dir
    store = mlflow_store(conf, out_dir, folder)
    # Unless asked for (MLFLOW_DISABLE_TELEMETRY=false), a local tracker does not report its use to
    # MLflow's makers; and a server that does not answer fails the run in seconds, not minutes of retries.
    for variable, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(variable, value)
    # A new store's set-up lines (MLflow's, its database migrations', Lightning's "not found. Creating it").
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning.loggers.mlflow").addFilter(lambda r: "Creating it" not in r.getMessage())
    logger = instantiate(conf, run_name=conf.get("run_name") or run_name, run_id=run_id, **store)
    where = conf.get("tracking_uri") or store["tracking_uri"]
    try:
        logger.experiment  # noqa: B018  connects (and finds a resumed run) now, before any training
    except Exception as e:  # noqa: BLE001  MlflowException, or the HTTP or database library's own
        if run_id is not None and getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            log.warning(
                "The MLflow run %s is not in %s (its store was deleted or replaced): this run logs to a new MLflow run",
                run_id,
                where,
            )
            return mlflow_logger(conf, out_dir, run_name, None)
        reason = " ".join(str(e).split())  # MLflow's message spans lines, and quotes the HTTP library's
        raise InputError(
            f"logger.mlflow: MLflow's store at {where} does not answer ({type(e).__name__}: "
            f"{reason[:150]}{'...' if len(reason) > 150 else ''}): start the server, or leave "
            "logger.mlflow.tracking_uri unset for a store in the run folder"
        ) from None
    return logger


MLFLOW_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def mlflow_store(conf: DictConfig, out_dir: Path, folder: Path) -> dict[str, str]:
    """MLflow's tracking_uri and artifact_location for the logger: SQLite in `folder` (the run's,
    or its sweep's) by default; a store elsewhere only in a new folder or mnist_lab's own."""
    uri, artifacts = conf.get("tracking_uri"), conf.get("artifact_location")
    inside = [out_dir, folder]
    if artifacts and "://" not in str(artifacts):
        check_store_path(Path(artifacts), "logger.mlflow.artifact_location", inside)
    if not uri:
        return {
            "tracking_uri": f"sqlite:///{(folder / MLFLOW_STORE).resolve()}",
            "artifact_location": artifacts or str((folder / MLFLOW_ARTIFACTS).resolve()),
        }
    if uri in ("sqlite://", "sqlite:///:memory:", "sqlite:///"):
        raise InputError(
            f"logger.mlflow.tracking_uri={uri} keeps the run's metrics in memory, lost when it ends: give "
            "sqlite:///<path>/mlflow.db or a server's http://..., or leave it unset for a store in the run folder"
        )
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        check_store_path(path, "logger.mlflow.tracking_uri", inside)
        # MLflow's artifacts go beside the database, not into ./mlruns in the working directory.
        return {} if artifacts else {"artifact_location": str(path.resolve().parent / MLFLOW_ARTIFACTS)}
    if uri.startswith(("http://", "https://", "databricks")):
        return {}  # a server keeps its own artifacts
    raise InputError(
        f"logger.mlflow.tracking_uri={uri}: give sqlite:///<path>/mlflow.db, a server's http(s)://..., or leave it "
        "unset for a store in the run folder"
    )


def forget_after(loggers: Sequence[Logger], step: int) -> None:
    """A run resumed from `step`: its CSV goes on from the rows logged before that step, and drops
    those its stopped process logged from there on (TensorBoard is told the same by purge_step),
    so that no step shows twice."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path, rows = Path(logger.log_dir) / "metrics.csv", []
        if path.is_file():
            try:
                rows = csv_rows_before(path, step)
            except (OSError, ValueError, csv.Error, UnicodeDecodeError) as e:
                damaged = path.with_name("metrics.csv.damaged")
                path.replace(damaged)
                log.warning(
                    "%s does not read (%s): the CSV log starts again at step %d, its earlier rows kept in %s",
                    path,
                    first_line(e)[:200],
                    step,
                    damaged.name,
                )
        with warnings.catch_warnings():  # Lightning's writer starts by deleting the file: its rows are kept here
            warnings.simplefilter("ignore")
            writer = logger.experiment
        for row in rows:  # before the trainer exists: nothing is logged yet
            writer.log_metrics({k: v for k, v in row.items() if k != "step"}, row.get("step"))
        logger.save()  # on disk again at once, should this process be stopped too


def csv_rows_before(path: Path, step: int) -> list[dict[str, str]]:
    """The rows of a CSV log logged before `step` (each row's empty cells left out)."""
    if path.stat().st_size > MAX_CSV_BYTES:
        raise ValueError(f"{path.stat().st_size / 2**20:.0f} MB, more than a run's CSV log holds")
    with open(path, newline="") as f:
        return [
            {k: v for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)
            if not row.get("step") or int(float(row["step"])) < step
        ]


MAX_CSV_BYTES = 512 * 2**20  # a row per logged step: a long run's log is tens of MB


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
