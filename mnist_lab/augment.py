"""Geometric transforms of whole image batches on their device: random affine augmentation for
training (augment=affine) and the fixed distortions of the robustness report."""

import math
import warnings

import torch
import torch.nn.functional as F

from mnist_lab.errors import InputError


def affine(
    images: torch.Tensor,
    angle: torch.Tensor | float = 0.0,
    translate: tuple | torch.Tensor = (0.0, 0.0),
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Rotate (degrees, counter-clockwise), scale about the centre, then shift (pixels, right and
    down) each image of an (N, C, H, W) float batch; uncovered pixels become 0, the background of
    raw MNIST. Scalars apply to every image, (N,) tensors one value per image."""
    n, _, height, width = images.shape
    angle = torch.as_tensor(angle, dtype=images.dtype, device=images.device).expand(n) * (math.pi / 180)
    scale = torch.as_tensor(scale, dtype=images.dtype, device=images.device).expand(n)
    shift = torch.as_tensor(translate, dtype=images.dtype, device=images.device).expand(n, 2)
    # affine_grid maps output coordinates (in [-1, 1]) to input ones: the inverse transform.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    dx, dy = shift[:, 0] * 2 / width, shift[:, 1] * 2 / height
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -(cos * dx - sin * dy)], 1),
            torch.stack([sin, cos, -(sin * dx + cos * dy)], 1),
        ],
        1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomAffine:
    """Per-image random rotation, shift and scale of a training batch, drawn from its own seeded
    generator so that augmentation neither depends on nor disturbs the other random streams."""

    def __init__(
        self, degrees: float = 15.0, translate: float = 3.0, scale: tuple[float, float] = (0.9, 1.1), seed: int = 0
    ) -> None:
        if degrees < 0 or translate < 0 or not 0 < scale[0] <= scale[1]:
            raise InputError(
                f"augment needs degrees >= 0, translate >= 0 and 0 < scale[0] <= scale[1], got "
                f"degrees={degrees}, translate={translate}, scale={list(scale)}: pass e.g. "
                "data.augment.degrees=15 data.augment.translate=3 data.augment.scale=[0.9,1.1]"
            )
        self.degrees, self.translate, self.scale, self.seed = degrees, translate, tuple(scale), seed
        self.generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None  # from a checkpoint, until the generator exists

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's state, so that a resumed run draws what the uninterrupted one would."""
        state = self.generator.get_state() if self.generator is not None else self._pending_state
        return {} if state is None else {"generator": state}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._pending_state = state.get("generator")
        self.generator = None  # rebuilt at the next batch, from this state

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images, 0 = background -> the same, each moved at random."""
        if self.generator is None or self.generator.device != images.device:
            self.generator = torch.Generator(images.device).manual_seed(self.seed)
            if self._pending_state is not None:
                try:
                    self.generator.set_state(self._pending_state)
                except RuntimeError:  # saved on another kind of device (a CUDA state on CPU): reseeded
                    warnings.warn(
                        "the augmentation generator's saved state is for another device: it starts again from its seed",
                        stacklevel=2,
                    )
                self._pending_state = None
        n = len(images)
        uniform = torch.rand(n, 4, generator=self.generator, device=images.device, dtype=images.dtype)
        angle = (uniform[:, 0] * 2 - 1) * self.degrees
        shift = (uniform[:, 1:3] * 2 - 1) * self.translate
        low, high = self.scale
        scale = low + uniform[:, 3] * (high - low)
        return affine(images, angle, shift, scale)
