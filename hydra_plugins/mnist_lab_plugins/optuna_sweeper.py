"""sweep=optuna on a current Optuna (>= 4), with pruning: the least of hydra-optuna-sweeper that
mnist_lab needs, until Hydra releases a plugin for it. Hydra finds it here, in the hydra_plugins
namespace, with its config (hydra/sweeper=optuna, which sweep=optuna selects) in
config.py.

- The search space is hydra.sweeper.params and the command line's sweeps, in Hydra's override
  grammar: choice(...), range(...), interval(...), int(interval(...)), tag(log, interval(...));
  plain values are fixed.
- The study lives in SQLite in the sweep folder unless hydra.sweeper.storage says otherwise, so
  the same command again continues it: finished trials are kept, trials left running go on in
  their job folders (job number = trial number), and new ones fill up to n_trials.
- Each job reports val/acc after every epoch to its trial (mnist_lab.callbacks.OptunaPruning);
  the pruner stops hopeless ones, which the sweep report lists as pruned.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from mnist_lab.errors import one_line_errors


class OptunaSweeper(Sweeper):
    """Hydra's Sweeper, light to import: Hydra's plugin scan imports this module on every run and
    every compose, so Optuna is imported only here, when a sweep is set up (_optuna.py does the work)."""

    def __init__(self, **options: Any) -> None:
        from hydra_plugins.mnist_lab_plugins._optuna import OptunaSearch

        with one_line_errors():  # Hydra would wrap an exception in two paragraphs
            self.search = OptunaSearch(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        with one_line_errors():
            return self.search.sweep(arguments)
