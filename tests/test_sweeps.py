"""Sweeps at scale: mnist_lab's Optuna sweeper (pruning, a study that a killed sweep continues) and
the launcher that runs several jobs at once, each pinned to a GPU."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_train, smoke_overrides
from tests.test_reliability import single_error, wait_for

KILLER = "tests.callbacks.KillAtEpoch"
MEET = "tests.callbacks.MeetAtFirstEpoch"


def rows_of(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("x=tag(log, interval(0.003, 0.3))", "FloatDistribution(high=0.3, log=True, low=0.003, step=None)"),
        ("x=interval(0.0, 0.5)", "FloatDistribution(high=0.5, log=False, low=0.0, step=None)"),
        ("x=interval(1, 8)", "FloatDistribution(high=8.0, log=False, low=1.0, step=None)"),
        ("x=int(interval(1, 8))", "IntDistribution(high=8, log=False, low=1, step=1)"),
        ("x=tag(log, int(interval(1, 64)))", "IntDistribution(high=64, log=True, low=1, step=1)"),
        ("x=range(1, 9, 2)", "IntDistribution(high=7, log=False, low=1, step=2)"),  # Hydra's range leaves out its end
        ("x=range(0.1, 0.45, 0.1)", "FloatDistribution(high=0.4, log=False, low=0.1, step=0.1)"),
        ("x=choice(32, 64, 128)", "CategoricalDistribution(choices=(32, 64, 128))"),
        ("x=lenet,mlp", "CategoricalDistribution(choices=('lenet', 'mlp'))"),
    ],
)
def test_the_search_space_reads_hydras_sweep_grammar(override, expected):
    from hydra_plugins.mnist_lab_plugins._optuna import search_space

    space, fixed = search_space([override, "y=3"])
    assert repr(space["x"]).replace("0.4000000000000001", "0.4") == expected and fixed == ["y=3"]


def test_a_later_override_wins_and_a_fixed_value_leaves_the_search():
    from hydra_plugins.mnist_lab_plugins._optuna import search_space

    space, fixed = search_space(["a=interval(0, 1)", "b=choice(1, 2)", "a=0.5", "b=choice(3, 4)"])
    assert list(space) == ["b"] and space["b"].choices == (3, 4) and fixed == ["a=0.5"]


def test_hydra_finds_the_sweeper_and_the_launcher_as_plugins():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    def names(kind: type) -> set[str]:  # Hydra loads each plugin module anew: compare names, not classes
        return {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(kind)}

    assert "hydra_plugins.mnist_lab_plugins.optuna_sweeper.OptunaSweeper" in names(Sweeper)
    assert "hydra_plugins.mnist_lab_plugins.gpu_launcher.GpuLauncher" in names(Launcher)


def test_a_run_that_does_not_sweep_with_optuna_imports_no_optuna():
    """Hydra's plugin scan imports every plugin module on every compose: the sweeper's must not
    bring Optuna (a tenth of a second, and a warning wherever it is not installed)."""
    script = "import sys; from tests.conftest import compose_train; compose_train(); print('optuna' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "False"


@pytest.mark.slow
def test_optuna_prunes_and_a_killed_search_continues_its_study(synthetic_dir, tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "sweep=optuna",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.pruner.n_startup_trials=2",
        *smoke_overrides(synthetic_dir, "model=mlp", "trainer.max_epochs=3"),
        f"+callbacks.kill._target_={KILLER}",
        f"hydra.sweep.dir={sweep}",
    ]
    killed = run_train(*args, env={"MNIST_LAB_TEST_KILL_AT_EPOCH": "1", "MNIST_LAB_TEST_KILL_JOB": "3"}, timeout=300)
    assert killed.returncode == -9
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="mnist_lab", storage=storage)  # in the sweep folder by default
    assert [t.state.name for t in study.trials][3:] == ["RUNNING"]
    done = {n: (sweep / str(n) / "metrics.json").read_bytes() for n in range(3)}

    resumed = run_train(*args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="mnist_lab", storage=storage)
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and set(states) <= {"COMPLETE", "PRUNED"} and "PRUNED" in states, states
    assert {n: (sweep / str(n) / "metrics.json").read_bytes() for n in range(3)} == done  # kept, not run again
    trial_3 = json.loads((sweep / "3" / "metrics.json").read_text())
    assert trial_3["resumed_from_step"] > 0 and study.trials[3].params == {
        k: pytest.approx(float(v)) for k, v in rows_of(sweep)[3].items() if k in study.trials[3].params
    }

    table = rows_of(sweep)
    for trial, row in zip(study.trials, table, strict=True):
        assert row["job"] == str(trial.number)
        if trial.state.name == "PRUNED":  # stopped after the epoch it last reported
            assert row["status"] == "pruned" and row["best"] == "False"
            assert int(row["pruned_at_epoch"]) == int(row["epochs"]) == max(trial.intermediate_values) < 3
        else:
            assert row["status"] == "ok" and float(row["val/acc"]) == pytest.approx(trial.value)
            assert sorted(trial.intermediate_values) == [1, 2, 3]
    (best,) = [r for r in table if r["best"] == "True"]
    assert int(best["job"]) == study.best_trial.number
    summary = (sweep / "summary.md").read_text()
    assert f"pruned at epoch {table[states.index('PRUNED')]['epochs']}" in summary
    assert f"6 jobs: {states.count('COMPLETE')} ok, {states.count('PRUNED')} pruned" in summary
    # The same command once more: the study is complete, nothing runs.
    again = run_train(*args, timeout=300)
    assert again.returncode == 0 and len(optuna.load_study(study_name="mnist_lab", storage=storage).trials) == 6


@pytest.mark.slow
def test_a_failed_trial_is_tried_again_only_when_asked(synthetic_dir, tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "sweep=optuna",
        "hydra.sweeper.n_trials=1",
        *smoke_overrides(synthetic_dir, "model=mlp"),
        "optimizer.lr=choice(-1.0)",
        f"hydra.sweep.dir={sweep}",
    ]
    for extra in ([], [], ["rerun_failed=true"]):
        result = run_train(*args, *extra)
        assert result.returncode == 1 and "job(s) failed" in result.stderr, result.stderr
    study = optuna.load_study(study_name="mnist_lab", storage=f"sqlite:///{sweep / 'optuna.db'}")
    # the second command found the study complete; the third tried trial 0's values as trial 1
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert study.trials[1].params == study.trials[0].params
    assert [r["status"] for r in rows_of(sweep)] == ["failed", "failed"]


def test_fail_fast_stops_an_optuna_search_at_its_first_failed_trial(synthetic_dir, tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        "sweep=optuna",
        "hydra.sweeper.n_trials=4",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=choice(-1.0)",
        "fail_fast=true",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 1 and "fail_fast=true stops the search here" in result.stderr + result.stdout
    study = optuna.load_study(study_name="mnist_lab", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # no trial asked for after it


@pytest.mark.parametrize(
    "visible, gpus, expected",
    [
        (None, [0, 1, 2, 3], ["0", "1", "2", "3"]),
        ("4,5,6,7", [0, 2], ["4", "6"]),
        ("GPU-a1,GPU-b2", [1], ["GPU-b2"]),
        (None, [], []),
    ],
)
def test_each_worker_gets_the_gpu_it_is_pinned_to(visible, gpus, expected, monkeypatch):
    from hydra_plugins.mnist_lab_plugins.gpu_launcher import visible_gpus

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus(gpus) == expected


@pytest.mark.parametrize(
    "gpus, message",
    [
        ([4], r"leaves 4 GPU\(s\) visible"),
        ("0,1", "a list of GPU indices"),
        ([-1], "a list of GPU indices"),
    ],
)
def test_gpus_out_of_reach_are_refused(gpus, message, monkeypatch):
    from hydra_plugins.mnist_lab_plugins.gpu_launcher import visible_gpus
    from mnist_lab.errors import InputError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(InputError, match=message):
        visible_gpus(gpus)


@pytest.mark.slow
def test_jobs_run_at_once_each_on_its_own_gpu_with_the_results_of_one_at_a_time(synthetic_dir, tmp_path):
    args = ["-m", *smoke_overrides(synthetic_dir, "model=softmax"), "optimizer.lr=0.01,0.05,0.1,0.3"]
    meet = tmp_path / "meet"
    meet.mkdir()
    # 4 pretend GPUs, one job on each: the 4 jobs must meet at their first epoch to go on.
    together = run_train(
        *args,
        "hydra/launcher=gpus",
        "hydra.launcher.gpus=[0,1,2,3]",
        "hydra.launcher.jobs_per_gpu=1",
        f"+callbacks.meet._target_={MEET}",
        f"hydra.sweep.dir={tmp_path / 'together'}",
        env={"MNIST_LAB_TEST_MEET_DIR": str(meet), "MNIST_LAB_TEST_MEET": "4"},
        timeout=300,
    )
    assert together.returncode == 0, together.stderr
    seen = {
        (tmp_path / "together" / str(n) / "train.log").read_text().split("sees GPU ")[1].split()[0] for n in range(4)
    }
    assert seen == {"0", "1", "2", "3"}
    # Two at once on the CPU: the same results, report and folders as one after the other.
    cpu = run_train(
        *args,
        "hydra/launcher=gpus",
        "hydra.launcher.gpus=[]",
        "hydra.launcher.jobs_per_gpu=2",
        f"hydra.sweep.dir={tmp_path / 'cpu'}",
        timeout=300,
    )
    assert cpu.returncode == 0, cpu.stderr
    one_at_a_time = run_train(*args, f"hydra.sweep.dir={tmp_path / 'sequential'}", timeout=300)
    assert one_at_a_time.returncode == 0, one_at_a_time.stderr
    for sweep in ("together", "cpu"):
        assert [(r["job"], r["optimizer.lr"], r["status"], r["best"]) for r in rows_of(tmp_path / sweep)] == [
            (r["job"], r["optimizer.lr"], r["status"], r["best"]) for r in rows_of(tmp_path / "sequential")
        ]
        for r, s in zip(rows_of(tmp_path / sweep), rows_of(tmp_path / "sequential"), strict=True):
            assert float(r["val/acc"]) == pytest.approx(float(s["val/acc"]), abs=0.011)  # threads may differ
        assert sorted(p.name for p in (tmp_path / sweep).iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


def launcher_sweep(synthetic_dir: Path, sweep: Path, *extra: str, epochs: int = 40) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=gpus",
        "hydra.launcher.gpus=[]",
        "hydra.launcher.jobs_per_gpu=2",
        *smoke_overrides(synthetic_dir, "model=softmax", f"trainer.max_epochs={epochs}"),
        *extra,
        f"hydra.sweep.dir={sweep}",
    ]


@pytest.mark.slow
def test_ctrl_c_stops_the_jobs_at_once_with_checkpoints_and_resume_finishes_the_sweep(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    # Long enough that both jobs are still training when Ctrl-C comes, however busy the machine.
    args = launcher_sweep(synthetic_dir, sweep, "optimizer.lr=0.05,0.1,0.2", epochs=300)
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for job in ("0", "1"):
        wait_for(sweep / job / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.count(f"Resume the sweep with:\n  python train.py resume={sweep}\n") == 2
    assert [json.loads((sweep / job / "metrics.json").read_text())["status"] for job in ("0", "1")] == [
        "interrupted"
    ] * 2 and not (sweep / "2").exists()

    resumed = run_train(f"resume={sweep}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [(r["job"], r["status"], r["epochs"]) for r in rows_of(sweep)] == [(j, "ok", "300") for j in "012"]
    assert all("resumed_from_step" in json.loads((sweep / job / "metrics.json").read_text()) for job in "01")


@pytest.mark.parametrize(
    "setting", ["hydra.launcher.jobs_per_gpu=0", "hydra.launcher.jobs_per_gpu=1000000000", "hydra.launcher.gpus=[7]"]
)
def test_a_bad_launcher_setting_is_refused_in_one_line_before_any_job(setting, synthetic_dir, tmp_path):
    error = single_error(
        run_train(
            "-m",
            *smoke_overrides(synthetic_dir),
            "hydra/launcher=gpus",
            setting,
            f"hydra.sweep.dir={tmp_path / 's'}",
            env={"CUDA_VISIBLE_DEVICES": "0,1"},
        )
    )
    assert setting.split("=")[0] in error and not (tmp_path / "s" / "0").exists()


def worker_of(job: Path, proc: subprocess.Popen) -> int:
    """The pid of the process running `job`: the one that holds its folder's lock."""
    wait_for(job / "checkpoints" / "last.ckpt", proc)
    return int((job / ".lock").read_text())


def gone(pid: int, timeout: float = 30) -> bool:
    """Whether process `pid` has ended (or is a zombie: ended, not yet reaped) within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])  # Ctrl-C: the test above
def test_stopping_a_launcher_sweep_stops_its_workers_and_the_same_command_finishes_it(stop, synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    # Long enough that both jobs are still training when the signal comes, however busy the machine.
    args = launcher_sweep(synthetic_dir, sweep, "optimizer.lr=0.05,0.1,0.2", epochs=300)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [worker_of(sweep / job, proc) for job in ("0", "1")]
    proc.send_signal(stop)  # the sweep's process alone, as `kill` does: not its workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGKILL: -9}[stop], stderr
    assert all(gone(pid) for pid in workers), workers  # no worker trains on into the folders
    # Each job saved its checkpoint and says how to go on, as a run stopped on its own does.
    assert [json.loads((sweep / job / "metrics.json").read_text())["status"] for job in "01"] == ["interrupted"] * 2
    if stop != signal.SIGKILL:
        assert "Traceback" not in stderr and stderr.count(f"python train.py resume={sweep}\n") == 2, stderr
        return
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [(r["job"], r["status"], r["epochs"]) for r in rows_of(sweep)] == [(j, "ok", "300") for j in "012"]
    for job in "012":  # one process trained each job: one test, one set of checkpoints
        assert (sweep / job / "train.log").read_text().count("Test accuracy") == 1
        assert not list((sweep / job / "checkpoints").glob("*-v1.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_a_killed_worker_leaves_its_job_stopped_and_reported_and_the_same_command_finishes_it(
    search, synthetic_dir, tmp_path
):
    sweep = tmp_path / "sweep"
    searched = (
        ["optimizer.lr=0.05,0.1,0.2"]
        if search == "grid"
        else [
            "sweep=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=2",
            "hydra/sweeper/pruner=none",
            "hydra.sweeper.params={optimizer.lr: 'interval(0.05, 0.2)'}",
        ]
    )
    args = launcher_sweep(synthetic_dir, sweep, *searched, epochs=150)  # job 0 still training when killed
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.kill(worker_of(sweep / "0", proc), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in stderr and "Error executing job" not in stderr, stderr
    assert "job 0's process died before it finished" in stdout and f"Sweep report: {sweep}" in stdout
    assert "job(s) stopped before they finished (job 0)" in stderr.strip().splitlines()[-1]
    assert [r["status"] for r in rows_of(sweep)] == ["interrupted", "ok", "ok"]
    assert "1 interrupted" in (sweep / "summary.md").read_text()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [(r["job"], r["status"]) for r in rows_of(sweep)] == [(j, "ok") for j in "012"]
    assert "resumed_from_step" in json.loads((sweep / "0" / "metrics.json").read_text())


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("n_trials", 0, "hydra.sweeper.n_trials=0: give a whole number of at least 1"),
        ("n_jobs", 2.5, "hydra.sweeper.n_jobs=2.5: give a whole number"),
        ("max_failure_rate", 1.5, "hydra.sweeper.max_failure_rate=1.5: give a fraction from 0"),
        ("max_failure_rate", float("nan"), "hydra.sweeper.max_failure_rate=nan"),
        ("direction", "up", "hydra.sweeper.direction=up: give maximize"),
        ("study_name", " ", "hydra.sweeper.study_name=' ': give a name"),
    ],
)
def test_each_sweeper_setting_is_refused_in_one_line(option, value, message):
    from hydra_plugins.mnist_lab_plugins._optuna import OptunaSearch
    from mnist_lab.errors import InputError

    options = dict(
        sampler={},
        pruner={},
        direction="maximize",
        storage=None,
        study_name="s",
        n_trials=2,
        n_jobs=1,
        max_failure_rate=1.0,
    )
    with pytest.raises(InputError, match=re.escape(message)):
        OptunaSearch(**{**options, option: value})


@pytest.mark.slow
def test_a_study_that_no_longer_matches_its_sweep_folder_is_refused_and_a_refused_sweep_leaves_its_folder(
    synthetic_dir, tmp_path
):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "sweep=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=null",
        "hydra.sweeper.params={optimizer.lr: 'interval(0.01, 0.2)'}",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        f"hydra.sweep.dir={sweep}",
    ]
    users = tmp_path / "home"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    # Refused before its first job: a storage among a user's files, then one that is no database URL.
    for storage, error in (
        (f"sqlite:///{users}/optuna.db", f"in {users}, which holds notes.txt"),
        ("nonsense", "hydra.sweeper.storage=nonsense: give a database URL"),
    ):
        refused = run_train(*args, f"hydra.sweeper.storage={storage}")
        assert error in single_error(refused) and sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    first = run_train(*args, timeout=300)  # the corrected command, in the same folder
    assert first.returncode == 0, first.stderr
    kept = (sweep / "0" / ".hydra" / "overrides.yaml").read_bytes()
    for damage, error in (
        (lambda db: db.unlink(), "holds job 0, but the study in sqlite:///"),
        (lambda db: db.write_bytes(b"not a database" * 100), "does not open"),
    ):
        damage(sweep / "optuna.db")
        again = single_error(run_train(*args, timeout=300))
        assert (sweep / "optuna.db").exists() is ("does not open" in error)  # a deleted study is not made anew
        assert error in again and ("Start over in a new folder" in again or "start the sweep over" in again), again
        assert (sweep / "0" / ".hydra" / "overrides.yaml").read_bytes() == kept  # job 0 keeps what it trained with


@pytest.mark.parametrize(
    "override, reason",
    [
        ("x=interval(0.3, 0.003)", "interval(0.3, 0.003) holds no range of values"),
        ("x=interval(nan, 1)", "interval(nan, 1.0) holds no range of values"),
        ("x=interval(1, inf)", "interval(1.0, inf) holds no range of values"),
        ("x=tag(log, interval(0, 1))", "`low > 0` must hold for `log=True`"),
        ("x=range(5, 1)", "range(5, 1, 1) holds no values"),
        ("x=range(1, 5, 0)", "range() arg 3 must not be zero"),
        ("x=choice()", "empty choice is not legal"),
        ("x=interval(a, b)", "mismatch type argument start"),
    ],
)
def test_a_search_space_that_holds_nothing_to_search_is_refused_in_one_line(override, reason):
    from hydra_plugins.mnist_lab_plugins._optuna import search_space
    from mnist_lab.errors import InputError

    with pytest.raises(InputError, match=re.escape(f"{override}: ")) as refused:
        search_space([override])
    assert reason in str(refused.value) and "interval(low, high) with finite low < high" in str(refused.value)
    assert "\n" not in str(refused.value)
