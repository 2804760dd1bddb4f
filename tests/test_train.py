import contextlib
import csv
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mnist_lab.errors import InputError
from mnist_lab.recipe import run
from tests.conftest import ARCHITECTURES, ROOT, compose_train, run_train, run_train_together, smoke_overrides
from tests.test_compat import shown_by_tensorboard

MODELS = {name: get_class(compose_train(f"model={name}").model._target_) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def smoke_runs(synthetic_dir, tmp_path_factory):
    """One short run of each architecture on synthetic data: {model: (run folder, metrics)}."""
    from hydra import compose, initialize_config_dir

    runs = {}
    for name in MODELS:
        out_dir = tmp_path_factory.mktemp(name)
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", smoke_overrides(synthetic_dir, f"model={name}"))
        runs[name] = out_dir, run(cfg, out_dir)
    return runs


def events(out_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(out_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("name", MODELS)
def test_smoke_run_writes_metrics_checkpoints_and_events(name, smoke_runs):
    out_dir, metrics = smoke_runs[name]
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved == metrics
    assert {"val/acc", "test/acc", "test/loss", "epochs", "fit_time_s", "epoch_train_time_s"} <= saved.keys()
    assert saved["epochs"] == 2 and len(saved["epoch_train_time_s"]) == 2
    assert 0 <= saved["val/acc"] <= 1 and 0 <= saved["test/acc"] <= 1
    # the best checkpoint and last.ckpt, nothing else (no last-v1.ckpt)
    assert {p.relative_to(out_dir) for p in (out_dir / "checkpoints").iterdir()} == {
        Path(saved["best_checkpoint"]),
        Path("checkpoints/last.ckpt"),
    }
    assert list(out_dir.glob("events.out.tfevents.*"))
    assert (out_dir / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("name", MODELS)
def test_event_files_hold_the_scalars_and_hparams_with_metrics(name, smoke_runs):
    out_dir, metrics = smoke_runs[name]
    accumulator = events(out_dir)
    tags = set(accumulator.Tags()["scalars"])
    assert {
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "test/loss",
        "test/acc",
        "train/lr",
    } <= tags
    assert accumulator.Scalars("test/acc")[-1].value == pytest.approx(metrics["test/acc"])
    assert accumulator.Scalars("val/acc_best")[-1].value == pytest.approx(metrics["val/acc"])
    assert len(accumulator.Scalars("train/loss")) == 6  # 3 steps x 2 epochs, log_every_n_steps=1

    assert set(accumulator.Tags()["images"]) == {"test/samples", "test/misclassified", "test/confusion_matrix"}

    content = accumulator.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"val/acc", "test/acc", "test/loss"} <= {m.name.tag for m in experiment.metric_infos}
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert set(session.hparams) == FIXED
    assert session.hparams["model"].string_value == MODELS[name].__name__
    assert session.hparams["augment"].string_value == (
        "RandomAffine" if name == "cnn" else "none"
    )  # conf/model/cnn.yaml
    assert session.hparams["optimizer.lr"].number_value == 0.05
    assert session.hparams["data.batch_size"].number_value == 32


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def logged_run(synthetic_dir, tmp_path_factory):
    """A smoke run of softmax regression with logger=csv beside TensorBoard: (run folder, metrics,
    mnist_lab's log messages, the console output besides them)."""
    out_dir, records, console = tmp_path_factory.mktemp("logged"), Records(), io.StringIO()
    package = logging.getLogger("mnist_lab")
    package.addHandler(records)
    level = package.level
    package.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(console):  # the rich model summary prints to stdout
            metrics = run(compose_train(*smoke_overrides(synthetic_dir, "model=softmax", "logger=csv")), out_dir)
    finally:
        package.removeHandler(records)
        package.setLevel(level)
    return out_dir, metrics, records.messages, console.getvalue()


def test_each_epoch_logs_a_line_of_what_was_logged(logged_run):
    out_dir, metrics, messages, _ = logged_run
    accumulator = events(out_dir)
    lines = [m for m in messages if m.startswith("Epoch ")]  # none for the sanity check
    assert [line.split(":")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"]
    train_loss = [s.value for s in accumulator.Scalars("train/loss")]  # every step: log_every_n_steps=1
    for epoch, line in enumerate(lines):
        numbers = dict(re.findall(r"(train/loss|val/loss|val/acc) ([\d.]+)", line))
        assert float(numbers["train/loss"]) == pytest.approx(sum(train_loss[3 * epoch : 3 * epoch + 3]) / 3, abs=1e-4)
        assert numbers["val/acc"] == f"{100 * accumulator.Scalars('val/acc')[epoch].value:.2f}"
        assert float(numbers["val/loss"]) == pytest.approx(accumulator.Scalars("val/loss")[epoch].value, abs=1e-4)
        # EpochTimer's seconds, as metrics.json has them (rounded to the millisecond there)
        assert float(line.split()[-2]) == pytest.approx(metrics["epoch_train_time_s"][epoch], abs=0.051)
    assert "2 epochs," in messages[-1]


def test_the_model_summary_shows_the_layers_alone(logged_run):
    console = logged_run[3]
    assert all(f" {name} " in console for name in ("net", "net.0", "net.1", "net.2", "Linear"))  # max_depth: 2
    assert not any(name in console for name in ("FLOPs", "criterion", "val_acc", "test_loss", "MeanMetric"))
    assert "Params: 7.9 K trainable, 0 non-trainable" in console


def test_tensorboard_leaves_out_lightnings_epoch_scalar(logged_run):
    out_dir = logged_run[0]
    # The one tag outside a train/, val/ or test/ section would be the SCALARS page's first chart.
    assert {tag.split("/")[0] for tag in events(out_dir).Tags()["scalars"]} == {"train", "val", "test"}
    with open(out_dir / "csv" / "metrics.csv", newline="") as f:
        assert "epoch" in next(csv.reader(f))  # CSV keeps Lightning's column


def test_one_epoch_is_one_epoch(synthetic_dir, make_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mnist_lab")
    run(make_cfg(*smoke_overrides(synthetic_dir, "model=softmax", "trainer.max_epochs=1")), tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in messages if m.startswith("Epoch ")] == ["Epoch 1/1"]
    assert "1 epoch," in messages[-1]


def test_hparams_have_the_same_keys_across_a_sweep(make_cfg):
    from mnist_lab.hparams import hparams_of

    sweep = [
        ["model=lenet", "optimizer=sgd", "model.dropout=0.1"],
        ["model=mlp", "optimizer=adam", "model.dropout=0.3"],
    ]
    params = [hparams_of(make_cfg(*overrides), overrides) for overrides in sweep]
    assert params[0].keys() == params[1].keys()
    assert (params[0]["model"], params[0]["optimizer"], params[0]["model.dropout"]) == ("LeNet", "SGD", 0.1)
    assert (params[1]["model"], params[1]["optimizer"], params[1]["model.dropout"]) == ("MLP", "Adam", 0.3)


FIXED = {
    "model",
    "optimizer",
    "scheduler",
    "loss",
    "augment",
    "optimizer.lr",
    "data.dataset",
    "data.batch_size",
    "seed",
    "trainer.max_epochs",
}


def test_bookkeeping_overrides_stay_out_of_hparams(synthetic_dir, make_cfg):
    from mnist_lab.hparams import hparams_of

    overrides = smoke_overrides(
        synthetic_dir,
        "model.dropout=0.2",
        "callbacks.test_figures.samples=8",
        "logger=csv",
        "compile=false",
        "trusted_targets=[]",
    )
    params = hparams_of(make_cfg(*overrides), [*overrides, "hydra.run.dir=/tmp/run", "resume=/tmp/run"])
    # data.download, data.data_dir, data.verify_checksums, trainer.log_every_n_steps, the progress bar... are out
    assert set(params) == FIXED | {
        "model.dropout",
        "data.val_size",
        "data.eval_batch_size",
        "trainer.limit_train_batches",
    }
    assert (params["model.dropout"], params["trainer.limit_train_batches"]) == (0.2, 3)
    swept = hparams_of(make_cfg("data.num_workers=0"), ["data.num_workers=0"], swept=["data.num_workers"])
    assert swept["data.num_workers"] == 0  # a swept key always joins: it names the run


def tensorboard_ticks(run_dir: Path) -> list[str]:
    """The hyperparameter columns TensorBoard's HPARAMS tab shows before any is ticked."""
    content = events(run_dir).PluginTagToContent("hparams")["_hparams_/experiment"]
    return shown_by_tensorboard(plugin_data_pb2.HParamsPluginData.FromString(content).experiment)


@pytest.mark.parametrize(
    "swept, shown",
    [
        ((), ["data.batch_size", "loss", "model", "optimizer", "optimizer.lr"]),
        (
            ("optimizer.lr", "data.split_seed"),
            ["data.batch_size", "data.split_seed", "model", "optimizer", "optimizer.lr"],
        ),
        (("model",), ["data.batch_size", "loss", "model", "optimizer", "optimizer.lr"]),
    ],
)
def test_hparams_ticks_the_swept_keys_then_the_compared_ones(swept, shown, make_cfg, tmp_path):
    from mnist_lab.hparams import hparams_of, log_hparams
    from mnist_lab.loggers import TensorBoard

    overrides = ["data.download=false", "model.dropout=0.1", *(f"{key}=1" for key in swept if key != "model")]
    cfg = make_cfg(*overrides)
    logger = TensorBoard(save_dir=str(tmp_path), name="", version="")
    log_hparams(logger, hparams_of(cfg, overrides, swept), swept)
    assert tensorboard_ticks(tmp_path) == shown  # TensorBoard orders them by name


@pytest.mark.parametrize("name", MODELS)
def test_best_checkpoint_loads_safely(name, smoke_runs):
    out_dir, metrics = smoke_runs[name]
    path = out_dir / metrics["best_checkpoint"]
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.SGD"
    model = MODELS[name].load_from_checkpoint(path)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_same_seed_gives_identical_runs(synthetic_dir, make_cfg, tmp_path):
    cfg = make_cfg(*smoke_overrides(synthetic_dir, "model=mlp"))
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert (first["val/acc"], first["test/acc"], first["test/loss"]) == (
        second["val/acc"],
        second["test/acc"],
        second["test/loss"],
    )
    weights = [torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in "ab"]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_every_optimizer_and_scheduler_trains(synthetic_dir, make_cfg, tmp_path):
    combos = [(opt, "onecycle") for opt in ("sgd", "adam", "adamw", "adadelta", "rmsprop")]
    combos += [("sgd", sched) for sched in ("none", "cosine", "step")]
    for optimizer, scheduler in combos:
        cfg = make_cfg(
            *smoke_overrides(synthetic_dir, "model=softmax", f"optimizer={optimizer}", f"scheduler={scheduler}")
        )
        out_dir = tmp_path / f"{optimizer}-{scheduler}"
        run(cfg, out_dir)
        lrs = [s.value for s in events(out_dir).Scalars("train/lr")]
        if scheduler == "none":
            assert lrs == pytest.approx([cfg.optimizer.lr] * len(lrs))
        elif scheduler in ("onecycle", "cosine"):
            assert len(set(lrs)) > 1, (optimizer, scheduler)  # the schedule moved the learning rate


def test_max_epochs_below_one_is_refused(synthetic_dir, make_cfg, tmp_path):
    with pytest.raises(InputError, match="trainer.max_epochs must be at least 1"):
        run(make_cfg(*smoke_overrides(synthetic_dir, "trainer.max_epochs=0")), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_trainer_without_gpu_is_refused(synthetic_dir, make_cfg, tmp_path):
    with pytest.raises(InputError, match="trainer=gpu, but PyTorch sees no CUDA GPU"):
        run(make_cfg(*smoke_overrides(synthetic_dir, "trainer=gpu")), tmp_path)


@pytest.mark.slow
def test_train_py_end_to_end(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(*smoke_overrides(synthetic_dir, "model=lenet"), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    output = result.stdout + result.stderr
    assert f"Run folder: {run_dir}" in output
    assert f"Test accuracy: {100 * metrics['test/acc']:.2f}%" in output
    assert "tensorboard --logdir" in output
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / ".hydra" / "overrides.yaml").exists()
    log = (run_dir / "train.log").read_text()
    assert "Test accuracy" in log and "(best val/acc" in log and "2 epochs," in log
    epochs = [line.split(" - ", 1)[1].split(":")[0] for line in log.splitlines() if "][INFO] - Epoch " in line]
    assert epochs == ["Epoch 1/2", "Epoch 2/2"]  # one line per epoch, none for the sanity check
    assert "LeafSpec" not in result.stderr, result.stderr  # Lightning's deprecation warning, filtered


BAD_INPUT = [
    ("optimizer.lr=-0.1", "optimizer.lr must be > 0"),
    ("optimizer.lr=0", "optimizer.lr must be > 0"),
    ("optimizer.lr=abc", "optimizer.lr must be > 0, got 'abc'"),
    ("data.batch_size=0", "data.batch_size must be a positive integer"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be at least 1"),
    ("data.val_size=0", "data.val_size must be a positive integer"),
    ("data.val_size=300", "data.val_size=300 leaves no training images"),
    ("hydra.run.dir=/proc/mnist_lab_run", "cannot write to the output folder /proc/mnist_lab_run"),
    ("+trainer.strategy=ddp_spawn", "trainer.strategy=ddp_spawn is not supported"),
    ("callbacks.checkpoint=null", "callbacks.checkpoint=null leaves no best checkpoint to test"),
    ("steps_per_replay=4", "steps_per_replay=4 applies to the captured step only"),
]


@pytest.fixture(scope="module")
def bad_input_results(synthetic_dir, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Each BAD_INPUT override given to train.py, in a process of its own; all started at once."""
    root = tmp_path_factory.mktemp("bad_input")
    run_dirs = {override: root / str(i) / "run" for i, (override, _) in enumerate(BAD_INPUT)}
    results = run_train_together(
        [
            [*smoke_overrides(synthetic_dir), f"hydra.run.dir={run_dir}", override]
            for override, run_dir in run_dirs.items()
        ]
    )
    return {override: (run_dir, result) for (override, run_dir), result in zip(run_dirs.items(), results, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("override, message", BAD_INPUT, ids=[o for o, _ in BAD_INPUT])
def test_bad_input_gets_one_clear_message(override, message, bad_input_results):
    run_dir, result = bad_input_results[override]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert not (run_dir / "checkpoints").exists()  # refused before any training


@pytest.mark.slow
def test_missing_data_is_refused_before_training(tmp_path):
    result = run_train(f"data.data_dir={tmp_path}", "data.download=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"Error: MNIST files missing in {tmp_path / 'MNIST' / 'raw'}" in result.stderr


@pytest.mark.slow
def test_runs_started_together_get_their_own_folders(synthetic_dir, tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), *smoke_overrides(synthetic_dir, "model=softmax")]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
    folders = list((tmp_path / "outputs" / "runs").glob("*/*_softmax"))
    assert len(folders) == 2
    assert all((folder / "metrics.json").exists() for folder in folders)


@pytest.mark.slow
def test_lenet_reaches_98_percent_in_one_epoch_on_real_mnist(real_data_dir, make_cfg, tmp_path):
    cfg = make_cfg(
        f"data.data_dir={real_data_dir}",
        "data.download=false",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["test/acc"] >= 0.98


# Every option of `python train.py --help`, given a value out of range, malformed or extreme: one
# line naming the option (or its group, with PyTorch's or Lightning's own reason) and a way out.
BAD_VALUES = [
    ("seed=-1", "seed must be at least 0"),
    ("seed=abc", "seed must be at least 0 (a whole number below 2**32), got 'abc'"),
    ("compile=abc", "compile must be true or false"),
    ("data.split_seed=abc", "data.split_seed must be a whole number"),
    ("data.num_workers=-1", "data.num_workers must be a whole number"),
    ("data.download=abc", "data.download must be true or false"),
    ("data.on_device=abc", "data.on_device must be true or false"),
    ("data.std=0", "data.std from 0.001 to 1, got mean=0.1307, std=0"),
    ("data.mean=1e40", "data.mean from 0 to 1"),
    ("data.num_workers=1000", "data.num_workers=1000: give at most 64"),
    ("data.dataset=CIFAR10", "data.dataset='CIFAR10' is not an MNIST-format dataset"),
    ("augment=affine data.augment.scale=abc", "data: TypeError"),
    ("model.dropout=2", "model.dropout=2: give a probability from 0 up to, not including, 1"),
    ("model=mlp model.hidden_sizes=[-1]", "model.hidden_sizes=[-1]: give a list of 0 to 32 whole numbers"),
    ("optimizer.lr=1e308", "optimizer.lr=1e+308 is beyond float32's range"),
    ("optimizer.momentum=-1", "optimizer: ValueError: Invalid momentum value: -1"),
    ("optimizer=adam optimizer.betas=[2,3]", "optimizer: ValueError: Invalid beta parameter"),
    ("scheduler.pct_start=2", "scheduler: ValueError: Expected float between 0 and 1 pct_start"),
    ("scheduler=step scheduler.step_size=0", "scheduler.step_size must be a positive integer"),
    ("scheduler=cosine scheduler.T_max=0", "scheduler.T_max must be a positive integer"),
    ("scheduler.interval=foo", "scheduler.interval must be step or epoch"),
    ("scheduler=step scheduler.gamma=-1", "scheduler.gamma=-1: give a number above 0"),
    ("scheduler=step scheduler.gamma=nan", "scheduler.gamma=nan: give a number above 0"),
    ("scheduler=cosine scheduler.eta_min=-1", "scheduler.eta_min=-1: give a number 0 or more"),
    ("loss=multi_margin loss.margin=-1", "loss.margin=-1: give a margin above 0"),
    ("trainer.accelerator=foo", "trainer: ValueError: You selected an invalid accelerator name"),
    ("trainer.devices=0", "trainer: MisconfigurationException"),
    ("trainer.precision=foo", "trainer: ValueError: Precision 'foo' is invalid"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps must be at least 1"),
    ("callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint keeps the best val/acc"),
    ("callbacks.lr_monitor.logging_interval=foo", "callbacks.lr_monitor: MisconfigurationException"),
    ("callbacks.test_figures.samples=0", "callbacks.test_figures.samples must be from 1 to 1024"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_of_any_option_gets_one_line(overrides, message, synthetic_dir, make_cfg, tmp_path):
    cfg = make_cfg(*smoke_overrides(synthetic_dir, "model=softmax", "callbacks.model_summary=null"), *overrides.split())
    with pytest.raises(InputError) as refused:
        run(cfg, tmp_path / "run")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # found before training
