"""Run folders and sweep folders: their layout, their lock, whose files they hold, and their status
in metrics.json (this module is its only writer). Whether a run goes on is mnist_lab.resume's
decision; what a folder may name, mnist_lab.trust's.

A run folder holds .hydra/ (config.yaml, overrides.yaml), checkpoints/ (last.ckpt and the best),
metrics.json, the TensorBoard event files, curves.png and train.log. metrics.json's status:
  ok           finished and tested: final
  interrupted  stopped by a signal, with `resume` saying how to go on
  failed       stopped by an error, with `error`; `resumable` false when the run diverged, or when its
               settings were refused before it had a checkpoint (`refused`: start over, corrected)
A run killed outright leaves no metrics.json: its last.ckpt says where it got to.
"""

import fcntl
import fnmatch
import json
import logging
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mnist_lab.errors import InputError

CHECKPOINTS = Path("checkpoints")
LAST_CHECKPOINT = CHECKPOINTS / "last.ckpt"
CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
SWEEP_FILE = "sweep.json"  # the swept keys, written into a sweep folder when the multirun starts

# What mnist_lab writes at the top of a run folder. It may also hold TensorBoard runs: folders of
# event files (a sweep job's is named by its swept values).
MLFLOW_STORE, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"  # logger=mlflow, in a run or sweep folder
RUN_FILES = (
    LOCK_FILE,
    ".hydra",
    str(CHECKPOINTS),
    METRICS_FILE,
    f".{METRICS_FILE}.*",
    "curves.png",
    "*.log",
    "events.out.tfevents.*",
    "hparams.yaml",
    ".write_test",
    "csv",
    MLFLOW_STORE,
    f"{MLFLOW_STORE}-*",
    MLFLOW_ARTIFACTS,
)
TENSORBOARD_FILES = ("events.out.tfevents.*", "hparams.yaml")
# ... and of a sweep folder, beside its job folders (named by number, each a run folder).
STUDY_FILE = "optuna.db"  # sweep=optuna: the study, in SQLite, unless hydra.sweeper.storage names another
SWEEP_FILES = (
    LOCK_FILE,
    "multirun.yaml",
    SWEEP_FILE,
    "summary.csv",
    "summary.md",
    "summary.png",
    ".*.summary.*",
    ".write_test",
    "optimization_results.yaml",
    STUDY_FILE,
    f"{STUDY_FILE}-*",
    ".submitit",
    MLFLOW_STORE,
    f"{MLFLOW_STORE}-*",
    MLFLOW_ARTIFACTS,
)
RERUN_FAILED = "rerun_failed"  # the config key that has a resumed sweep run its failed jobs again

# The configs: a link to the checkout's conf/, their one source, and a copy of it in an installed package.
CONF_DIR = Path(__file__).parent / "conf"

log = logging.getLogger(__name__)
# Open while held: a lock goes with its process, even on SIGKILL. By resolved folder.
_held_locks: dict[Path, IO[str]] = {}


RUN_DIR_FIX = (
    "pass a writable one with hydra.run.dir=... (hydra.sweep.dir=... for -m), or run from a writable directory"
)


def ensure_writable(folder: Path, fix: str = RUN_DIR_FIX) -> None:
    """Create `folder` and prove it writable, or raise an InputError that says how (`fix`)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to the output folder {folder} ({e.strerror}): {fix}") from None


def claim(folder: Path, wait_s: float = 0.0) -> bool:
    """Lock `folder` for this process, or refuse: two processes must never write into one folder.
    Waits up to `wait_s` for another process to let go (an earlier attempt's job, stopping). True
    when this call took the lock; False when this process held it already."""
    key = folder.resolve()
    if key in _held_locks:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_FILE, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise InputError(
                f"{folder} is in use by another run (process {owner}): wait for it to end, or pass another "
                "folder with hydra.run.dir=... (hydra.sweep.dir=... for -m)"
            ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held_locks[key] = lock
    return True


def release(folder: Path) -> None:
    """Unlock `folder`, if this process holds it."""
    if (lock := _held_locks.pop(folder.resolve(), None)) is not None:
        lock.close()


@contextmanager
def holding(folder: Path, wait_s: float = 0.0) -> Iterator[None]:
    """`folder` locked for this process while the block runs (and after, if it was held before)."""
    claimed = claim(folder, wait_s)
    try:
        yield
    finally:
        if claimed:
            release(folder)


def release_locks() -> None:
    """Unlock every folder this process claimed: its runs are over (mnist_lab.fit's next call may
    go on in the same folder)."""
    while _held_locks:
        _held_locks.popitem()[1].close()


def foreign_file(folder: Path, sweep: bool = False) -> Path | None:
    """A file or folder in `folder` that mnist_lab did not write there, if any. Ours are marked by
    the lock (or, for a sweep's job, Hydra's .hydra/hydra.yaml), and hold only what mnist_lab
    writes: files with the same names in a folder without the mark are someone else's."""
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if sweep:  # a new sweep's folder: empty but for the lock and record of a sweep that never started a job
        return next((e for e in entries if e.name not in (LOCK_FILE, ".write_test", SWEEP_FILE)), None)
    if entries and not ((folder / LOCK_FILE).is_file() or (folder / ".hydra" / "hydra.yaml").is_file()):
        return entries[0]
    for entry in entries:
        if matches(entry.name, RUN_FILES):
            continue
        if entry.is_dir() and not entry.is_symlink():  # a TensorBoard run: event files only
            inner = next((f for f in entry.iterdir() if not (f.is_file() and matches(f.name, TENSORBOARD_FILES))), None)
            if inner is None:
                continue
            return inner
        return entry
    return None


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_ours(folder: Path, sweep: bool = False) -> None:
    """Refuse a folder holding anything mnist_lab did not write: it would overwrite or mix with it."""
    if (found := foreign_file(folder, sweep)) is not None:
        option = "hydra.sweep.dir" if sweep else "hydra.run.dir"
        raise InputError(
            f"{folder} holds {found.relative_to(folder)}, which mnist_lab did not write: it writes only "
            f"into new folders or its own; pass an empty or new folder with {option}=..."
        )


# The stores that a run or sweep may keep outside its folder, in a folder they share (several runs'
# MLflow database, a study's SQLite file), beside mnist_lab's run and sweep folders.
STORE_FILES = (MLFLOW_STORE, f"{MLFLOW_STORE}-*", MLFLOW_ARTIFACTS, STUDY_FILE, f"{STUDY_FILE}-*")


def check_store_path(path: Path, option: str, inside: Sequence[Path]) -> None:
    """Refuse a store file that `option` (a logger's tracking_uri, the sweeper's storage) puts
    outside the run and sweep folders `inside`, unless the folder it goes in is new or mnist_lab's
    own: holding nothing but such stores and run or sweep folders. A user's files are never mixed with."""
    target = path.expanduser().resolve()
    if any(target.is_relative_to(folder.resolve()) for folder in inside):
        return
    folder = target.parent
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    own = (target.name, f"{target.name}-*")  # the store itself, with SQLite's journal: the same store again
    ours = lambda e: matches(e.name, (*STORE_FILES, *own)) or (e.is_dir() and mnist_lab_folder(e))  # noqa: E731
    if (found := next((e for e in entries if not ours(e)), None)) is not None:
        raise InputError(
            f"{option} puts {target.name} in {folder}, which holds {found.name}, not mnist_lab's: mnist_lab writes "
            f"only into new folders or its own; give a path in a new folder, or leave {option} unset"
        )


def mnist_lab_folder(folder: Path, depth: int = 2) -> bool:
    """Whether `folder` is a run or sweep folder that mnist_lab wrote (its lock or Hydra's record),
    or holds only such folders, `depth` levels down at most (outputs/runs/<date>/<run>)."""
    if any((folder / name).exists() for name in (LOCK_FILE, ".hydra", "multirun.yaml")):
        return True
    entries = sorted(folder.iterdir())[:1000] if depth > 0 and not folder.is_symlink() else []
    return bool(entries) and all(e.is_dir() and mnist_lab_folder(e, depth - 1) for e in entries)


def read_metrics(folder: Path) -> dict[str, Any]:
    """A run folder's metrics.json; empty if it has none (a run killed outright) or it is unreadable."""
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def resume_command(folder: Path) -> str:
    return f"python train.py resume={shlex.quote(str(folder))}"


def record_finished(folder: Path, metrics: dict[str, Any]) -> None:
    """metrics.json of a run that finished: status ok and its results."""
    write_metrics(folder, {**metrics, "status": "ok"})


def record_interrupted(folder: Path, signal_name: str, step: int | None) -> None:
    """metrics.json says the run was stopped, by what, where (None: not known, as for a process
    killed outright), and how to go on."""
    checkpoint = (folder / LAST_CHECKPOINT).is_file()
    write_metrics(
        folder,
        {
            "status": "interrupted",
            "signal": signal_name,
            "step": step,
            "checkpoint": str(LAST_CHECKPOINT) if checkpoint else None,
            "resume": resume_command(folder) if checkpoint else None,
        },
    )


def record_pruned(folder: Path, epoch: int) -> None:
    """A sweep's pruner stopped the run after `epoch` epochs: it finished, but is no candidate."""
    write_metrics(folder, {**read_metrics(folder), "status": "pruned", "pruned_at_epoch": epoch})


def write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, written whole or not at all."""
    partial = folder / f".{METRICS_FILE}.{os.getpid()}"  # whole or not at all, even on a full disk
    try:
        partial.write_text(json.dumps(metrics, indent=2) + "\n")
        partial.replace(folder / METRICS_FILE)
    finally:
        partial.unlink(missing_ok=True)


def study_storage(storage: str | None, sweep_dir: Path) -> str:
    """An Optuna sweep's study: `storage` (hydra.sweeper.storage), or SQLite in the sweep folder."""
    return storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"
