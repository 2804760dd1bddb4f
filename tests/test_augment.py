import pytest
import torch

from mnist_lab.augment import RandomAffine, affine
from mnist_lab.errors import InputError
from tests.conftest import smoke_overrides


def dot(row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, row, col] = 255.0
    return image


def peak(image: torch.Tensor) -> tuple[int, int]:
    index = int(image[0, 0].argmax())
    return divmod(index, 28)


def test_identity_changes_nothing():
    images = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(affine(images), images)


def test_shift_moves_right_and_down_by_whole_pixels():
    assert peak(affine(dot(10, 10), translate=(2.0, 4.0))) == (14, 12)


def test_rotation_by_90_degrees_turns_counter_clockwise():
    # a point right of the centre ends up above it
    assert peak(affine(dot(13, 20), angle=90.0)) == (7, 13)


def test_scale_about_the_centre():
    # a point 6 px right of the centre (13.5, 13.5) of a 28 x 28 image, scaled by 1.5: 9 px right
    out = affine(dot(13, 20), scale=1.5)
    row, col = peak(out)
    assert row in (13, 14) and col in (22, 23)


def test_random_affine_is_seeded_and_per_image():
    images = torch.rand(8, 1, 28, 28).expand(8, 1, 28, 28).clone()
    images[:] = images[0]  # eight copies of one image
    first, again = RandomAffine(seed=3)(images), RandomAffine(seed=3)(images)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, RandomAffine(seed=4)(images))
    assert len({tuple(x.flatten()[:50].tolist()) for x in first}) == 8  # each copy moved differently
    # the generator carries on: the next batch is distorted differently
    augment = RandomAffine(seed=3)
    assert not torch.allclose(augment(images), augment(images))


def test_bad_ranges_are_refused():
    with pytest.raises(InputError, match="augment needs degrees >= 0"):
        RandomAffine(scale=(1.2, 0.8))


def test_augmentation_touches_training_batches_only(synthetic_dir, make_cfg):
    from hydra.utils import instantiate

    cfg = make_cfg(*smoke_overrides(synthetic_dir, "augment=affine"))
    dm = instantiate(cfg.data, _recursive_=False, _convert_="all")
    assert isinstance(dm.augment, RandomAffine) and dm.hparams.augment["degrees"] == 15
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))

    class Trainer:
        training = False

    dm.trainer = Trainer()
    plain = dm.on_after_batch_transfer([t.clone() for t in batch], 0)[0]
    torch.testing.assert_close(plain, (batch[0].float() / 255 - 0.1307) / 0.3081)  # validation: untouched
    Trainer.training = True
    moved = dm.on_after_batch_transfer([t.clone() for t in batch], 0)[0]
    assert not torch.allclose(moved, plain)
    background = -0.1307 / 0.3081  # uncovered pixels are black, as in MNIST
    assert torch.isclose(moved.amin(), torch.tensor(background), atol=1e-4)
    none = instantiate(make_cfg(*smoke_overrides(synthetic_dir)).data, _recursive_=False, _convert_="all")
    assert none.augment is None
