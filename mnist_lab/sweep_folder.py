"""A sweep folder's record of its sweep: sweep.json, the keys it sweeps (written once when the
multirun starts, read by its jobs and its report: this module is its one reader and writer), the
name of each job's TensorBoard run from them, and the jobs' results as mnist_lab.report renders
them and mnist_lab.sweep hands them back."""

import json
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mnist_lab.run_folder import METRICS_FILE, SWEEP_FILE, read_metrics

METRICS = ("val/acc", "test/acc")


def record_sweep_keys(config: DictConfig) -> Path:
    """Write the keys that the multirun of `config` sweeps into its sweep folder's sweep.json, anew
    at each attempt at the sweep (an earlier attempt's first failure goes)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({"swept": sweep_keys(config)}, indent=2) + "\n")
    return sweep_dir


def record_first_failure(sweep_dir: Path, job: str) -> None:
    """fail_fast=true: note in sweep.json that `job` failed in this attempt at the sweep (the first
    to note it stays), for the jobs still to start, in this process or a launcher's others."""
    path = sweep_dir / SWEEP_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if "failed_first" in record:
        return
    record["failed_first"] = job
    partial = path.with_name(f".{SWEEP_FILE}.{os.getpid()}")  # whole or not at all: other jobs read it
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)


def first_failure(sweep_dir: Path) -> str | None:
    """The job that failed first in this attempt at the sweep, if fail_fast=true noted one."""
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text()).get("failed_first") if path.is_file() else None


def in_sweep(folder: Path) -> bool:
    """Whether `folder` is a job's folder in a sweep (its sweep folder holds the sweep's sweep.json)."""
    return (folder.parent / SWEEP_FILE).is_file()


def sweep_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps: those of hydra.sweeper.params (sweep=grid, sweep=optuna) and of
    command-line overrides with several values (a,b  range(...)  choice(...)  interval(...)),
    a later fixed value on the command line winning over a swept one in the config."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    texts = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    last = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(texts)}
    return [key for key, override in last.items() if override.is_sweep_override()]


def run_name(swept: list[str], job_overrides: list[str]) -> str:
    """A short name for one job from its values of the swept keys: "lr=0.0123,batch_size=64"."""
    values = {key: value for key, _, value in (o.lstrip("+~").partition("=") for o in job_overrides)}
    short = [key.rsplit(".", 1)[-1] for key in swept]
    names = [s if short.count(s) == 1 else key for s, key in zip(short, swept, strict=True)]
    return ",".join(f"{name}={compact(values.get(key, ''))}" for name, key in zip(names, swept, strict=True)).replace(
        "/", "_"
    )


def recorded_sweep_keys(sweep_dir: str | Path) -> list[str]:
    """The swept keys SweepReport recorded when the multirun started; none if it did not."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text())["swept"] if path.exists() else []


def compact(value: str) -> str:
    """Optuna's 0.012345678901 as 0.0123; other values unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() else f"{number:.3g}"


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job folder: its overrides (key -> value text) and its metrics.json. A job whose
    files do not read is listed as failed, saying which file; the others are unaffected."""
    jobs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        try:
            # "key=value", "+key=value" (added) or "~key" (deleted, no value)
            overrides = {
                key: value
                for key, _, value in (str(o).lstrip("+~").partition("=") for o in OmegaConf.load(overrides_file))
            }
        except Exception:  # noqa: BLE001  YAML or OmegaConf errors: this job alone
            jobs.append(
                {"job": job_dir.name, "overrides": {}, "status": "failed", "error": f"cannot read {overrides_file}"}
            )
            continue
        metrics = read_metrics(job_dir)
        if not (job_dir / METRICS_FILE).exists():
            metrics = {"status": "running"}
        elif not all(isinstance(metrics.get(m, 0.0), (int, float)) for m in METRICS) or "status" not in metrics:
            metrics = {"status": "failed", "error": f"cannot read {job_dir / METRICS_FILE}"}
        jobs.append({"job": job_dir.name, "overrides": overrides, **metrics})
    return sorted(
        jobs, key=lambda job: (0, int(job["job"])) if job["job"].isdigit() else (1, job["job"])
    )  # 2 before 10


def best_job(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [job for job in jobs if job.get("status") == "ok"]
    return max(ok, key=lambda job: job["val/acc"]) if ok else None
