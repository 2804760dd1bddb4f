"""Whether a run or a sweep goes on, from where and with what settings: resume=<run folder> and
resume=<sweep folder>, a command run again in its own folder, a sweep's finished and failed jobs.
What a folder may name is asked of mnist_lab.trust; its files are mnist_lab.run_folder's."""

import logging
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnist_lab.errors import Diverged, InputError, described, first_line
from mnist_lab.run_folder import (
    CHECKPOINTS,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    OVERRIDES_FILE,
    RERUN_FAILED,
    SWEEP_FILES,
    check_ours,
    foreign_file,
    matches,
    read_metrics,
    resume_command,
    write_metrics,
)
from mnist_lab.trust import is_trusted, targets, trusted_modules

log = logging.getLogger(__name__)


MAX_RECORD_BYTES = 2**20  # a run's or sweep's .yaml record: a few kB as mnist_lab writes it


def load_record(path: Path) -> Any:
    """A run's or sweep's YAML record, refused in one line, before it is parsed, when it is far larger
    than mnist_lab writes one (a crafted file would take minutes and gigabytes to parse)."""
    if path.is_file() and (size := path.stat().st_size) > MAX_RECORD_BYTES:
        raise InputError(
            f"{path} is {size / 2**20:.0f} MB, where mnist_lab writes a few kB: not a record of a run or sweep to go "
            "on with; start over in a new folder"
        )
    return OmegaConf.load(path)


def start_over_command(folder: Path) -> str:
    """The command that started the run in `folder`, for a new run folder."""
    overrides = _recorded_overrides(folder) if (folder / OVERRIDES_FILE).is_file() else []
    return " ".join(["python train.py", *map(shlex.quote, overrides)])


def resume_checkpoint(folder: Path, quiet: bool = False) -> Path | None:
    """The checkpoint a run in `folder` goes on from: last.ckpt, or, if that does not load (damaged
    outside mnist_lab, which writes it whole), the newest other one that does. None without one."""
    candidates = sorted(
        (folder / CHECKPOINTS).glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime)
    )
    if not candidates:
        return None
    from mnist_lab.checkpoint import read_checkpoint  # torch: only where there is a checkpoint to read

    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except InputError as e:
            if not quiet:
                log.warning("%s", e)
            continue
        if "loops" in checkpoint and "optimizer_states" in checkpoint:  # the whole training state
            if path != folder / LAST_CHECKPOINT and not quiet:
                log.warning("going on from %s (step %s) instead", path, checkpoint.get("global_step"))
            return path
    return None


def record_failed(folder: Path, error: BaseException) -> str | None:
    """Mark the run failed, keeping the metrics it already wrote; return the command that resumes
    it, if it can go on: not a run that diverged, nor one whose configuration was refused before
    it had a checkpoint (`refused`: resuming would repeat the error), but a full disk, a lost GPU
    or a bug fixed later are not the run's own fault, and it goes on from its checkpoint."""
    checkpoint = resume_checkpoint(folder, quiet=True)
    refused = isinstance(error, InputError) and not isinstance(error, Diverged) and checkpoint is None
    resumable = not isinstance(error, Diverged) and not refused
    metrics = {k: v for k, v in read_metrics(folder).items() if k not in ("signal", "resume")}
    metrics.update(status="failed", error=described(error), resumable=resumable)
    if refused:
        metrics["refused"] = True
    if resumable and checkpoint is not None:
        metrics["resume"] = resume_command(folder)
    try:
        write_metrics(folder, metrics)
    except OSError as e:  # the disk that failed the run may refuse this too: the error is still reported
        log.warning("could not record the failure in %s: %s", folder / METRICS_FILE, e)
    return metrics.get("resume")


def check_resumable(folder: Path) -> Path:
    """The checkpoint the run in `folder` goes on from, or an InputError saying why it cannot and how
    to start over."""
    if not (folder / CONFIG_FILE).is_file() or not (folder / OVERRIDES_FILE).is_file():
        raise InputError(
            f"resume={folder}: not a run folder (no {OVERRIDES_FILE} in it): pass a folder under outputs/runs/"
        )
    check_ours(folder)
    metrics = read_metrics(folder)
    if metrics.get("status") == "ok":
        raise InputError(f"resume={folder}: that run finished already ({folder / METRICS_FILE}): nothing to resume")
    if metrics.get("refused"):
        raise InputError(
            f"resume={folder}: that run's settings were refused before it trained ({metrics.get('error')}): "
            "start a new run with a corrected value instead"
        )
    if metrics.get("status") == "failed" and metrics.get("resumable") is False:
        raise InputError(
            f"resume={folder}: that run cannot go on ({metrics.get('error')}); start over in a new folder "
            f"with: {start_over_command(folder)}"
        )
    checkpoint = resume_checkpoint(folder)
    if checkpoint is None:
        raise InputError(
            f"resume={folder}: the run has no checkpoint that loads ({LAST_CHECKPOINT} is written at the end of each "
            "epoch and when the run is stopped with Ctrl-C or SIGTERM); start it again with: "
            f"{start_over_command(folder)}"
        )
    return checkpoint


def check_run_folder(folder: Path, config: DictConfig) -> None:
    """Refuse to start a run in a folder that holds anything else. A run stopped or killed there,
    with the same settings, is resumed: that is rerunning a command with the same hydra.run.dir."""
    check_ours(folder)
    status = read_metrics(folder).get("status")
    checkpoint = any((folder / CHECKPOINTS).glob("*.ckpt"))
    if status == "ok" or (status == "failed" and not checkpoint):
        raise InputError(
            f"{folder} already holds a {'finished' if status == 'ok' else 'failed'} run: pass a new folder with "
            "hydra.run.dir=..., or delete that one to run again there"
        )
    if not checkpoint or not (folder / CONFIG_FILE).is_file():
        return
    check_resumable(folder)  # a diverged run, or no checkpoint that loads: refused, saying how to start over
    task = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
    if differences := _differences(_recorded_config(folder), task):
        raise InputError(
            f"{folder} holds a stopped run with other settings ({', '.join(differences[:5])}): resume it as it was "
            f"with resume={shlex.quote(str(folder))}, or pass a new folder with hydra.run.dir=..."
        )


def check_run_start(folder: Path, resuming: bool) -> None:
    """What every route into a run checks (the command line, a sweep's job, mnist_lab.recipe.run from
    Python) before the run writes into `folder`: nothing there that mnist_lab did not write, no
    finished run, and no stopped run's checkpoints unless the run goes on from them."""
    check_ours(folder)
    if read_metrics(folder).get("status") in ("ok", "pruned"):
        raise InputError(
            f"{folder} already holds a finished run ({folder / METRICS_FILE}): pass a new folder, or delete "
            "that one to run again there"
        )
    if not resuming and any((folder / CHECKPOINTS).glob("*.ckpt")):
        raise InputError(
            f"{folder} holds a stopped run's checkpoints, which a new run would overwrite: go on with it "
            f"({resume_command(folder)}; from Python, resume_from={folder / LAST_CHECKPOINT}), or pass a new folder"
        )


def check_sweep_folder(folder: Path, overrides: Sequence[str]) -> None:
    """A new or empty folder, or the folder of the same sweep (the same command line, `overrides`),
    which then goes on: finished jobs are kept, stopped ones resume, the others start."""
    if not (folder / "multirun.yaml").exists():  # new, or a sweep that failed before its first job
        check_ours(folder, sweep=True)
        return
    record = load_record(folder / "multirun.yaml")  # refused in one line when oversized
    try:
        recorded = list(OmegaConf.select(record, "hydra.overrides.task"))
    except Exception:  # noqa: BLE001  malformed, or not ours
        recorded = None
    same = lambda texts: [o for o in texts if not o.startswith(f"{RERUN_FAILED}=")]  # noqa: E731
    if recorded is None or same(recorded) != same(overrides):
        raise InputError(
            f"{folder} already holds another sweep (its command line is in {folder / 'multirun.yaml'}): "
            "pass a new folder with hydra.sweep.dir=..., or that sweep's own command to finish it"
        )
    found = next(
        (
            e
            for e in sorted(folder.iterdir())
            if not matches(e.name, SWEEP_FILES) and not (e.is_dir() and e.name.isdigit() and foreign_file(e) is None)
        ),
        None,
    )
    if found is not None:
        raise InputError(
            f"{folder} holds {found.relative_to(folder)}, which mnist_lab did not write: pass a new "
            "folder with hydra.sweep.dir=..."
        )


def earlier_attempt(folder: Path, rerun_failed: bool) -> dict[str, Any] | None:
    """The metrics of a sweep job that an earlier attempt at the sweep finished, or failed (kept
    failed unless `rerun_failed`); None when the job is to run, or go on from its checkpoint."""
    metrics = read_metrics(folder)
    if metrics.get("status") in ("ok", "pruned") or (metrics.get("status") == "failed" and not rerun_failed):
        return metrics
    return None


def check_resume_command(folder: Path, overrides: Sequence[str]) -> Path:
    """resume=<folder> [trusted_targets=[...]]: the run goes on with the settings it was started with."""
    if others := [o for o in overrides if not o.startswith(("resume=", "trusted_targets="))]:
        raise InputError(
            f"resume= continues a run with the settings it was started with; {' '.join(others)} would not "
            "apply: drop it, or start a new run"
        )
    return check_resumable(folder)


# The Hydra settings that resume=<sweep folder> replays: the launcher and sweeper chosen (conf/ or
# an installed plugin), the sweeper's settings (any _target_ among them is checked), and the
# launchers' resource settings; not the launcher's others (submitit's `setup` runs shell lines).
SWEEP_HYDRA_GROUPS = ("hydra/launcher", "hydra/sweeper")
LAUNCHER_SETTINGS = (
    "jobs_per_gpu",
    "gpus",
    "n_jobs",
    "partition",
    "qos",
    "account",
    "constraint",
    "nodes",
    "gpus_per_node",
    "gpus_per_task",
    "tasks_per_node",
    "cpus_per_task",
    "cpus_per_gpu",
    "mem_gb",
    "mem_per_gpu",
    "mem_per_cpu",
    "timeout_min",
    "array_parallelism",
    "exclude",
)


def resumed_sweep_argv(argv: Sequence[str]) -> list[str]:
    """`resume=<sweep folder> [rerun_failed=true] [trusted_targets=[...]]`: that sweep's own command
    line (multirun.yaml), with -m, to run again in its folder; any other command line as it is. The
    folder is data, never code: its command may choose config groups and set values, the launcher
    and the sweeper, but a _target_ that conf/ does not name, or any other Hydra setting, is refused
    unless given on this command line."""
    given = [a for a in argv if a.startswith("resume=")]
    folder = Path(given[-1].partition("=")[2]) if given else None
    if folder is None or not (folder / "multirun.yaml").is_file():
        return list(argv)
    from hydra.core.override_parser.overrides_parser import OverridesParser  # only here: the plain start stays light

    parser = OverridesParser.create()
    rest = [a for a in argv if not a.startswith("resume=") and a not in ("-m", "--multirun")]
    if others := [a for a in rest if not a.startswith((f"{RERUN_FAILED}=", "trusted_targets="))]:
        raise InputError(
            f"resume= continues a sweep with the command it was started with; {' '.join(others)} would "
            "not apply: drop it, or start a new sweep"
        )
    trusted = [
        str(t) for a in parser.parse_overrides([a for a in rest if a.startswith("trusted_targets=")]) for t in a.value()
    ]
    try:
        recorded = load_record(folder / "multirun.yaml").hydra.overrides
        task, hydra = [str(o) for o in recorded.task], [str(o) for o in recorded.hydra]
        parsed = parser.parse_overrides(task + hydra)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  unreadable, not ours, or edited into nonsense
        raise InputError(
            f"resume={folder}: its command line ({folder / 'multirun.yaml'}) does not read: {first_line(e)}"
        ) from None
    hydra = [o for o in hydra if not o.startswith(("hydra.mode=", "hydra.sweep.dir="))]
    check_no_write_paths(folder, task + hydra)
    modules = trusted_modules()
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        replayed = (
            key in ("hydra.mode", "hydra.sweep.dir")
            or key.startswith(("hydra.sweeper.", *SWEEP_HYDRA_GROUPS))
            or key in (f"hydra.launcher.{setting}" for setting in LAUNCHER_SETTINGS)
        )
        if key.startswith("hydra") and not replayed:
            raise InputError(
                f"resume={folder}: its command sets {key}, which resume= does not replay from a folder "
                f"that may come from anyone: if it is your sweep, run its command yourself, with "
                f"hydra.sweep.dir={shlex.quote(str(folder))}"
            )
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        named = [str(v) for v in values] if key.endswith("_target_") else []
        named += [t for v in values if isinstance(v, (dict, list)) for t in targets(OmegaConf.create(v))]
        if untrusted := [t for t in named if t not in trusted and not is_trusted(t, modules)]:
            raise InputError(
                f"resume={folder}: its command names {untrusted[0]} as a _target_, a class from a module that no "
                f"config in conf/ names, and a sweep folder may come from anyone. If you started this sweep with it, "
                f"resume with: python train.py resume={shlex.quote(str(folder))} "
                f"'trusted_targets=[{','.join(untrusted)}]'"
            )
    return ["-m", *hydra, *task, *(a for a in rest if a.startswith(f"{RERUN_FAILED}=")), f"hydra.sweep.dir={folder}"]


# Where a run and its loggers and sweeper write: resume= never takes these from a folder, which may
# come from anyone (a run's files stay in its folder, its stores where the command line put them).
WRITE_PATHS = re.compile(
    r"(logger\.[^.]+\.(name|version|save_dir|tracking_uri|artifact_location)|callbacks\.checkpoint\.dirpath"
    r"|hydra\.sweeper\.storage)$"
)


def check_no_write_paths(folder: Path, overrides: Sequence[str]) -> None:
    """Refuse a folder's recorded overrides that would move where the resumed run writes."""
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if WRITE_PATHS.match(key) and not override.endswith(("=null", "=None")):
            raise InputError(
                f"resume={folder}: its command sets {key}, where files are written, which resume= does not take from a "
                f"folder that may come from anyone: if it is yours, run its command yourself with "
                f"hydra.{'sweep' if (folder / 'multirun.yaml').is_file() else 'run'}.dir={shlex.quote(str(folder))}"
            )


def resume_config(
    folder: Path, compose: Callable[[list[str]], DictConfig], trusted: Sequence[str] = ()
) -> tuple[DictConfig, list[str]]:
    """The configuration of the run in `folder`, rebuilt by `compose` from conf/ and the overrides it
    was started with, and those overrides. Its .hydra/ is data, never code: a _target_ outside
    a module that conf/ does not name is refused unless `trusted` names it, and so is a setting
    that would move where the run writes."""
    overrides = _recorded_overrides(folder)
    check_no_write_paths(folder, overrides)
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001  Hydra's errors for an override that no longer composes
        raise InputError(
            f"resume={folder}: its overrides ({folder / OVERRIDES_FILE}) no longer compose with conf/: {first_line(e)}"
        ) from None
    modules = trusted_modules()
    if untrusted := [t for t in targets(cfg) if t not in trusted and not is_trusted(t, modules)]:
        raise InputError(
            f"resume={folder}: its settings name {untrusted[0]} as a _target_, a class from a module that no config "
            f"in conf/ names, and a run folder may come from anyone. If you started this run with it, resume with: "
            f"{resume_command(folder)} 'trusted_targets=[{','.join(untrusted)}]'"
        )
    if differences := _differences(_recorded_config(folder), OmegaConf.to_container(cfg)):
        log.warning(
            "%s differs from the run's settings rebuilt from conf/ and its overrides (conf/ changed since the "
            "run started, or the file was edited); it goes on with the rebuilt ones: %s",
            folder / CONFIG_FILE,
            ", ".join(differences[:10]),
        )
    return cfg, overrides


def _recorded_overrides(folder: Path) -> list[str]:
    try:
        overrides = load_record(folder / OVERRIDES_FILE)
    except InputError:
        raise
    except Exception:  # noqa: BLE001  YAML's or OmegaConf's errors, or an unreadable file
        overrides = None
    if not OmegaConf.is_list(overrides) or not all(isinstance(o, str) for o in overrides):
        raise InputError(f"{folder / OVERRIDES_FILE} is not a list of overrides: not a run folder that mnist_lab wrote")
    return list(overrides)


def _recorded_config(folder: Path) -> dict[str, Any]:
    """The run's .hydra/config.yaml as plain data (never resolved: its values are only compared)."""
    try:
        config = OmegaConf.to_container(load_record(folder / CONFIG_FILE))
    except InputError:
        raise
    except Exception:  # noqa: BLE001  YAML's or OmegaConf's errors, or an unreadable file
        config = None
    if not isinstance(config, dict) or not config:
        raise InputError(
            f"{folder / CONFIG_FILE} is not a config that mnist_lab wrote (empty or malformed): "
            "not a run folder to go on with; start a new run"
        )
    return config


def _differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs, as key=saved->new."""
    if isinstance(saved, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(saved.keys() | new.keys())
            for d in _differences(saved.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if saved == new else [f"{prefix[:-1]}={saved}->{new}"]
