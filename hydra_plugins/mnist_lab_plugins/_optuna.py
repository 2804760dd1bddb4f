"""The work of sweep=optuna (optuna_sweeper.OptunaSweeper hands it over): the study, its trials
in batches of hydra.sweeper.n_jobs, the search space from Hydra's override grammar. A module
whose name starts with an underscore, which Hydra's plugin scan does not import: Optuna loads
only when a sweep uses it."""

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mnist_lab.errors import InputError, first_line, is_number, is_whole
from mnist_lab.run_folder import RERUN_FAILED, check_store_path, read_metrics, study_storage
from mnist_lab.sweep_folder import first_failure

log = logging.getLogger(__name__)
_ABSENT = object()


class OptunaSearch:
    def __init__(
        self,
        sampler: DictConfig,
        pruner: DictConfig,
        direction: str,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None = None,
    ) -> None:
        self.sampler, self.pruner, self.direction, self.storage = sampler, pruner, direction, storage
        self.study_name, self.n_trials, self.n_jobs, self.max_failure_rate = (
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
        )
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        check_options(direction, study_name, n_trials, n_jobs, max_failure_rate)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space = {key: values for key, values in space.items() if takes(self.config, key)}
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = study_storage(self.storage, sweep_dir)
        if storage.startswith("sqlite:///"):
            database = Path(storage.removeprefix("sqlite:///"))
            check_store_path(database, "hydra.sweeper.storage", [sweep_dir])
            if not database.exists() and (jobs := earlier_jobs(sweep_dir)):  # refused before a new one is made
                raise InputError(study_mismatch(sweep_dir, jobs[0], storage, "has no trial for it (the file is gone)"))
        elif "://" not in storage or storage.startswith("sqlite://"):
            raise InputError(
                f"hydra.sweeper.storage={storage}: give a database URL such as sqlite:///<path>/optuna.db, or leave it "
                "unset for the study in the sweep folder (the same command then continues it)"
            )
        try:
            study = optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                direction=self.direction,
                pruner=instantiate(self.pruner),
                load_if_exists=True,
            )
        except Exception as e:  # noqa: BLE001  a damaged file, another program's database, a server that is down
            raise InputError(
                f"hydra.sweeper.storage: the study in {storage} does not open ({first_line(e)[:200]}): restore it, "
                "or start the sweep over in a new folder with hydra.sweep.dir=..."
            ) from None
        check_study_matches(study, sweep_dir, storage)
        # As Hydra's sweeper: the same command goes on. Only now, so that a sweep refused above leaves
        # its folder to the corrected command.
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("Optuna study %s in %s: %d trial(s) there already", self.study_name, storage, len(study.trials))
        # A seeded sampler drawing again from its first number would repeat the earlier trials' values.
        study.sampler = instantiate(
            self.sampler,
            **({"seed": self.sampler.seed + len(study.trials)} if self.sampler.get("seed") is not None else {}),
        )
        # The same sweep again: its trials left running go on (not another process's, in a storage of
        # one's own), failed ones run again only when asked.
        unfinished = [t for t in study.trials if t.state == TrialState.RUNNING and (sweep_dir / str(t.number)).is_dir()]
        retry = [t for t in study.trials if t.state == TrialState.FAIL] if self.config.get(RERUN_FAILED) else []
        for trial in retry:
            study.enqueue_trial(trial.params)  # a new trial with the same values (a finished one stays as it ended)
        started = sum(t.state != TrialState.WAITING for t in study.trials)
        to_go = self.n_trials + len(retry) - started
        failures = finished = 0
        while unfinished or to_go > 0:
            if unfinished:
                batch, unfinished = unfinished[: self.n_jobs], unfinished[self.n_jobs :]
            else:
                batch = [study.ask(space) for _ in range(min(self.n_jobs, to_go))]
                to_go -= len(batch)
            for trial, ret in zip(batch, self._launch(batch, fixed), strict=True):
                failures += not tell(study, trial.number, ret)
                finished += 1
            if failures / finished > self.max_failure_rate:  # the report and the exit status follow
                log.error(
                    "Error: %d of %d trials failed, more than hydra.sweeper.max_failure_rate=%s: the search stops here",
                    failures,
                    finished,
                    self.max_failure_rate,
                )
                break
            if self.config.get("fail_fast") and (first := first_failure(sweep_dir)) is not None:
                log.error("Error: trial %s failed and fail_fast=true stops the search here", first)
                break
        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if completed:
            best = study.best_trial
            log.info("Best trial %d: %.4f (%s) with %s", best.number, best.value, self.direction, best.params)
            OmegaConf.save(
                OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                sweep_dir / "optimization_results.yaml",
            )

    def _launch(self, trials: list[Any], fixed: list[str]) -> list[JobReturn]:
        """Each trial as the job of its own number, so that its folder is <sweep folder>/<number>; one
        launch per run of consecutive numbers (the trials a resumed sweep picks up may have gaps)."""
        returns: list[JobReturn] = []
        start = 0
        for end in range(1, len(trials) + 1):
            if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
                run = trials[start:end]
                overrides = [[*fixed, *(f"{k}={v}" for k, v in trial.params.items())] for trial in run]
                returns += self.launcher.launch(overrides, initial_job_idx=run[0].number)
                start = end
        return returns


def check_options(direction: str, study_name: str, n_trials: Any, n_jobs: Any, max_failure_rate: Any) -> None:
    """The sweeper's own settings, each refused in one line before any trial."""
    if direction not in ("maximize", "minimize"):
        raise InputError(f"hydra.sweeper.direction={direction}: give maximize (val/acc, the default) or minimize")
    if not isinstance(study_name, str) or not study_name.strip():
        raise InputError(f"hydra.sweeper.study_name={study_name!r}: give a name, e.g. mnist_lab")
    for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
        if not is_whole(value) or value < 1:
            raise InputError(f"hydra.sweeper.{key}={value}: give a whole number of at least 1")
    if not is_number(max_failure_rate) or not 0 <= max_failure_rate <= 1:
        raise InputError(
            f"hydra.sweeper.max_failure_rate={max_failure_rate}: give a fraction from 0 (stop at the first failed "
            "trial) to 1 (never stop)"
        )


def check_study_matches(study: optuna.Study, sweep_dir: Path, storage: str) -> None:
    """Every job folder of an earlier attempt must be its trial's, with the values it trained with: a
    study deleted, replaced or of another sweep would have jobs kept under values they never ran."""
    trials = {t.number: t for t in study.trials}
    for job in earlier_jobs(sweep_dir):
        overrides_file = sweep_dir / job / ".hydra" / "overrides.yaml"
        try:
            recorded = dict(str(o).lstrip("+~").partition("=")[::2] for o in OmegaConf.load(overrides_file))
        except Exception:  # noqa: BLE001  its job is listed as unreadable in the report; the study decides here
            recorded = {}
        trial = trials.get(int(job))
        if trial is None or any(recorded.get(k) != str(v) for k, v in trial.params.items()):
            which = "has no trial for it" if trial is None else f"ran trial {job} with other values ({trial.params})"
            raise InputError(study_mismatch(sweep_dir, job, storage, which))


def earlier_jobs(sweep_dir: Path) -> list[str]:
    """The job folders an earlier attempt at the sweep left, by number."""
    return sorted(
        (p.parent.parent.name for p in sweep_dir.glob("*/.hydra/overrides.yaml") if p.parent.parent.name.isdigit()),
        key=int,
    )


def study_mismatch(sweep_dir: Path, job: str, storage: str, which: str) -> str:
    return (
        f"{sweep_dir} holds job {job}, but the study in {storage} {which}: the study no longer matches the sweep "
        "folder (deleted, replaced or another sweep's). Start over in a new folder with hydra.sweep.dir=..., or put "
        "the sweep's own study back"
    )


def tell(study: optuna.Study, number: int, ret: JobReturn) -> bool:
    """Tell the study how trial `number` ended, from its job's metrics.json (what the report reads):
    its best val/acc, pruned at the epoch it reached, or failed (False); a job stopped before it
    finished is left running, for the same sweep to go on with (False too). A job of another Hydra
    app, which writes no metrics.json, is told by the number its task function returned."""
    metrics = read_metrics(Path(ret.hydra_cfg.hydra.runtime.output_dir)) if ret.hydra_cfg else {}
    if "status" not in metrics:
        returned = ret.return_value if ret.status == JobStatus.COMPLETED else None
        metrics = {"status": "ok", "val/acc": returned} if is_number(returned) else {}
    status, value = metrics.get("status"), metrics.get("val/acc")
    if status == "interrupted":  # its process died mid-job: the trial stays running, the same sweep resumes it
        return False
    if status == "pruned":
        study.tell(number, state=TrialState.PRUNED)
    elif status == "ok" and isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(number, value)
    else:
        study.tell(number, state=TrialState.FAIL)
        return False
    return True


def takes(config: DictConfig, key: str) -> bool:
    """Whether the sweep's configuration has `key`; if not (sweep=optuna's model.dropout for a model
    without dropout), one line says that the search leaves it out."""
    if key.startswith(("+", "~", "hydra.")) or OmegaConf.select(config, key, default=_ABSENT) is not _ABSENT:
        return True
    group, _, option = key.partition(".")
    choice = OmegaConf.select(config, f"hydra.runtime.choices.{group}")
    owner = f"{group}={choice} takes no {option}" if choice else f"this configuration has no {key}"
    log.warning("%s is left out of this search: %s", key, owner)
    return False


def search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Optuna's distributions for the sweeps among `overrides` (later ones win), and the rest as
    fixed overrides for every trial."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
            key = override.get_key_element()
            space.pop(key, None), fixed.pop(key, None)
            if override.is_sweep_override():
                space[key] = distribution(override)
            else:
                fixed[key] = override.input_line
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001  Hydra's parse errors, Optuna's and Python's range checks
            reason = next((line for line in str(e).splitlines()[1:] if line.strip()), first_line(e))
            raise InputError(
                f"{text}: {reason.strip().rstrip('.')}: give choice(a, b, ...), range(start, stop, step) with "
                "start < stop, or interval(low, high) with finite low < high (low > 0 with tag(log, ...))"
            ) from None
    return space, list(fixed.values())


def distribution(override: Override) -> BaseDistribution:
    """choice(...) and a, b: categorical; range(a, b, step): integers or a float grid, without b as
    Hydra's range; interval(a, b): floats, int(interval(a, b)): integers; tag(log, ...): on a log scale."""
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"range({value.start}, {value.stop}, {value.step}) holds no values")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step), log=log_scale)
        return FloatDistribution(values[0], values[-1], step=value.step)
    if isinstance(value, IntervalSweep):
        if not (math.isfinite(value.start) and math.isfinite(value.end) and value.start < value.end):
            raise ValueError(f"interval({value.start}, {value.end}) holds no range of values")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise InputError(f"{override.input_line}: Optuna takes choice(...), range(...) or interval(...) sweeps")
