"""TensorBoard's HPARAMS tab: which hyperparameters a run shows there, which of them are ticked
columns, and writing them with the final metrics."""

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard import FileWriter
from torch.utils.tensorboard.summary import hparams

from mnist_lab.compat import tick_hparams

# The metrics of TensorBoard's HPARAMS tab, in its column order: scalar tags, at their last value.
HPARAM_METRICS = ("val/acc", "test/acc", "test/loss", "val/acc_best", "val/loss")
# The hyperparameters people compare: after the swept keys, these get the ticked columns.
COMPARED = ("model", "optimizer", "optimizer.lr", "data.batch_size", "loss")
# TensorBoard ticks this many hyperparameter columns; the others are in its list, unticked.
TICKED = 5
# Command-line keys that can change what a run learns: those of these groups...
RESULT_GROUPS = ("model", "optimizer", "scheduler", "loss", "data", "trainer")
# ...less these, which say where the data is, whether to fetch and check it, how batches are
# loaded, and what is shown or logged.
BOOKKEEPING = frozenset(
    {
        "data.data_dir",
        "data.download",
        "data.verify_checksums",
        "data.num_workers",
        "data.pin_memory",
        "data.on_device",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
        "trainer.log_every_n_steps",
    }
)


def hparams_of(cfg: DictConfig, overrides: Sequence[str] = (), swept: Sequence[str] = ()) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HPARAMS tab shows: a fixed set, the swept keys, and each
    key set on the command line that can change what the run learns: one under model, optimizer,
    scheduler, loss, data or trainer that is not BOOKKEEPING. Other keys (callbacks, logger,
    hydra, resume, trusted_targets, compile, ...) stay out. Every job of a sweep gets the same
    keys, so the table lines up."""
    short = lambda target: target.rsplit(".", 1)[-1]  # noqa: E731
    params: dict[str, Any] = {
        "model": short(cfg.model._target_),
        "optimizer": short(cfg.optimizer._target_),
        "scheduler": short(cfg.scheduler._target_),
        "loss": short(cfg.loss._target_),
        "optimizer.lr": cfg.optimizer.lr,
        "augment": short(cfg.data.augment._target_) if cfg.data.get("augment") else "none",
        "data.dataset": cfg.data.dataset,
        "data.batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "trainer.max_epochs": cfg.trainer.max_epochs,
    }
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        learns = key.split(".")[0] in RESULT_GROUPS and key not in BOOKKEEPING
        value = OmegaConf.select(cfg, key, default=None)
        if key not in params and (learns or key in swept) and not isinstance(value, DictConfig):
            # A config group (model=mlp) shows through the fixed keys; a value shows as itself.
            params[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return params


def ticked(params: dict[str, Any], swept: Sequence[str] = ()) -> list[str]:
    """The hyperparameters that get TensorBoard's ticked columns: the swept keys, then COMPARED."""
    return [key for key in dict.fromkeys([*swept, *COMPARED]) if key in params][:TICKED]


def log_hparams(logger: TensorBoardLogger, params: dict[str, Any], swept: Sequence[str] = ()) -> None:
    """Give TensorBoard's HPARAMS tab this run's hyperparameters and the metrics to show.

    Written after testing, so each metric's last logged value is the final one (Lightning's own
    call at fit start would show a -1 placeholder). The summary, the same for every job of a
    sweep, has `ticked(params, swept)` as its ticked columns (mnist_lab.compat.tick_hparams).
    The metrics come in HPARAM_METRICS order, val/acc first.
    """
    experiment, session_start, session_end = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
    plugin_data = experiment.value[0].metadata.plugin_data
    content = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    for info in content.experiment.hparam_infos:
        if info.type == api_pb2.DATA_TYPE_STRING:
            info.ClearField("domain_discrete")  # this run's value alone; a sweep has several
    tick_hparams(content.experiment, ticked(params, swept))
    plugin_data.content = content.SerializeToString()
    # An event file of their own in the run's folder: SummaryWriter.add_hparams would write a
    # second run, and Lightning has closed the logger's writer by now (trainer.test's end).
    writer = logger.experiment
    file_writer = FileWriter(writer.get_logdir(), filename_suffix=writer.filename_suffix)
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    file_writer.close()
