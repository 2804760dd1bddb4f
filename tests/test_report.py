import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnist_lab.errors import InputError
from mnist_lab.report import record_failure, write_report
from mnist_lab.train import run
from tests.conftest import ROOT, run_train, smoke_overrides


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
    grid = [("0.01", "64", 0.97, 0.99), ("0.01", "256", 0.95, 0.95), ("0.1", "64", 0.98, 0.96), ("0.1", "256", 0.96, 0.97)]
    for num, (lr, bs, val, test) in enumerate(grid):
        overrides = ["model=lenet", f"optimizer.lr={lr}", f"data.batch_size={bs}", "~callbacks.progress_bar"]
        fake_job(tmp_path, num, overrides, ok(val, test))
    write_report(tmp_path)
    table = rows(tmp_path)
    assert [r["job"] for r in table] == ["0", "1", "2", "3"]
    assert list(table[0]) == ["job", "optimizer.lr", "data.batch_size", "status", "val/acc", "test/acc", "epochs",
                              "fit_time_s", "best", "error"]
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
        ("ok", "True", ""), ("failed", "False", "InputError: training diverged"), ("running", "False", ""),
    ]
    assert "3 jobs: 2 ok, 1 failed." in (tmp_path / "summary.md").read_text()


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


def test_record_failure_keeps_earlier_metrics(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok", "epochs": 2}))
    record_failure(tmp_path, RuntimeError("first line\nsecond line"))
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "status": "failed", "epochs": 2, "error": "RuntimeError: first line",
    }


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
    result = run_train("-m", *smoke_overrides(synthetic_dir, "model=softmax"), "optimizer.lr=0.01,0.5",
                       "data.split_seed=1,2", f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir() if d.is_dir()}
    assert sorted(metrics) == ["0", "1", "2", "3"]
    table = rows(sweep)
    assert len(table) == 4 and all(r["status"] == "ok" for r in table)
    best = max(metrics, key=lambda job: metrics[job]["val/acc"])
    assert [r["job"] for r in table if r["best"] == "True"] == [best]
    assert (sweep / "summary.png").exists()
    # TensorBoard's HPARAMS: the same keys in every job, the swept ones among them
    keys = [set(session_hparams(sweep / job)) for job in sorted(metrics)]
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
    result = run_train("-m", *smoke_overrides(synthetic_dir, "model=softmax"), "optimizer.lr=0.01,0.05,-1,0.1",
                       f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode != 0
    table = rows(sweep)
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "ok"]
    assert "optimizer.lr must be > 0" in table[2]["error"]
    assert "4 jobs: 3 ok, 1 failed." in (sweep / "summary.md").read_text()


def test_named_sweeps_compose(make_cfg):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        grid = compose("train", ["sweep=grid"], return_hydra_config=True)
        seeds = compose("train", ["sweep=seeds"], return_hydra_config=True)
    assert dict(grid.hydra.sweeper.params) == {"optimizer.lr": "0.01,0.05,0.1", "data.batch_size": "64,256"}
    assert dict(seeds.hydra.sweeper.params) == {"seed": "1,2,3"}


def test_misclassified_grid_keeps_the_most_confident_mistakes():
    import torch

    from mnist_lab.figures import TestFigures

    class Module:
        hparams = {"num_classes": 3}
        device = torch.device("cpu")

    Module.hparams = type("H", (), {"num_classes": 3})()
    figures = TestFigures(samples=2)
    figures.on_test_epoch_start(None, Module())
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 28, 28)
    logits = torch.tensor([[5.0, 0, 0], [0, 9.0, 0], [0, 0, 1.0], [0, 7.0, 0]])
    figures.on_test_batch_end(None, None, logits, (images, torch.tensor([0, 0, 1, 2])), 0)
    _, predicted, labels, confidence = figures.wrong[0]
    assert predicted.tolist() == [1, 1] and labels.tolist() == [0, 2]  # the two most confident of three mistakes
    assert confidence[0] > confidence[1]
    assert figures.confusion.compute()[0].tolist() == [1, 1, 0]


@pytest.mark.parametrize("n_jobs, cores, expected", [(-1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 16, 8), (4, 2, 1)])
def test_parallel_jobs_share_the_cores(n_jobs, cores, expected, monkeypatch):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mnist_lab.train import threads_per_job

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    hydra_cfg = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {"n_jobs": n_jobs}})
    assert threads_per_job(hydra_cfg) == expected
    assert threads_per_job(OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {}})) is None


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("-m", "hydra/launcher=joblib", *smoke_overrides(synthetic_dir, "model=softmax"),
                       "optimizer.lr=0.01,0.1", f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=-1" in result.stdout + result.stderr
    assert [r["status"] for r in rows(sweep)] == ["ok", "ok"]
    logs = [(sweep / job / "train.log").read_text() for job in ("0", "1")]
    assert all("torch uses 1 CPU threads" in log for log in logs)  # n_jobs=-1: one job per core
