"""logger=csv and logger=mlflow beside TensorBoard, read back with each one's own reader: the same
metrics, the hyperparameters, the figures as MLflow artifacts; a resumed run goes on in both."""

import csv
import json
import os
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lab.errors import InputError
from tests.conftest import ROOT, run_train, smoke_overrides

KILLER = "tests.callbacks.KillAtEpoch"


def csv_rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def mlflow_runs(store: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "mnist_lab"]
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])


def artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.mark.slow
def test_csv_and_mlflow_carry_what_tensorboard_does(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    result = run_train(
        "logger=[csv,mlflow]",
        *smoke_overrides(synthetic_dir, "model=softmax", "loss=label_smoothing"),
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    tensorboard = EventAccumulator(str(run), size_guidance={"scalars": 0})
    tensorboard.Reload()
    train_loss = [round(e.value, 5) for e in tensorboard.Scalars("train/loss")]
    assert len(train_loss) == 6  # 3 steps x 2 epochs

    rows = csv_rows(run)
    assert [round(float(r["train/loss"]), 5) for r in rows if r["train/loss"]] == train_loss
    assert [float(r["test/acc"]) for r in rows if r["test/acc"]] == [pytest.approx(metrics["test/acc"])]
    assert max(float(r["val/acc"]) for r in rows if r["val/acc"]) == pytest.approx(metrics["val/acc"])
    import yaml

    params = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert (params["model"], params["loss"], params["optimizer.lr"]) == ("SoftmaxRegression", "LabelSmoothing", 0.05)

    client, (mlflow_run,) = mlflow_runs(run / "mlflow.db")
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    assert mlflow_run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [round(m.value, 5) for m in sorted(history, key=lambda m: m.step)] == train_loss
    assert (mlflow_run.data.params["model"], mlflow_run.data.params["loss"]) == ("SoftmaxRegression", "LabelSmoothing")
    assert set(artifacts(client, mlflow_run.info.run_id)) == {
        "curves.png",
        "metrics.json",
        "test/samples.png",
        "test/misclassified.png",
        "test/confusion_matrix.png",
    }


@pytest.mark.slow
def test_a_sweep_keeps_one_mlflow_store_with_a_run_per_job(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        "logger=mlflow",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.05,0.1",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr
    _, runs = mlflow_runs(sweep / "mlflow.db")
    assert [(r.info.run_name, r.data.params["optimizer.lr"]) for r in runs] == [
        ("lr=0.05", "0.05"),
        ("lr=0.1", "0.1"),
    ]  # named as the TensorBoard runs
    assert not list(sweep.glob("*/mlflow.db"))
    again = run_train(
        "-m",
        "logger=mlflow",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        "optimizer.lr=0.05,0.1",
        f"hydra.sweep.dir={sweep}",
    )  # the same sweep again: the store is the sweep's own
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_in_the_same_csv_and_mlflow_runs(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    args = [
        "logger=[csv,mlflow]",
        *smoke_overrides(synthetic_dir, "model=softmax", "trainer.max_epochs=3"),
        f"+callbacks.kill._target_={KILLER}",
        f"hydra.run.dir={run}",
    ]
    killed = run_train(*args, env={"MNIST_LAB_TEST_KILL_AT_EPOCH": "2"})
    assert killed.returncode == -9
    resumed = run_train(f"resume={run}", f"trusted_targets=[{KILLER}]")
    assert resumed.returncode == 0, resumed.stderr
    steps = [(r["step"], r["train/loss"]) for r in csv_rows(run) if r["train/loss"]]
    assert [int(s) for s, _ in steps] == list(range(9))  # 3 epochs x 3 steps, each once
    client, (mlflow_run,) = mlflow_runs(run / "mlflow.db")  # one MLflow run, gone on with
    assert mlflow_run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")}) == list(range(9))


def test_logger_mlflow_without_mlflow_says_how_to_install_it(make_cfg, tmp_path, monkeypatch):
    from mnist_lab import loggers

    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r'pip install "mnist_lab\[mlflow\]"'):
        loggers.build_loggers(make_cfg("logger=mlflow"), tmp_path, {}, "run")


def test_tensorboard_cannot_be_left_out(make_cfg, tmp_path):
    from mnist_lab.loggers import build_loggers

    with pytest.raises(InputError, match="TensorBoard is always on"):
        build_loggers(make_cfg("~logger.tensorboard"), tmp_path, {}, "run")


@pytest.mark.slow
def test_a_tracking_uri_given_is_used_instead_of_the_run_folder(synthetic_dir, tmp_path):
    store = tmp_path / "elsewhere.db"
    result = run_train(
        "logger=mlflow",
        f"logger.mlflow.tracking_uri=sqlite:///{store}",
        "logger.mlflow.experiment_name=mnist_lab",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr
    client, (mlflow_run,) = mlflow_runs(store)
    assert mlflow_run.info.status == "FINISHED" and not (tmp_path / "run" / "mlflow.db").exists()
    assert "curves.png" in artifacts(client, mlflow_run.info.run_id)
    assert (tmp_path / "mlartifacts").is_dir() and not (ROOT / "mlruns").exists()  # beside the store, not in the cwd


@pytest.mark.parametrize(
    "overrides",
    [
        ["logger=csv", "logger.csv.name=/tmp/elsewhere"],
        ["logger=csv", "logger.csv.version=../../x"],
        ["logger.tensorboard.name=../.."],
    ],
)
def test_tensorboard_and_csv_write_only_inside_the_run_folder(overrides, make_cfg, tmp_path):
    from mnist_lab.loggers import build_loggers

    with pytest.raises(InputError, match="outside the run folder"):
        build_loggers(make_cfg(*overrides), tmp_path / "run", {}, "run")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def mlflow_env(monkeypatch):
    """MLflow's settings as a user's shell has them: none of mnist_lab's defaults yet."""
    pytest.importorskip("mlflow")
    from mnist_lab.loggers import MLFLOW_DEFAULTS

    for variable in MLFLOW_DEFAULTS:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_an_mlflow_store_goes_only_into_a_new_folder_or_mnist_labs_own(make_cfg, tmp_path, mlflow_env):
    from mnist_lab.loggers import build_loggers

    run = tmp_path / "outputs" / "runs" / "2026-12-01" / "run"  # as train.py lays out outputs/
    run.mkdir(parents=True)
    (run / ".lock").write_text("")
    users = tmp_path / "home"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    for uri, error in (
        ("sqlite://", "keeps the run's metrics in memory"),
        ("sqlite:///:memory:", "keeps the run's metrics in memory"),
        (f"sqlite:///{users}/mlflow.db", f"in {users}, which holds notes.txt, not mnist_lab's"),
        (f"file:{users}", "give sqlite:///<path>/mlflow.db"),
    ):
        with pytest.raises(InputError, match=re.escape(error)):
            build_loggers(make_cfg("logger=mlflow", f"logger.mlflow.tracking_uri='{uri}'"), run, {}, "run")
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="logger.mlflow.artifact_location puts"):
        build_loggers(make_cfg("logger=mlflow", f"+logger.mlflow.artifact_location={users}/art"), run, {}, "run")
    # Beside the runs in their outputs/ folder, or in a new one: a store several runs share.
    for store in (tmp_path / "outputs" / "mlflow.db", tmp_path / "new" / "mlflow.db"):
        (logger,) = build_loggers(
            make_cfg("logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{store}"), run, {}, "r"
        )[1:]
        assert store.is_file() and logger.run_id


def test_mlflow_does_not_phone_home_or_wait_on_a_server_that_does_not_answer(make_cfg, tmp_path, mlflow_env):
    import socket

    from mnist_lab.loggers import build_loggers

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match=rf"MLflow's store at http://127.0.0.1:{port} does not answer"):
        build_loggers(
            make_cfg("logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}"), tmp_path, {}, "r"
        )
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    mlflow_env.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user's own choice stands
    build_loggers(make_cfg("logger=mlflow"), tmp_path / "run", {}, "r")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_a_resumed_run_whose_mlflow_run_is_gone_logs_to_a_new_one_and_says_so(make_cfg, tmp_path, mlflow_env, caplog):
    from mnist_lab.loggers import build_loggers

    (logger,) = build_loggers(make_cfg("logger=mlflow"), tmp_path, {}, "run", mlflow_run_id="0123456789abcdef")[1:]
    assert logger.run_id != "0123456789abcdef"
    assert (
        "The MLflow run 0123456789abcdef is not in sqlite:///" in caplog.text
        and "logs to a new MLflow run" in caplog.text
    )
