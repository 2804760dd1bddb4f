"""The configs of mnist_lab's two Hydra plugins, in Hydra's ConfigStore, where Hydra's plugin scan
registers them in any Hydra app (this module is found in the hydra_plugins namespace package, as
hydra-joblib-launcher's is):

    python my_app.py -m hydra/launcher=gpus hydra.launcher.jobs_per_gpu=6 lr=0.1,0.2,0.4
    python my_app.py -m hydra/sweeper=optuna hydra.sweeper.n_trials=30 'lr=tag(log, interval(0.001, 0.1))'

`hydra/launcher=gpus` (gpu_launcher.GpuLauncher): several jobs at once on each GPU, each job in
a worker process that sees its GPU alone. `hydra/sweeper=optuna` (optuna_sweeper.OptunaSweeper):
an Optuna study in the shape of hydra-optuna-sweeper's config, with its samplers
(`hydra/sweeper/sampler=tpe | random`) and pruners (`hydra/sweeper/pruner=median | percentile |
hyperband | none`). Light to import: the scan imports it on every run and every compose.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "mnist_lab"


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.mnist_lab_plugins.gpu_launcher.GpuLauncher"
    jobs_per_gpu: int = 4  # jobs at once on each GPU (or on the CPU when there is none)
    # auto: every GPU this process may use; or indices among them, e.g. [0,2]; []: the CPU only
    gpus: Any = "auto"


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10  # random trials before TPE models the results


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class MedianPrunerConf:
    """Stops a trial whose result after an epoch is below the median of earlier trials at that epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that run to the end before any is pruned
    n_warmup_steps: int = 2  # the first epoch after which a trial can be pruned


@dataclass
class PercentilePrunerConf:
    """The median pruner at another percentile: 25.0 keeps only trials in the top three quarters."""

    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 2


@dataclass
class HyperbandPrunerConf:
    """Successive halving over several budgets: from min_resource epochs up to the last."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class NopPrunerConf:
    """Every trial runs all its epochs."""

    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class OptunaSweeperConf:
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    _target_: str = "hydra_plugins.mnist_lab_plugins.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built by the sweeper (the pruner again by each job)
    sampler: Any = MISSING  # from the defaults list: MISSING does not override what it merged in
    pruner: Any = MISSING
    direction: str = "maximize"  # of the value each job returns
    study_name: str = "mnist_lab"
    storage: str | None = None  # None: sqlite:///<sweep folder>/optuna.db; or any Optuna storage URL
    n_trials: int = 20  # trials in the study, counting those an earlier attempt at the sweep ran
    n_jobs: int = 1  # trials asked for at a time: the jobs a parallel launcher runs at once
    max_failure_rate: float = 1.0  # stop the search when more of the trials so far fail
    # key: a sweep in Hydra's grammar, e.g. {"optimizer.lr": "tag(log, interval(0.001, 0.1))"}
    params: dict[str, Any] = field(default_factory=dict)


store = ConfigStore.instance()
store.store(group="hydra/launcher", name="gpus", node=GpuLauncherConf, provider=PROVIDER)
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider=PROVIDER)
for name, node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf)):
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)
for name, node in (
    ("median", MedianPrunerConf),
    ("percentile", PercentilePrunerConf),
    ("hyperband", HyperbandPrunerConf),
    ("none", NopPrunerConf),
):
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)
