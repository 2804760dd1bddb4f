"""The loss config group: each loss trains, is logged, sweeps, and a checkpoint may only name ours."""

import json

import pytest
import torch
import torch.nn.functional as F

from mnist_lab.errors import InputError
from tests.conftest import run_train, smoke_overrides

LOSSES = {
    "cross_entropy": "CrossEntropyLoss",
    "nll": "LogSoftmaxNLL",
    "label_smoothing": "LabelSmoothing",
    "multi_margin": "MultiMarginLoss",
}


def test_each_loss_is_the_function_it_names(make_cfg):
    from hydra.utils import instantiate

    logits, labels = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    built = {name: instantiate(make_cfg(f"loss={name}").loss) for name in LOSSES}
    assert built["cross_entropy"](logits, labels) == pytest.approx(F.cross_entropy(logits, labels).item())
    assert built["nll"](logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    smooth = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert built["label_smoothing"](logits, labels).item() == pytest.approx(smooth.item())
    assert built["multi_margin"](logits, labels).item() == pytest.approx(F.multi_margin_loss(logits, labels).item())


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, "x", True])
def test_a_bad_smoothing_is_refused_before_training(smoothing):
    from mnist_lab.losses import LabelSmoothing

    with pytest.raises(InputError, match="loss.smoothing must be in"):
        LabelSmoothing(smoothing)


@pytest.mark.slow
def test_a_sweep_over_losses_trains_each_and_logs_it(synthetic_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        f"loss={','.join(LOSSES)}",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for job, (name, cls) in enumerate(LOSSES.items()):
        folder = sweep / str(job)
        assert json.loads((folder / "metrics.json").read_text())["status"] == "ok"
        (run_dir,) = {events.parent for events in folder.rglob("events.out.tfevents.*")}
        accumulator = EventAccumulator(str(run_dir))
        accumulator.Reload()
        content = accumulator.PluginTagToContent("hparams")
        session = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        ).session_start_info
        assert session.hparams["loss"].string_value == cls, name
        assert run_dir.name == f"loss={name}"  # the TensorBoard run is named by the swept value


def test_a_checkpoint_naming_a_loss_of_its_own_is_refused(small_checkpoint, tmp_path):
    from mnist_lab.checkpoint import load_checkpoint

    checkpoint = torch.load(small_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["loss"] = {"_target_": "os.system", "command": "touch /tmp/owned"}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    with pytest.raises(InputError, match="names os.system in its hyperparameters"):
        load_checkpoint(crafted)
