"""Every reach into a library's private parts, for want of a public way: one small function each.

The rest of mnist_lab calls these and never touches a private attribute of Lightning, Hydra or
TensorBoard itself. Each function has a test in tests/test_compat.py against the installed
library, which fails with the function's name and the library's version when an upgrade changes
what it relies on. Tested with pytorch-lightning 2.6.6, torch 2.14.1, tensorboard 2.21.0 and
hydra-core 1.3.8 (whose plugin API, hydra.core and hydra.plugins, is public and needs no wall;
what lies beyond it, in hydra._internal, is here too).
"""

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: mnist_lab.api uses this module before a run needs torch
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from tensorboard.plugins.hparams.api_pb2 import Experiment


def checkpoint_saves_on_steps(checkpoint: "ModelCheckpoint") -> bool:
    """Whether `checkpoint` saves at a training batch's end: told to every n steps or every so many
    seconds. Private: ModelCheckpoint keeps both settings in attributes of its own."""
    return bool(checkpoint._every_n_train_steps) or checkpoint._train_time_interval is not None


def skip_callback_hooks(callback: "pl.Callback", hooks: Iterable[str]) -> None:
    """Lightning no longer calls these hooks of `callback`, nor pays for visiting it there.
    Private: Lightning's dispatcher (pytorch_lightning.trainer.call._call_callback_hooks) calls a
    callback's hook only where it is callable, so a hook set to None on the instance is passed over."""
    for hook in hooks:
        setattr(callback, hook, None)


def restore_callback_hooks(callback: "pl.Callback", hooks: Iterable[str]) -> None:
    """Lightning calls these hooks of `callback` again, its class's methods (see skip_callback_hooks)."""
    for hook in hooks:
        callback.__dict__.pop(hook, None)


def batches_done_in_epoch(trainer: "pl.Trainer") -> int:
    """Training batches of the current epoch that have gone through their step, the one ending
    included. Private: Lightning counts them in its training loop's progress and offers no public
    count (trainer.global_step counts optimizer steps, fewer with accumulate_grad_batches)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def tick_hparams(experiment: "Experiment", names: Iterable[str]) -> None:
    """Make `names` the hyperparameter columns that TensorBoard's HPARAMS tab ticks, by marking
    them alone `differs` in the experiment summary. Private: TensorBoard's backend sorts the
    hparam_infos differing first, then by name (tensorboard/plugins/hparams/backend_context.py,
    _sort_and_reduce_to_hparams_limit), and its dashboard ticks the first five."""
    names = set(names)
    for info in experiment.hparam_infos:
        info.differs = info.name in names


def ignore_lightning_pytree_deprecation() -> None:
    """Hide the FutureWarning that torch 2.14 gives every fit from Lightning's pytree helper (its
    LeafSpec, which torch deprecates): Lightning's to change, nothing a user can act on. Private:
    the filter names the module that warns, pytorch_lightning.utilities._pytree."""
    warnings.filterwarnings(
        "ignore",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        "pytorch_lightning.utilities._pytree",
    )


def phase_methods() -> dict[str, tuple[str, str]]:
    """Lightning's private methods that run each phase of a fit, as (module, "Class.method"), for
    a benchmark to time (benchmarks/fixed_cost.py): a training epoch, an evaluation loop
    (validation, the sanity check, test) and loading a checkpoint (trainer.test's ckpt_path)."""
    return {
        "training epoch": ("pytorch_lightning.loops.training_epoch_loop", "_TrainingEpochLoop.run"),
        "evaluation": ("pytorch_lightning.loops.evaluation_loop", "_EvaluationLoop.run"),
        "checkpoint load": (
            "pytorch_lightning.trainer.connectors.checkpoint_connector",
            "_CheckpointConnector.resume_start",
        ),
    }


@contextmanager
def one_hydra_run() -> Iterator[None]:
    """Within it, Hydra runs an app's command line as one run without first composing the whole
    config a second time just to read `hydra.mode` from it (as if it set none): a tenth of a
    second of a warm mnist_lab.fit (benchmarks/fixed_cost.py). For callers that never sweep:
    Hydra then runs the app once, with the override hydra.mode=RUN. Private: Hydra's
    _run_hydra asks Hydra.get_mode (hydra._internal.hydra) for the mode, and takes None as "not set"."""
    from hydra._internal.hydra import Hydra

    get_mode = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None
    try:
        yield
    finally:
        Hydra.get_mode = get_mode
