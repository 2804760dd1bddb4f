"""Run folders as data: what resume will build, what survives a failure, whose files are whose
(issue: one owner per concern)."""

import json
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mnist_lab.callbacks import TrainingState
from mnist_lab.checkpoint import read_checkpoint
from mnist_lab.errors import InputError
from mnist_lab.resume import check_resumable, check_resume_command, record_failed, resume_config, resumed_sweep_argv
from mnist_lab.run_folder import foreign_file, resume_command
from mnist_lab.trust import is_trusted, trusted_modules
from tests.conftest import ROOT, run_train, smoke_overrides
from tests.test_reliability import single_error

KILLER = "tests.callbacks.KillAtEpoch"


@pytest.fixture(scope="module")
def finished_run(synthetic_dir, tmp_path_factory) -> Path:
    from mnist_lab.recipe import run

    run_dir = tmp_path_factory.mktemp("finished")
    overrides = smoke_overrides(synthetic_dir, "model=softmax")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides)
    run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()  # as Hydra writes it
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    (run_dir / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    return run_dir


def killed_copy(finished_run: Path, folder: Path) -> Path:
    """The finished run as a run killed outright after its last epoch: no metrics.json."""
    shutil.copytree(finished_run, folder, ignore=shutil.ignore_patterns("metrics.json"))
    return folder


def add_override(folder: Path, override: str, key: str, value: dict) -> None:
    overrides = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create([*overrides, override]), folder / ".hydra" / "overrides.yaml")
    config = OmegaConf.load(folder / ".hydra" / "config.yaml")
    OmegaConf.update(config, key, value, force_add=True)
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")


def compose_in_conf(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides)


def conf_targets() -> set[str]:
    """Every _target_ that conf/ names for the run (Hydra's own launchers and callbacks aside)."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            found.update([node["_target_"]] if "_target_" in node else [])
            for key, value in node.items():
                walk(value) if key != "hydra" else None
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (ROOT / "conf").rglob("*.yaml"):
        if "hydra" not in path.relative_to(ROOT / "conf").parts:
            walk(yaml.safe_load(path.read_text()))
    return found


def test_trusted_modules_are_the_modules_conf_names():
    targets = conf_targets()
    assert all(is_trusted(t) for t in targets), [t for t in targets if not is_trusted(t)]
    assert {t.rpartition(".")[0] for t in targets} == trusted_modules()
    assert "mnist_lab.jobs" not in trusted_modules()  # conf/train.yaml's Hydra callbacks are no run's to build


def test_trust_follows_what_conf_names_when_asked(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    assert not is_trusted("tests.callbacks.KillAtEpoch", trusted_modules(conf))
    (conf / "callbacks" / "killer.yaml").write_text("_target_: tests.callbacks.KillAtEpoch\nepoch: 1\n")
    assert is_trusted("tests.callbacks.KillAtEpoch", trusted_modules(conf))
    assert not is_trusted("tests.callbacks.os", trusted_modules(conf))  # a module's classes only, never its imports
    (conf / "model" / "broken.yaml").write_text("_target_: [unclosed\n")
    with pytest.raises(InputError, match="broken.yaml does not read as YAML"):
        trusted_modules(conf)


@pytest.mark.parametrize(
    "target",
    [
        "torch.load",
        "os.system",
        "mnist_lab.checkpoint.torch.load",
        "mnist_lab.models.base",
        "builtins.eval",
        "torch.optim._functional",
        "pytorch_lightning.seed_everything",
    ],
)
def test_code_outside_the_config_groups_is_not_trusted(target):
    assert not is_trusted(target)


def test_a_target_of_ones_own_resumes_only_when_trusted_on_the_command_line(finished_run, tmp_path):
    folder = killed_copy(finished_run, tmp_path / "run")
    add_override(folder, f"+callbacks.mine._target_={KILLER}", "callbacks.mine", {"_target_": KILLER})
    with pytest.raises(InputError) as refused:
        resume_config(folder, compose_in_conf)
    assert KILLER in str(refused.value) and f"'trusted_targets=[{KILLER}]'" in str(refused.value)
    assert check_resume_command(folder, [f"resume={folder}", f"trusted_targets=[{KILLER}]"]).name == "last.ckpt"
    cfg, overrides = resume_config(folder, compose_in_conf, trusted=[KILLER])
    assert cfg.callbacks.mine._target_ == KILLER and overrides[-1] == f"+callbacks.mine._target_={KILLER}"


class Payload:
    """Unpickled, it creates the file it names: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.slow
def test_a_run_folder_cannot_run_code(finished_run, tmp_path):
    """A crafted .hydra/ naming torch.load on a pickle is refused before anything is built."""
    folder = killed_copy(finished_run, tmp_path / "handed over")
    marker, payload = tmp_path / "pwned", tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(Payload(str(marker))))
    evil = {"_target_": "torch.load", "f": str(payload), "weights_only": False}
    add_override(folder, f"+callbacks.x={{_target_:torch.load,f:'{payload}',weights_only:false}}", "callbacks.x", evil)
    assert compose_in_conf(OmegaConf.load(folder / ".hydra" / "overrides.yaml")).callbacks.x == evil  # it composes
    error = single_error(run_train(f"resume={folder}"))
    assert "name torch.load as a _target_" in error and "trusted_targets=[torch.load]" in error
    assert not marker.exists() and not (folder / "metrics.json").exists()  # refused before writing anything


def test_a_failure_that_is_not_the_runs_own_keeps_it_resumable(finished_run, tmp_path):
    from mnist_lab.errors import Diverged

    folder = killed_copy(finished_run, tmp_path / "run")
    assert record_failed(folder, OSError(27, "File too large"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["resumable"] and metrics["resume"] == resume_command(folder)
    assert check_resumable(folder) == folder / "checkpoints" / "last.ckpt"
    assert not record_failed(folder, Diverged("training diverged: the loss is nan at step 3"))
    with pytest.raises(
        InputError, match="cannot go on .*start over in a new folder with: python train.py data.data_dir="
    ):
        check_resumable(folder)


def test_a_damaged_last_checkpoint_falls_back_to_an_older_one(finished_run, tmp_path):
    folder = killed_copy(finished_run, tmp_path / "run")
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by something other than mnist_lab
    older = check_resumable(folder)
    assert older != last and older.parent == last.parent and "optimizer_states" in read_checkpoint(older)


def test_last_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"the previous epoch's state")

    def full_disk(path, weights_only):
        Path(path).write_bytes(b"half a check")
        raise OSError(28, "No space left on device")

    trainer = SimpleNamespace(save_checkpoint=full_disk, is_global_zero=True)
    with pytest.raises(OSError):
        TrainingState(last).on_train_epoch_end(trainer, None)
    assert last.read_bytes() == b"the previous epoch's state"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind


@pytest.mark.slow
def test_a_resume_on_a_full_disk_leaves_the_run_resumable(synthetic_dir, tmp_path):
    """kill -9 after the first epoch, resume once while the disk is full, then resume for real."""
    folder = tmp_path / "run"
    first = run_train(
        *smoke_overrides(synthetic_dir, "model=lenet", "trainer.max_epochs=3"),
        f"+callbacks.kill._target_={KILLER}",
        f"hydra.run.dir={folder}",
        env={"MNIST_LAB_TEST_KILL_AT_EPOCH": "1"},
    )
    assert first.returncode == -9 and not (folder / "metrics.json").exists(), first.stderr
    before = (folder / "checkpoints" / "last.ckpt").read_bytes()
    trust = f"trusted_targets=[{KILLER}]"
    command = shlex.join([sys.executable, str(ROOT / "train.py"), f"resume={folder}", trust])
    full = subprocess.run(
        ["bash", "-c", f"trap '' XFSZ; ulimit -f 200; exec {command}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    error = single_error(full)
    assert (
        "File too large" in error and f"The run can go on from its last checkpoint: {resume_command(folder)}" in error
    )
    assert json.loads((folder / "metrics.json").read_text())["resumable"] is True
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == before
    resumed = run_train(f"resume={folder}", trust)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs"] == 3


def test_a_folder_with_files_of_someone_elses_is_not_ours(finished_run, tmp_path):
    assert foreign_file(finished_run) is None
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")  # one of our names, in a folder mnist_lab did not make
    assert foreign_file(mine) == mine / "metrics.json"
    ours = killed_copy(finished_run, tmp_path / "ours")
    (ours / "notes.txt").write_text("mine")
    assert foreign_file(ours) == ours / "notes.txt"
    assert foreign_file(tmp_path / "new") is None and foreign_file(tmp_path / "new", sweep=True) is None


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_folder_of_unrelated_files_is_refused_and_left_as_it_was(sweep, synthetic_dir, tmp_path):
    folder = tmp_path / "papers"
    folder.mkdir()
    for name in ("metrics.json", "curves.png", "summary.md"):
        (folder / name).write_text(f"the user's {name}")
    args = ["-m", f"hydra.sweep.dir={folder}"] if sweep else [f"hydra.run.dir={folder}"]
    error = single_error(run_train(*args, *smoke_overrides(synthetic_dir, "model=softmax")))
    assert (
        "curves.png, which mnist_lab did not write" in error
        and ("hydra.sweep.dir" if sweep else "hydra.run.dir") in error
    )
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png", "metrics.json", "summary.md"]
    assert all(p.read_text() == f"the user's {p.name}" for p in folder.iterdir())


def test_the_resume_command_survives_a_path_with_spaces(tmp_path):
    folder = tmp_path / "my runs" / "it's here"
    assert shlex.split(resume_command(folder)) == ["python", "train.py", f"resume={folder}"]


def test_a_resumed_checkpoint_that_does_not_fit_the_model_is_refused(finished_run, tmp_path):
    from mnist_lab.models import LeNet
    from mnist_lab.recipe import logger_run

    with pytest.raises(InputError, match="does not hold this run's LeNet"):
        logger_run(tmp_path, [], [], finished_run / "checkpoints" / "last.ckpt", LeNet())
    assert torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0


@pytest.mark.parametrize(
    "name", [".hydra/overrides.yaml", ".hydra/config.yaml", "metrics.json", "checkpoints/last.ckpt"]
)
@pytest.mark.parametrize(
    "content", [b"", b"- data.data_dir=/tm\n- [", b"{{: [\x00\xff"], ids=["empty", "truncated", "malformed"]
)
def test_a_damaged_run_folder_file_gets_one_line(name, content, finished_run, tmp_path):
    """Each file resume reads, empty, truncated or malformed: one line naming it, or (metrics.json,
    a checkpoint with an older one beside it) what the folder still says."""
    folder = killed_copy(finished_run, tmp_path / "run")
    (folder / name).write_bytes(content)
    try:
        check_resumable(folder)
        resume_config(folder, compose_in_conf)
    except InputError as e:
        assert "\n" not in str(e) and (name in str(e) or Path(name).name in str(e)), e
    else:
        assert name in ("metrics.json", "checkpoints/last.ckpt")  # nothing else to go on with


@pytest.mark.slow
def test_a_sweep_killed_halfway_goes_on_with_resume_and_reports_the_same_best_job(synthetic_dir, tmp_path):
    args = [
        "-m",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.01,0.3,0.05",
        f"+callbacks.kill._target_={KILLER}",
    ]
    reference = run_train(*args, f"hydra.sweep.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr
    sweep = tmp_path / "sweep"
    killed = run_train(
        *args, f"hydra.sweep.dir={sweep}", env={"MNIST_LAB_TEST_KILL_AT_EPOCH": "1", "MNIST_LAB_TEST_KILL_JOB": "1"}
    )
    assert killed.returncode == -9 and not (sweep / "2").exists()  # job 0 done, job 1 killed, job 2 not started
    done = (sweep / "0" / "metrics.json").read_bytes()
    # resume=<sweep folder> (or the same command again, as in tests/test_sweeps.py); the test's own
    # callback is trusted on the command line, as a sweep folder may come from anyone
    resumed = run_train(f"resume={sweep}", f"trusted_targets=[{KILLER}]")
    assert resumed.returncode == 0, resumed.stderr
    assert "Job 0 finished in an earlier attempt at this sweep: kept" in resumed.stdout
    assert (sweep / "0" / "metrics.json").read_bytes() == done  # not run again
    table, expected = rows_of(sweep), rows_of(tmp_path / "reference")
    assert [(r["status"], r["val/acc"], r["test/acc"], r["best"]) for r in table] == [
        (r["status"], r["val/acc"], r["test/acc"], r["best"]) for r in expected
    ]
    assert json.loads((sweep / "1" / "metrics.json").read_text())["resumed_from_step"] > 0


@pytest.mark.parametrize(
    "edit, refused",
    [
        (("task", "+callbacks.x._target_=os.system"), "names os.system as a _target_"),
        (("task", "+callbacks={x: {_target_: builtins.eval}}"), "names builtins.eval as a _target_"),
        (("hydra", "hydra.job_logging.root.level=DEBUG"), "sets hydra.job_logging.root.level"),
        (("hydra", "hydra.sweeper.sampler._target_=os.system"), "names os.system as a _target_"),
        (("hydra", "hydra.launcher.setup=[touch /tmp/x]"), "sets hydra.launcher.setup"),
        (("hydra", "hydra.sweeper.storage=sqlite:////home/me/my.db"), "sets hydra.sweeper.storage, where files are"),
        (("task", "logger.csv.name=/home/me"), "sets logger.csv.name, where files are written"),
        (("task", "logger.mlflow.tracking_uri=sqlite:////x.db"), "sets logger.mlflow.tracking_uri, where files"),
    ],
)
def test_a_sweep_folder_cannot_run_code_through_resume(edit, refused, tmp_path):
    import yaml

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    overrides = {
        "task": ["model=softmax", "optimizer.lr=0.01,0.1"],
        "hydra": ["hydra.mode=MULTIRUN", "hydra/launcher=gpus", "hydra.launcher.jobs_per_gpu=3"],
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": overrides}}))
    assert resumed_sweep_argv(["-m", f"resume={sweep}", "rerun_failed=true"]) == [
        "-m",
        "hydra/launcher=gpus",
        "hydra.launcher.jobs_per_gpu=3",
        "model=softmax",
        "optimizer.lr=0.01,0.1",
        "rerun_failed=true",
        f"hydra.sweep.dir={sweep}",
    ]
    overrides[edit[0]].append(edit[1])
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": overrides}}))
    with pytest.raises(InputError, match=refused):
        resumed_sweep_argv([f"resume={sweep}"])
    if "_target_" in refused:  # one's own code, trusted on the command line
        target = refused.split()[1]
        assert edit[1] in resumed_sweep_argv([f"resume={sweep}", f"trusted_targets=[{target}]"])
    with pytest.raises(InputError, match="model=mlp would not apply"):
        resumed_sweep_argv([f"resume={sweep}", "model=mlp"])
    assert resumed_sweep_argv([f"resume={tmp_path}", "x=1"]) == [f"resume={tmp_path}", "x=1"]  # no sweep: as it is


def rows_of(sweep: Path) -> list[dict]:
    import csv

    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_failed_job_reruns_only_when_asked_and_another_sweep_is_refused(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *smoke_overrides(synthetic_dir, "model=softmax"), "optimizer.lr=0.05,-1", f"hydra.sweep.dir={sweep}"]
    assert run_train(*args).returncode == 1
    failed = (sweep / "1" / "metrics.json").stat().st_mtime_ns
    again = run_train(*args)
    assert again.returncode == 1 and "job 1 failed in an earlier attempt at this sweep" in again.stdout
    assert (sweep / "1" / "metrics.json").stat().st_mtime_ns == failed
    rerun = run_train(*args, "rerun_failed=true")
    assert rerun.returncode == 1 and "failed in an earlier attempt" not in rerun.stdout
    assert (sweep / "1" / "metrics.json").stat().st_mtime_ns != failed  # it ran (and failed) again
    other = single_error(run_train(*args[:-2], "optimizer.lr=0.1,0.2", f"hydra.sweep.dir={sweep}"))
    assert "already holds another sweep" in other


@pytest.mark.parametrize(
    "override",
    ["+logger.csv.name=/home/me", "logger.tensorboard.version=../../x", "+callbacks.checkpoint.dirpath=/tmp/x"],
)
def test_a_run_folder_cannot_move_where_its_resumed_run_writes(override, finished_run, tmp_path):
    folder = killed_copy(finished_run, tmp_path / "run")
    overrides = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create([*overrides, override]), folder / ".hydra" / "overrides.yaml")
    key = override.lstrip("+").partition("=")[0]
    with pytest.raises(InputError, match=f"sets {key}, where files are written, which resume= does not take"):
        resume_config(folder, lambda o: compose("train", o))
    assert f"hydra.run.dir={folder}" in str(pytest.raises(InputError, resume_config, folder, None).value)


def test_every_route_into_a_run_checks_its_folder_first(synthetic_dir, finished_run, make_cfg, tmp_path):
    from mnist_lab.recipe import run

    cfg = make_cfg(*smoke_overrides(synthetic_dir, "model=softmax"))
    users = tmp_path / "mine"
    users.mkdir()
    (users / "metrics.json").write_text('{"mine": 1}')  # a name mnist_lab writes, in a folder it did not
    with pytest.raises(InputError, match="holds metrics.json, which mnist_lab did not write"):
        run(cfg, users)
    assert sorted(p.name for p in users.iterdir()) == ["metrics.json"]  # no lock, nothing else
    with pytest.raises(InputError, match="already holds a finished run"):
        run(cfg, finished_run)
    stopped = killed_copy(finished_run, tmp_path / "stopped")
    with pytest.raises(InputError, match="holds a stopped run's checkpoints, which a new run would overwrite"):
        run(cfg, stopped)
    # Another process holds the folder, as a running train.py does.
    busy = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mnist_lab.run_folder import claim; "
            f"claim(Path({str(busy)!r})); print('held', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=rf"{busy} is in use by another run \(process {holder.pid}\)"):
            run(cfg, busy)
    finally:
        holder.kill()
        holder.wait()
    assert not (busy / "checkpoints").exists()


def test_oversized_or_damaged_records_get_one_line_promptly(tmp_path, make_cfg):
    import csv as csv_module

    from mnist_lab.loggers import build_loggers, forget_after
    from mnist_lab.resume import check_sweep_folder

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: [" + "a, " * 1_000_000 + "]\n")
    for check in (lambda: check_sweep_folder(sweep, []), lambda: resumed_sweep_argv([f"resume={sweep}"])):
        with pytest.raises(InputError, match=r"multirun.yaml is 3 MB, where mnist_lab writes a few kB"):
            check()
    # A damaged CSV log: the resumed run's CSV starts again, the damaged file kept beside it.
    run_dir = tmp_path / "run"
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "csv" / "metrics.csv").write_text("step,train/loss\nnot a step,1\n")
    loggers = build_loggers(make_cfg("logger=csv"), run_dir, {}, "run")
    forget_after(loggers, 5)
    assert (run_dir / "csv" / "metrics.csv.damaged").read_text() == "step,train/loss\nnot a step,1\n"
    fresh = run_dir / "csv" / "metrics.csv"
    assert not fresh.exists() or list(csv_module.DictReader(fresh.open())) == []  # no row of the damaged file
