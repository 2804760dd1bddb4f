"""TensorBoard's HPARAMS tab: which hyperparameters a run shows there, which of them are ticked
columns, and writing them with the final metrics."""

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard.summary import hparams
from torch.utils.tensorboard.writer import FileWriter

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
BOOKKEEPING = frozenset({
    "data.data_dir", "data.download", "data.verify_checksums", "data.num_workers", "data.pin_memory",
    "data.on_device", "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
})


def hparams_of(cfg: DictConfig, overrides: Sequence[str] = (), swept: Sequence[str] = ()) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HPARAMS tab shows: a fixed set, the swept keys, and each
    key set on the command line that can change what the run learns: one under model, optimizer,
    scheduler, loss, data or trainer that is not BOOKKEEPING. Other keys (callbacks, logger,
    hydra, resume, trusted_targets, compile, ...) stay out. Every job of a sweep gets the same
    keys, so the table lines up."""
    short = lambda target: target.rsplit(".", 1)[-1]  # noqa: E731
    params: dict[str, Any] = {
        "model": short(cfg.model._target_), "optimizer": short(cfg.optimizer._target_),
        "scheduler": short(cfg.scheduler._target_), "loss": short(cfg.loss._target_), "optimizer.lr": cfg.optimizer.lr,
        "augment": short(cfg.data.augment._target_) if cfg.data.get("augment") else "none",
        "data.dataset": cfg.data.dataset, "data.batch_size": cfg.data.batch_size, "seed": cfg.seed,
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
    call at fit start would show a -1 placeholder). TensorBoard ticks the first five columns of
    the experiment summary once it has sorted them, those marked `differs` first, then by name
    (tensorboard/plugins/hparams/backend_context.py; its dashboard ticks the first five), whatever
    their order here: so the summary, the same for every job of a sweep, marks `ticked(params,
    swept)` alone as differing. The metrics come in HPARAM_METRICS order, val/acc first.
    """
    experiment, session_start, session_end = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
    plugin_data = experiment.value[0].metadata.plugin_data
    content = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    shown = ticked(params, swept)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in shown
        if info.type == api_pb2.DATA_TYPE_STRING:
            info.ClearField("domain_discrete")  # this run's value alone; a sweep has several
    plugin_data.content = content.SerializeToString()
    file_writer = _file_writer(logger)
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    file_writer.flush()


def _file_writer(logger: TensorBoardLogger) -> FileWriter:
    """The event file writer under the logger's SummaryWriter: the HPARAMS summaries must go in
    whole, and SummaryWriter has no public call for that (add_hparams writes a second run).
    tests/test_train.py fails if torch renames it."""
    return logger.experiment._get_file_writer()
