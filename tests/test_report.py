import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnist_lab.errors import InputError
from mnist_lab.jobs import SweepReport
from mnist_lab.recipe import run
from mnist_lab.report import write_report
from mnist_lab.sweep_folder import run_name, sweep_keys
from tests.conftest import ARCHITECTURES, ROOT, run_train, smoke_overrides


def fake_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def ok(val: float, test: float) -> dict:
    return {"status": "ok", "val/acc": val, "test/acc": test, "epochs": 2, "fit_time_s": 3.0}


def rows(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_grid_report_marks_the_best_by_val_acc(tmp_path):
    grid = [
        ("0.01", "64", 0.97, 0.99),
        ("0.01", "256", 0.95, 0.95),
        ("0.1", "64", 0.98, 0.96),
        ("0.1", "256", 0.96, 0.97),
    ]
    for num, (lr, bs, val, test) in enumerate(grid):
        overrides = ["model=lenet", f"optimizer.lr={lr}", f"data.batch_size={bs}", "~callbacks.progress_bar"]
        fake_job(tmp_path, num, overrides, ok(val, test))
    write_report(tmp_path)
    table = rows(tmp_path)
    assert [r["job"] for r in table] == ["0", "1", "2", "3"]
    assert list(table[0]) == [
        "job",
        "optimizer.lr",
        "data.batch_size",
        "status",
        "val/acc",
        "test/acc",
        "epochs",
        "fit_time_s",
        "best",
        "error",
        "pruned_at_epoch",
    ]
    assert [r["best"] for r in table] == ["False", "False", "True", "False"]  # by val/acc, not test/acc
    summary = (tmp_path / "summary.md").read_text()
    assert "| 2 **best** | 0.1 | 64 | ok | 0.9800 | 0.9600 |" in summary
    assert "Same in every job: `model=lenet`" in summary
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_failed_and_unfinished_jobs_are_listed(tmp_path):
    fake_job(tmp_path, 0, ["optimizer.lr=0.01"], ok(0.97, 0.97))
    fake_job(tmp_path, 1, ["optimizer.lr=50"], {"status": "failed", "error": "InputError: training diverged"})
    fake_job(tmp_path, 2, ["optimizer.lr=0.1"], None)
    write_report(tmp_path)
    assert [(r["status"], r["best"], r["error"]) for r in rows(tmp_path)] == [
        ("ok", "True", ""),
        ("failed", "False", "InputError: training diverged"),
        ("running", "False", ""),
    ]
    assert "3 jobs: 1 ok, 1 running, 1 failed." in (tmp_path / "summary.md").read_text()


def test_seeds_are_aggregated_as_mean_and_std(tmp_path):
    accuracies = {"0.01": [0.97, 0.98, 0.96], "0.1": [0.99, 0.985, 0.98]}
    num = 0
    for lr, values in accuracies.items():
        for seed, val in enumerate(values, 1):
            fake_job(tmp_path, num, [f"optimizer.lr={lr}", f"seed={seed}"], ok(val, val - 0.01))
            num += 1
    summary = write_report(tmp_path).read_text()
    assert "## Over seeds (mean ± std)" in summary
    for lr, values in accuracies.items():
        val = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
        test = f"{statistics.mean(v - 0.01 for v in values):.4f} ± {statistics.stdev(values):.4f}"
        assert f"| {lr} | 3 | {val} | {test} |" in summary


@pytest.mark.parametrize(
    "damage",
    [
        ("1/metrics.json", ""),
        ("1/metrics.json", '{"status": "ok", "val/acc": "high"'),
        ("1/metrics.json", "[1, 2]"),
        ("1/.hydra/overrides.yaml", "- [unclosed"),
    ],
    ids=["empty metrics", "truncated metrics", "metrics not a dict", "malformed overrides"],
)
def test_one_bad_job_file_never_cancels_the_others(damage, tmp_path):
    fake_job(tmp_path, 0, ["optimizer.lr=0.01"], ok(0.97, 0.97))
    fake_job(tmp_path, 1, ["optimizer.lr=0.05"], ok(0.99, 0.99))
    fake_job(tmp_path, 2, ["optimizer.lr=0.1"], ok(0.98, 0.97))
    (tmp_path / damage[0]).write_text(damage[1])
    write_report(tmp_path)
    table = rows(tmp_path)
    assert [r["status"] for r in table] == ["ok", "failed", "ok"] and "cannot read" in table[1]["error"]
    assert table[2]["best"] == "True"  # chosen among the jobs that read


def test_report_command_on_an_existing_folder(tmp_path):
    fake_job(tmp_path, 0, ["optimizer.lr=0.01"], ok(0.97, 0.97))
    fake_job(tmp_path, 1, ["optimizer.lr=0.1"], ok(0.98, 0.97))
    result = subprocess.run([sys.executable, "-m", "mnist_lab.report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| 1 **best** | 0.1 | ok |" in result.stdout
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "summary.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "mnist_lab.report", str(empty)], capture_output=True, text=True)
    assert result.returncode != 0 and "holds no job folders" in result.stderr


def test_divergence_stops_the_run_with_advice(synthetic_dir, make_cfg, tmp_path):
    cfg = make_cfg(*smoke_overrides(synthetic_dir, "model=lenet", "optimizer.lr=1e30", "scheduler=none"))
    with pytest.raises(InputError, match=r"training diverged: the loss is nan at step \d+; lower the learning rate"):
        run(cfg, tmp_path)


@pytest.mark.slow
def test_multirun_grid_writes_a_report_with_the_best_job(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.01,0.5",
        "data.split_seed=1,2",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir() if d.is_dir()}
    assert sorted(metrics) == ["0", "1", "2", "3"]
    table = rows(sweep)
    assert len(table) == 4 and all(r["status"] == "ok" for r in table)
    best = max(metrics, key=lambda job: metrics[job]["val/acc"])
    assert [r["job"] for r in table if r["best"] == "True"] == [best]
    assert (sweep / "summary.png").exists()
    # TensorBoard names each run by its swept values; checkpoints stay in the job folder
    assert json.loads((sweep / "sweep.json").read_text()) == {"swept": ["optimizer.lr", "data.split_seed"]}
    names = {
        "0": "lr=0.01,split_seed=1",
        "1": "lr=0.01,split_seed=2",
        "2": "lr=0.5,split_seed=1",
        "3": "lr=0.5,split_seed=2",
    }
    for job, name in names.items():
        assert list((sweep / job / name).glob("events.out.tfevents.*")), sorted(p.name for p in (sweep / job).iterdir())
        assert (sweep / job / metrics[job]["best_checkpoint"]).parent == sweep / job / "checkpoints"
        assert (sweep / job / "curves.png").exists()
    # TensorBoard's HPARAMS: the same keys in every job, the swept ones among them
    keys = [set(session_hparams(sweep / job / names[job])) for job in sorted(metrics)]
    assert all(k == keys[0] for k in keys) and {"optimizer.lr", "data.split_seed"} <= keys[0]


def session_hparams(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


@pytest.mark.slow
def test_a_failing_job_is_listed_and_the_others_finish(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.01,0.05,-1,0.1",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    # It ends with its report and one line, not a traceback.
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert f"Sweep report: {sweep / 'summary.md'}" in result.stdout
    assert (
        result.stderr.rstrip().splitlines()[-1]
        == "Error: 1 job(s) failed (job 2): their errors are in the report, summary.md"
    )
    assert "Error: optimizer.lr must be > 0" in result.stdout  # the job's own line, in its log
    table = rows(sweep)
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "ok"]
    assert "optimizer.lr must be > 0" in table[2]["error"]
    assert "4 jobs: 3 ok, 1 failed." in (sweep / "summary.md").read_text()


def test_fail_fast_stops_a_sweep_at_its_first_failed_job_and_the_same_command_runs_the_rest(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = ["-m", *smoke_overrides(synthetic_dir, "model=softmax"), "optimizer.lr=0.05,-1,0.1,0.2", "fail_fast=true"]
    result = run_train(*command, f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"Error: 1 job(s) failed (job 1) and fail_fast=true left 2 not started: the same command, or python "
        f"train.py resume={sweep}, runs them"
    )
    assert [r["status"] for r in rows(sweep)] == ["ok", "failed", "not started", "not started"]
    assert "4 jobs: 1 ok, 2 not started, 1 failed." in (sweep / "summary.md").read_text()
    assert not list((sweep / "2").rglob("*.ckpt"))  # it did not train
    again = run_train(f"resume={sweep}", timeout=300)
    # The failed job is kept as it ended (rerun_failed=true would run it again); the rest run now.
    assert [r["status"] for r in rows(sweep)] == ["ok", "failed", "ok", "ok"]
    assert (
        again.stderr.rstrip().splitlines()[-1]
        == "Error: 1 job(s) failed (job 1): their errors are in the report, summary.md"
    )


def hydra_config(*overrides: str, params: dict | None = None):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"sweeper": {"params": params or {}}, "overrides": {"task": list(overrides)}}})


def test_swept_keys_come_from_the_command_line_and_the_sweep_config():
    config = hydra_config(
        "model=lenet",
        "optimizer.lr=0.01,0.1",
        "data.batch_size=range(32,129,32)",
        "seed=1",
        params={"optimizer.weight_decay": "tag(log, interval(1e-6, 1e-2))", "model.dropout": "0.1,0.2"},
    )
    assert sweep_keys(config) == ["optimizer.weight_decay", "model.dropout", "optimizer.lr", "data.batch_size"]
    # A single value on the command line fixes a key the sweep config would search.
    assert sweep_keys(hydra_config("model.dropout=0.3", params={"model.dropout": "0.1,0.2"})) == []
    assert sweep_keys(hydra_config("model=lenet,mlp", "+trainer.limit_train_batches=5,10")) == [
        "model",
        "trainer.limit_train_batches",
    ]


def test_run_names_are_short_and_say_what_was_swept():
    job = ["model=mlp", "optimizer.lr=0.012345678901", "data.batch_size=64", "+data.data_dir=/a/b", "seed=2"]
    assert run_name(["optimizer.lr", "data.batch_size"], job) == "lr=0.0123,batch_size=64"
    assert run_name(["model", "seed"], job) == "model=mlp,seed=2"
    assert run_name(["data.data_dir"], job) == "data_dir=_a_b"  # no slash: one folder per run
    # the same last part twice: the full keys tell them apart
    assert run_name(["optimizer.lr", "scheduler.lr"], ["optimizer.lr=0.1", "scheduler.lr=1e-05"]) == (
        "optimizer.lr=0.1,scheduler.lr=1e-05"
    )


def test_a_sweep_with_a_failed_job_ends_non_zero(tmp_path):
    from omegaconf import OmegaConf

    fake_job(tmp_path, 0, ["optimizer.lr=0.01"], ok(0.97, 0.97))
    fake_job(tmp_path, 1, ["optimizer.lr=50"], {"status": "failed", "error": "InputError: training diverged"})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit, match=r"1 job\(s\) failed \(job 1\)"):
        SweepReport().on_multirun_end(config)
    assert (tmp_path / "summary.md").exists()
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(ok(0.9, 0.9)))
    SweepReport().on_multirun_end(config)  # all ok: no exit


def test_named_sweeps_compose(make_cfg):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        grid = compose("train", ["sweep=grid"], return_hydra_config=True)
        seeds = compose("train", ["sweep=seeds"], return_hydra_config=True)
    assert dict(grid.hydra.sweeper.params) == {"optimizer.lr": "0.01,0.05,0.1", "data.batch_size": "64,256"}
    assert dict(seeds.hydra.sweeper.params) == {"seed": "1,2,3"}


def test_optuna_sweep_composes_a_seeded_tpe_search_on_val_acc():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        sweeper = compose("train", ["sweep=optuna"], return_hydra_config=True).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1
    assert set(sweeper.params) == {"optimizer.lr", "data.batch_size", "optimizer.weight_decay", "model.dropout"}


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_every_model_takes_the_optuna_search_space_or_is_searched_without_what_it_lacks(model, make_cfg, caplog):
    import torch
    from hydra.utils import instantiate

    from hydra_plugins.mnist_lab_plugins._optuna import takes

    config = make_cfg(f"model={model}", "sweep=optuna")
    assert (
        takes(config, "optimizer.lr") and takes(config, "data.batch_size") and takes(config, "optimizer.weight_decay")
    )
    if "dropout" not in config.model:  # a model of one's own without it: the search leaves it out, saying so
        assert not takes(config, "model.dropout") and "model.dropout is left out of this search" in caplog.text
        return
    cfg = make_cfg(f"model={model}", "model.dropout=0.25", "optimizer.weight_decay=1e-4", "data.batch_size=32")
    net = instantiate(cfg.model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False, _convert_="all")
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)][:1] == [0.25]


@pytest.mark.slow
def test_optuna_sweep_runs_trials_that_a_seed_repeats(synthetic_dir, tmp_path):
    import optuna

    trials = {}
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # a: in the sweep folder; b: the same search in a database of one's own; c: b's study grown to 4 trials
    for attempt, extra in (
        ("a", ["hydra.sweeper.n_trials=3"]),
        ("b", ["hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}"]),
        ("c", ["hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}"]),
    ):
        sweep = tmp_path / attempt
        result = run_train(
            "-m",
            "sweep=optuna",
            *extra,
            *smoke_overrides(synthetic_dir, "model=mlp"),
            f"hydra.sweep.dir={sweep}",
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        table = rows(sweep)
        assert all(r["status"] == "ok" for r in table)
        # the smoke settings fix data.batch_size=32 on the command line: Optuna searches the rest
        searched = ["optimizer.lr", "optimizer.weight_decay", "model.dropout"]
        assert json.loads((sweep / "sweep.json").read_text()) == {"swept": searched}
        assert list(table[0])[1:4] == searched
        for r in table:
            assert 0.003 <= float(r["optimizer.lr"]) <= 0.3 and 1e-6 <= float(r["optimizer.weight_decay"]) <= 1e-2
            assert 0 <= float(r["model.dropout"]) <= 0.5
        # Optuna's own result names the job the report marks best: the highest val/acc
        result_file = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
        (best,) = [r for r in table if r["best"] == "True"]
        assert float(best["val/acc"]) == max(float(r["val/acc"]) for r in table)
        if attempt != "c":
            assert result_file["best_value"] == pytest.approx(float(best["val/acc"]))
        trials[attempt] = [[r[k] for k in searched] for r in table]
    assert len(trials["a"]) == 3 and trials["a"] == trials["b"]  # a fixed sampler seed: the same trials
    study = optuna.load_study(study_name="mnist_lab", storage=storage)
    assert len(study.trials) == 4 and study.best_value == max(t.value for t in study.trials)


def test_submitit_jobs_use_the_cpus_they_were_given():
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mnist_lab.jobs import threads_per_job

    assert threads_per_job(OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {"cpus_per_task": 3}})) == 3
    assert threads_per_job(OmegaConf.create({"mode": RunMode.RUN, "launcher": {"cpus_per_task": 3}})) is None


@pytest.mark.parametrize("n_jobs, cores, expected", [(-1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 16, 8), (4, 2, 1)])
def test_parallel_jobs_share_the_cores(n_jobs, cores, expected, monkeypatch):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mnist_lab.jobs import threads_per_job

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    hydra_cfg = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {"n_jobs": n_jobs}})
    assert threads_per_job(hydra_cfg) == expected
    assert threads_per_job(OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {}})) is None


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        "hydra/launcher=joblib",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.01,0.1",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=-1" in result.stdout + result.stderr
    assert [r["status"] for r in rows(sweep)] == ["ok", "ok"]
    logs = [(sweep / job / "train.log").read_text() for job in ("0", "1")]
    assert all("torch uses 1 CPU threads" in log for log in logs)  # n_jobs=-1: one job per core


LAUNCHERS = {
    "basic": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_preset_composes(launcher):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == LAUNCHERS[launcher]
    get_class(cfg.hydra.launcher._target_)  # the plugin imports


def test_slurm_preset_turns_its_overrides_into_sbatch_settings(tmp_path, monkeypatch):
    """No cluster here: build the sbatch script submitit would submit, from the preset and
    the overrides a user passes, the way hydra-submitit-launcher hands them to submitit.
    submitit looks for srun on PATH first; a stand-in that is never called satisfies it."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.timeout_min=120",
        f"hydra.sweep.dir={tmp_path}",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        launcher = compose("train", overrides, return_hydra_config=True).hydra.launcher
    params = {k: v for k, v in OmegaConf.to_container(launcher).items() if k not in {"_target_", "submitit_folder"}}
    executor = submitit.AutoExecutor(
        folder=tmp_path, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "train"  # ${hydra.job.name}, set when a job runs
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python train.py", "0")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=2",
        "--time=120",
        "--cpus-per-task=8",
        "--mem=16GB",
        "--ntasks-per-node=1",
        "--job-name=train",
    ):
        assert f"#SBATCH {line}\n" in script, script


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_jobs(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.01,0.1",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    assert [r["status"] for r in rows(sweep)] == ["ok", "ok"]
    assert list((sweep / ".submitit").iterdir())  # submitit's own job folders: the jobs went through it
    for job in ("0", "1"):
        assert "torch uses 1 CPU threads" in (sweep / job / "train.log").read_text()


def test_report_shows_every_declared_key_even_one_all_jobs_share(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"swept": ["data.batch_size", "optimizer.lr"]}))
    fake_job(tmp_path, 0, ["optimizer.lr=0.01", "data.batch_size=64", "model=mlp"], ok(0.97, 0.97))
    fake_job(tmp_path, 1, ["optimizer.lr=0.1", "data.batch_size=64", "model=mlp"], ok(0.98, 0.97))
    write_report(tmp_path)
    assert list(rows(tmp_path)[0])[:3] == ["job", "data.batch_size", "optimizer.lr"]


def test_a_search_key_the_model_lacks_is_left_out_with_one_line(caplog):
    from omegaconf import OmegaConf

    from hydra_plugins.mnist_lab_plugins._optuna import takes

    config = OmegaConf.create(
        {"model": {"width": 64}, "optimizer": {"lr": 0.1}, "hydra": {"runtime": {"choices": {"model": "tiny"}}}}
    )
    assert takes(config, "optimizer.lr") and takes(config, "+model.extra")
    assert not takes(config, "model.dropout")
    assert caplog.messages == ["model.dropout is left out of this search: model=tiny takes no dropout"]
