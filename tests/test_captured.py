"""compile=true, the captured training step (issue: framework cost). There is no GPU here: its
steps run without a graph on the CPU, through the same code; what only the capture adds (warm-up
steps that must leave no trace) is checked on its own."""

import copy
import gc
import json
import weakref
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lab.captured import CapturedSteps, check_capture
from mnist_lab.data import BatchIndices, normalize
from mnist_lab.errors import InputError
from mnist_lab.models import LeNet
from mnist_lab.recipe import run
from tests.conftest import compose_train, smoke_overrides

# 200 training images (300, less 100 for validation): 6 full batches of 32 and a partial one of 8.
FULL_BATCHES = 6


def test_batch_groups_hold_full_batches_only():
    generator = torch.Generator().manual_seed(0)
    groups = BatchIndices(200, 32, generator, even=True, group=2)
    items = list(groups)
    assert len(groups) == len(items) == FULL_BATCHES // 2
    assert all(item.shape == (2, 32) for item in items)
    assert len(torch.cat([item.flatten() for item in items]).unique()) == FULL_BATCHES * 32  # no image twice
    assert len(BatchIndices(200, 32, generator, even=True, group=4)) == 1  # the partial group is dropped too
    resumed = BatchIndices(200, 32, torch.Generator().manual_seed(0), even=True, group=2, skip=1)
    assert [item.tolist() for item in resumed] == [item.tolist() for item in items[1:]]  # skip counts groups


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["compile=true", "optimizer=rmsprop"], "fused SGD, Adam or AdamW"),
        # Adagrad has a `fused` option, but its fused step refuses CUDA tensors
        (["compile=true", "optimizer=rmsprop", "optimizer._target_=torch.optim.Adagrad"], "fused SGD, Adam or AdamW"),
        (["compile=true", "+optimizer.dampening=0.5"], "optimizer.dampening=0.5 with momentum"),
        (["compile=true", "augment=affine"], "data.augment"),
        (["compile=true", "model=cnn"], "data.augment"),  # the CNN picks augment=affine
        (["compile=true", "trainer=ddp_cpu"], "trainer.strategy=ddp"),
        (["compile=true", "trainer.precision=16-mixed"], "trainer.precision=16-mixed"),
        (["compile=true", "+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val"),
        (["compile=true", "scheduler.cycle_momentum=true"], "cycle_momentum"),
        (["compile=true", "steps_per_replay=0"], "steps_per_replay must be a positive integer"),
        (["steps_per_replay=4"], "applies to the captured step only"),
    ],
)
def test_what_a_captured_step_cannot_do_is_refused_up_front(overrides, refused, make_cfg):
    with pytest.raises(InputError, match=refused):
        check_capture(make_cfg(*overrides))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adamw +optimizer.amsgrad=true"])
def test_warm_up_steps_leave_no_trace(optimizer):
    """Before capture, a GPU runs real training steps to warm up; `undone` puts everything back,
    so that the first replay is the run's first step: the same update as a fresh optimizer's."""
    cfg = compose_train(*f"optimizer={optimizer}".split())
    torch.manual_seed(0)
    model = LeNet(optimizer=dict(cfg.optimizer))
    fresh = copy.deepcopy(model)
    images, labels = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (256,))
    indices = torch.arange(64).view(2, 32)

    def prepared(net: LeNet) -> CapturedSteps:
        steps = CapturedSteps(net, lambda: (images, labels), lambda x: normalize(x, 0.1307, 0.3081), steps=2)
        options = steps.optimizer_options(cfg.optimizer._target_, cfg.optimizer.lr, torch.device("cpu"))
        steps._prepare(indices, instantiate(cfg.optimizer, params=net.parameters(), **options))
        steps.indices.copy_(indices)
        return steps

    warmed, reference = prepared(model), prepared(fresh)
    before = [t.clone() for t in warmed._state()]
    with warmed.undone():
        for _ in range(3):
            warmed._steps()
    # parameters and buffers as they were (the optimizer's state, which the steps made, follows them)
    assert all(torch.equal(a, b) for a, b in zip(before, warmed._state(), strict=False))
    optimizer_state = [v for s in warmed._optimizer.state.values() for v in s.values()]
    assert optimizer_state and all(torch.count_nonzero(v) == 0 for v in optimizer_state)
    warmed._steps()
    reference._steps()  # a fresh optimizer's first steps
    for ours, theirs in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def captured_overrides(data_dir: Path, *extra: str) -> list[str]:
    """The smoke configuration, every batch of each epoch, and every epoch's checkpoint kept."""
    return smoke_overrides(data_dir, "~trainer.limit_train_batches", "+callbacks.checkpoint.save_top_k=-1", *extra)


@pytest.fixture(scope="module")
def eager_and_captured(synthetic_dir, tmp_path_factory):
    """LeNet-5 with batches that fill the 200 training images exactly (5 of 40), run eagerly and
    with compile=true, one step per replay."""
    runs = {}
    for name, extra in (("eager", []), ("captured", ["compile=true"])):
        out_dir = tmp_path_factory.mktemp(name)
        runs[name] = (
            out_dir,
            run(compose_train(*captured_overrides(synthetic_dir, "data.batch_size=40", *extra)), out_dir),
        )
    return runs


def events(out_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(out_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def scalar_tags(out_dir: Path) -> set[str]:
    return set(events(out_dir).Tags()["scalars"])


def scalars(out_dir: Path, tag: str) -> list[float]:
    return [event.value for event in events(out_dir).Scalars(tag)]


def test_the_switch_on_and_off_gives_the_same_metrics_and_tags(eager_and_captured):
    (eager_dir, eager), (captured_dir, captured) = eager_and_captured["eager"], eager_and_captured["captured"]
    assert captured.keys() == eager.keys() | {"capture_time_s"}
    assert captured["capture_time_s"] == 0.0  # no graph on a CPU: nothing captured
    assert scalar_tags(captured_dir) == scalar_tags(eager_dir)
    assert json.loads((captured_dir / "metrics.json").read_text()) == captured
    # The same steps on the same batches, PyTorch's fused SGD in place of its foreach one.
    assert captured["test/loss"] == pytest.approx(eager["test/loss"], rel=1e-4)
    assert captured["test/acc"] == pytest.approx(eager["test/acc"], abs=0.011)  # one of 100 test images at most
    assert scalars(captured_dir, "train/acc") == pytest.approx(scalars(eager_dir, "train/acc"), abs=0.006)


def test_a_captured_run_resumes_from_its_checkpoint(eager_and_captured, synthetic_dir, tmp_path):
    captured_dir, _ = eager_and_captured["captured"]
    (first_epoch,) = (captured_dir / "checkpoints").glob("epoch00-*.ckpt")
    cfg = compose_train(*captured_overrides(synthetic_dir, "data.batch_size=40", "compile=true"))
    resumed = run(cfg, tmp_path, resume_from=first_epoch)
    assert resumed["resumed_from_step"] == 5
    # The second epoch trained again from the first one's checkpoint ends with the same weights.
    ours, theirs = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (tmp_path, captured_dir))
    assert ours["global_step"] == theirs["global_step"] == 10
    for name, weights in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], weights), name


@pytest.mark.parametrize("steps", [1, 4])
def test_a_captured_step_drops_the_partial_last_batch(steps, synthetic_dir, tmp_path):
    metrics = run(
        compose_train(*captured_overrides(synthetic_dir, "model=softmax", "compile=true", f"steps_per_replay={steps}")),
        tmp_path,
    )
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # Each step a replay of `steps` full batches: 6 batches of 32 of the 200 images, in whole replays.
    assert last["global_step"] == 2 * (FULL_BATCHES // steps)
    assert metrics["status"] == "ok" and len(metrics["epoch_train_time_s"]) == 2


def test_the_fast_recipe_composes_and_passes_the_checks():
    cfg = compose_train("experiment=fast")
    assert cfg.compile is True and cfg.steps_per_replay == 8 and cfg.model._target_ == "mnist_lab.models.LeNet"
    assert not cfg.data.augment and cfg.data.batch_size == 128
    check_capture(cfg)


def test_a_training_set_smaller_than_one_replay_is_refused(synthetic_dir, tmp_path):
    with pytest.raises(InputError, match="steps_per_replay=8 full batches of 32, 256 images, but there are 200"):
        run(compose_train(*captured_overrides(synthetic_dir, "compile=true", "steps_per_replay=8")), tmp_path)


def captured_lenet(optimizer: str = "sgd") -> tuple[LeNet, CapturedSteps, torch.Tensor]:
    """LeNet-5 with a captured step attached as mnist_lab.recipe.build attaches it, and prepared
    with its optimizer as on the first training step; two batches of 16 indices."""
    cfg = compose_train(f"optimizer={optimizer}")
    model = LeNet(optimizer=dict(cfg.optimizer))
    images, labels = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (64,))
    steps = CapturedSteps(model, lambda: (images, labels), lambda x: normalize(x, 0.1307, 0.3081), steps=2)
    model.captured = steps
    indices = torch.arange(32).view(2, 16)
    options = steps.optimizer_options(cfg.optimizer._target_, cfg.optimizer.lr, torch.device("cpu"))
    steps._prepare(indices, instantiate(cfg.optimizer, params=model.parameters(), **options))
    return model, steps, indices


def test_warm_up_and_capture_run_with_the_collector_held_and_release_frees_the_graph(monkeypatch):
    """_capture on the CPU, PyTorch's CUDA calls stood in for: Python's collector runs just before
    the warm-up, not during it nor during the capture, and runs again afterwards."""
    seen = []

    class Graph:
        def reset(self) -> None:
            seen.append("graph freed")

    @contextmanager
    def noting(what: str):
        seen.append((what, gc.isenabled()))
        yield

    side = SimpleNamespace(wait_stream=lambda other: None)
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: seen.append("collected") or collect(*a))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: noting("warm-up"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: noting("capture"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model, steps, indices = captured_lenet()
    steps._capture(indices)
    assert seen == ["collected", ("warm-up", False), ("capture", False)] and gc.isenabled()
    assert steps.capture_time > 0 and isinstance(steps.graph, Graph)
    steps.release()
    assert seen[-1] == "graph freed" and steps.graph is None


def test_a_released_captured_step_leaves_no_reference_cycle():
    """Freed as soon as the last reference goes, with no collector: nothing is left for it to find
    later, during another run's capture."""
    model, steps, indices = captured_lenet()
    steps(indices)  # trains, as the first training step does
    steps.release()
    gone = weakref.ref(model), weakref.ref(steps)
    gc.collect()
    gc.disable()
    try:
        del model, steps
        assert [ref() for ref in gone] == [None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_eager_checkpoints_optimizer_state_is_made_fit_for_the_graph(optimizer):
    """A run resumed with compile=true from an eager run's checkpoint: load_state_dict brings back
    the eager optimizer's flags (fused off), which the captured step sets again."""
    eager_model, _, _ = captured_lenet(optimizer)
    eager = type(eager_model.captured._optimizer)(eager_model.parameters(), lr=0.01)
    eager_model(torch.randn(4, 1, 28, 28)).sum().backward()
    eager.step()
    model, steps, indices = captured_lenet(optimizer)
    optimizer_ = steps._optimizer
    optimizer_.load_state_dict(eager.state_dict())
    assert not optimizer_.param_groups[0]["fused"]
    steps.indices = None  # prepared again, as on the first step after a resume
    steps._prepare(indices, optimizer_)
    assert all(group["fused"] for group in optimizer_.param_groups)
    assert all(torch.is_tensor(group["lr"]) for group in optimizer_.param_groups)
    steps(indices)  # the fused step runs on that state
