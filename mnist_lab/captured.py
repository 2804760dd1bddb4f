"""The captured training step (`compile=true`): `steps_per_replay` training steps (the batches
gathered from the data set on the device, forward, loss, backward, optimizer update) recorded
once as a CUDA graph, then replayed: the host launches one graph where eager PyTorch launches
hundreds of kernels, and Lightning's loop runs once per replay. On a CPU there is no graph: the
same steps run as written, still `steps_per_replay` of them per turn of Lightning's loop.

Static shapes: every replay trains on full batches (the data module drops the partial last
one). The learning rate is a tensor on the device that the scheduler fills in place, once per
replay; the optimizer is PyTorch's fused one, which reads it there.
"""

import gc
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from mnist_lab.errors import InputError, is_whole

WARMUP_STEPS = 3  # on a side stream before capture: cuBLAS/cuDNN handles, the optimizer's state
# What the captured step trains with: each has a fused implementation that reads its learning rate
# from a tensor on the device, and is capturable in a CUDA graph.
CAPTURED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def check_capture(cfg: DictConfig) -> None:
    """Refuse, before any work, what a captured step cannot do, with the way out."""
    steps = cfg.get("steps_per_replay", 1)
    if not cfg.get("compile"):
        if steps != 1:
            raise InputError(
                f"steps_per_replay={steps} applies to the captured step only: add compile=true, or drop it"
            )
        return
    if not is_whole(steps) or steps < 1:
        raise InputError(f"steps_per_replay must be a positive integer, got {steps!r}: pass e.g. steps_per_replay=4")
    optimizer = cfg.optimizer._target_
    if get_class(optimizer) not in CAPTURED_OPTIMIZERS:
        raise InputError(
            f"compile=true trains with PyTorch's fused SGD, Adam or AdamW, which read the learning rate on the "
            f"device and run inside a graph; {optimizer} is none of them: use optimizer=sgd, adam or adamw, "
            "or drop compile=true"
        )
    if get_class(optimizer) is torch.optim.SGD and cfg.optimizer.get("momentum") and cfg.optimizer.get("dampening"):
        # SGD leaves its first update undamped; the graph's first replay finds a momentum buffer
        # (made by the warm-up, zeroed) and damps it: it would not be the run's first step.
        raise InputError(
            f"compile=true does not support optimizer.dampening={cfg.optimizer.dampening} with momentum yet: "
            "pass optimizer.dampening=0, or drop compile=true"
        )
    trainer = cfg.trainer
    refusals = {
        "data.augment": (bool(cfg.data.get("augment")), "pass augment=none"),
        f"trainer.strategy={trainer.get('strategy')}": (
            "ddp" in str(trainer.get("strategy", "")),
            "train on one device",
        ),
        f"trainer.devices={trainer.get('devices')}": (
            trainer.get("devices", 1) not in (1, "1", [0]),
            "pass trainer.devices=1",
        ),
        f"trainer.precision={trainer.get('precision')}": (
            str(trainer.get("precision", "32-true")) not in ("32", "32-true"),
            "pass trainer.precision=32-true",
        ),
        "trainer.accumulate_grad_batches": (trainer.get("accumulate_grad_batches", 1) != 1, "drop it"),
        "trainer.gradient_clip_val": (bool(trainer.get("gradient_clip_val")), "drop it"),
        "scheduler.cycle_momentum=true": (
            bool(cfg.scheduler.get("cycle_momentum")),
            "pass scheduler.cycle_momentum=false (the graph holds the momentum fixed)",
        ),
    }
    for setting, (refused, fix) in refusals.items():
        if refused:
            raise InputError(f"compile=true does not support {setting} yet: {fix}, or drop compile=true")


class CapturedSteps:
    """Trains `model` on `steps` batches per call, from index tensors into the data set on the device.

    `data` returns the training set's (images, labels) tensors on the device once the data
    module is set up; `normalize` turns raw uint8 images into the model's input. The model's
    `train_counts` buffer counts (correct, seen) inside the graph.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        normalize: Callable[[torch.Tensor], torch.Tensor],
        steps: int,
    ) -> None:
        self.model, self.data, self.normalize, self.steps = model, data, normalize, steps
        self.indices: torch.Tensor | None = None  # (steps, batch): the graph's input, copied in before each replay
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = (
            None  # the last step's loss; a graph's output is overwritten by the next replay
        )
        self._kept: list[torch.Tensor] = []  # memory the graph writes to, which Lightning would let go (gradients)
        self.capture_time = 0.0  # seconds of warm-up and capture (on a GPU), which are not training

    def optimizer_options(self, target: str, lr: float, device: torch.device) -> dict[str, Any]:
        """The fused optimizer, its learning rate a tensor on the device (capturable where it asks for it)."""
        return {"lr": torch.tensor(float(lr), device=device), **graph_flags(get_class(target), device)}

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """Train on the (steps, batch) `indices`; return the last step's loss."""
        if self.indices is None:
            self._prepare(indices, self.model.trainer.optimizers[0])  # PyTorch's, not Lightning's wrapper
        for group, lr in zip(self._optimizer.param_groups, self._lrs, strict=True):
            if group["lr"] is not lr:  # a scheduler that assigns a float rather than filling the tensor
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        self.indices.copy_(indices)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.loss = self._steps()
        return self.loss

    def _steps(self) -> torch.Tensor:
        """What the graph holds: `steps` full training steps on the batches `self.indices` names."""
        model, optimizer = self.model, self._optimizer
        images, labels = self.data()
        for indices in self.indices:  # (batch,) each
            x, y = self.normalize(images.index_select(0, indices)), labels.index_select(0, indices)
            optimizer.zero_grad(set_to_none=False)  # zeroed in place: the graph keeps the gradients' memory
            logits = model(x)
            loss = model.criterion(logits, y)
            loss.backward()
            optimizer.step()
            model.train_counts.add_(torch.stack([(logits.argmax(1) == y).sum(), self._batch_size]))
        return loss.detach()

    def _prepare(self, indices: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Set up on the first call, after Lightning has restored any checkpoint; capture on a GPU."""
        device = indices.device
        self._optimizer = optimizer
        flags = graph_flags(type(optimizer), device)
        for group in self._optimizer.param_groups:
            # A resumed run's checkpoint brings its learning rate back as a float or a CPU tensor, and
            # its flags: an eager run's (fused and capturable off) where it was trained without a graph.
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
            group.update(flags)
            for param in group["params"]:
                state = self._optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):  # fused and capturable ones count steps on the device
                    state["step"] = state["step"].to(param.device, torch.float32)
        self._lrs = [group["lr"] for group in self._optimizer.param_groups]  # the tensors the graph reads
        self.indices = torch.empty_like(indices)
        self._batch_size = torch.tensor(indices.shape[1], device=device)
        if device.type == "cuda":
            self._capture(indices)

    def _capture(self, indices: torch.Tensor) -> None:
        """Record `_steps` as a CUDA graph: PyTorch's whole-network capture, warm-up steps on a side
        stream first (which train for real, so they are undone: the first replay is the run's
        first step), then the capture, which records without running."""
        self.indices.copy_(indices)
        device = indices.device
        started = time.perf_counter()
        with collector_held():
            with self.undone():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        self._steps()
                torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._steps()
        torch.cuda.synchronize(device)
        self.capture_time += time.perf_counter() - started
        # Held from now on (not before: autograd adds into a gradient in place only while nothing
        # else holds it): the replays write here after Lightning has set every .grad to None.
        self._kept = [p.grad for p in self.model.parameters() if p.grad is not None]

    def release(self) -> None:
        """Free the graph and the memory it writes to, and let go of the model, the data and the
        optimizer, which hold this object in turn: no cycle is left for Python's collector to
        break later, perhaps while another run in this process captures its graph. Once a fit has
        ended (or failed), it trains no more."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.indices, self.loss, self._kept = None, None, None, []
        self.model = self.data = self.normalize = self._optimizer = self._lrs = None

    @contextmanager
    def undone(self) -> Iterator[None]:
        """Whatever training steps run inside leave no trace: parameters, buffers, the optimizer's
        state and the random generators are put back, and optimizer state they created is zeroed
        (what a fresh optimizer's first step starts from: SGD's momentum, Adam's moments and step)."""
        state = self._state()
        saved = [t.clone() for t in state]
        cuda = [torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else []
        cpu = torch.get_rng_state()
        yield
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        for tensor in self._state()[len(state) :]:
            tensor.zero_()
        torch.set_rng_state(cpu)
        for states in cuda:
            torch.cuda.set_rng_state_all(states)

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a training step changes: parameters, buffers, then the optimizer's state."""
        optimizer_state = [v for s in self._optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [*(p.detach() for p in self.model.parameters()), *self.model.buffers(), *optimizer_state]


def graph_flags(optimizer: type, device: torch.device) -> dict[str, bool]:
    """The options that make one of CAPTURED_OPTIMIZERS run in a graph on `device`: fused, and on
    a GPU capturable where it has the option (Adam and AdamW, which count their steps there)."""
    capturable = device.type == "cuda" and "capturable" in inspect.signature(optimizer).parameters
    return {"fused": True, **({"capturable": True} if capturable else {})}


@contextmanager
def collector_held() -> Iterator[None]:
    """Python's garbage collector collects just before, then not at all inside. A capture must not
    see it run: it could destroy an earlier run's graph, kept alive by a reference cycle, and
    destroying a graph while a stream captures fails the capture ("operation not permitted when
    stream is capturing"). Since torch 2.9, torch.cuda.graph no longer collects on entry itself."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
