import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from mnist_lab.data import MNISTDataModule, decode
from mnist_lab.errors import InputError
from tests.conftest import N_TEST, N_TRAIN


def datamodule(data_dir, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(
        data_dir=str(data_dir), download=False, val_size=100, batch_size=32, verify_checksums=False, **kwargs
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def ids(images: torch.Tensor) -> list[int]:
    """The index each synthetic image carries in its first two pixels."""
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def test_splits_have_the_right_sizes_and_are_disjoint(synthetic_dir):
    dm = datamodule(synthetic_dir)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (N_TRAIN - 100, 100, N_TEST)
    train, val = set(ids(dm.train_set.images)), set(ids(dm.val_set.images))
    assert not train & val
    assert train | val == set(range(N_TRAIN))
    assert ids(dm.test_set.images) == list(range(N_TEST))  # the official test file, in order


def test_split_depends_on_split_seed_only(synthetic_dir):
    a, b = datamodule(synthetic_dir, seed=1), datamodule(synthetic_dir, seed=2)
    assert ids(a.val_set.images) == ids(b.val_set.images)
    c = datamodule(synthetic_dir, split_seed=2)
    assert ids(a.val_set.images) != ids(c.val_set.images)


def epoch_order(dm: MNISTDataModule) -> list[int]:
    return [i for images, _ in dm.train_dataloader() for i in ids(images)]


def test_shuffling_is_seeded_and_changes_between_epochs(synthetic_dir):
    a, b = datamodule(synthetic_dir, seed=1), datamodule(synthetic_dir, seed=1)
    first = epoch_order(a)
    assert first == epoch_order(b)
    assert sorted(first) == sorted(ids(a.train_set.images))  # every training image once per epoch
    assert epoch_order(a) != first  # a new order for the next epoch
    assert epoch_order(datamodule(synthetic_dir, seed=2)) != first


def test_batches_have_the_configured_sizes(synthetic_dir):
    dm = datamodule(synthetic_dir)
    sizes = [len(labels) for _, labels in dm.train_dataloader()]
    assert sizes == [32] * 6 + [N_TRAIN - 100 - 32 * 6]
    assert [len(labels) for _, labels in dm.test_dataloader()] == [N_TEST]  # eval_batch_size 500


def test_normalization_on_transfer(synthetic_dir):
    dm = datamodule(synthetic_dir)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    x, y = dm.on_after_batch_transfer([images, labels], 0)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, (images.float() / 255 - 0.1307) / 0.3081)
    assert torch.equal(y, labels)


def test_fashion_mnist_reads_its_own_folder_and_statistics(synthetic_dir, make_cfg):
    from hydra.utils import instantiate

    cfg = make_cfg(
        "data=fashion_mnist",
        f"data.data_dir={synthetic_dir}",
        "data.download=false",
        "data.val_size=100",
        "data.verify_checksums=false",
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.raw_dir == synthetic_dir / "FashionMNIST" / "raw"
    assert (dm.hparams.mean, dm.hparams.std) == (0.2860, 0.3530)


def test_missing_files_name_the_folder_and_both_fixes(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(InputError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.download=true" in message and "MNIST_LAB_DATA" in message and "data.data_dir" in message


def test_failed_download_names_both_fixes(tmp_path, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(InputError, match="downloading it failed.*network unreachable.*MNIST_LAB_DATA"):
        dm.prepare_data()


def test_missing_files_are_downloaded_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    from tests.conftest import make_dataset

    calls = []

    def download(self):  # stands in for the network: writes the files where torchvision would
        calls.append(self.raw_folder)
        make_dataset(tmp_path)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", download)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True, val_size=100, verify_checksums=False)
    dm.prepare_data()
    dm.setup("fit")
    assert calls and calls[0] == str(tmp_path / "MNIST" / "raw")
    assert len(dm.train_set) == N_TRAIN - 100


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_worker_processes_give_the_same_batches(synthetic_dir):
    in_process = [labels for _, labels in datamodule(synthetic_dir).train_dataloader()]
    workers = datamodule(synthetic_dir, num_workers=1, pin_memory=True).train_dataloader()
    for expected, (_, labels) in zip(in_process, workers, strict=True):
        assert torch.equal(expected, labels)


def test_truncated_file_is_named(fresh_data_dir):
    path = fresh_data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=f"{path}.*truncated or corrupt"):
        datamodule(fresh_data_dir)


def test_wrong_magic_number_is_named(fresh_data_dir):
    path = fresh_data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack(">i", 0x0803)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{path} is not an IDX label file"):
        datamodule(fresh_data_dir)


def test_image_and_label_counts_must_agree(fresh_data_dir):
    path = fresh_data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">2i", 0x0801, N_TRAIN - 1) + bytes(N_TRAIN - 1))
    with pytest.raises(InputError, match="images but .* labels"):
        datamodule(fresh_data_dir)


def test_labels_out_of_range_are_refused(fresh_data_dir):
    path = fresh_data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">2i", 0x0801, N_TRAIN) + bytes([42]) * N_TRAIN)
    with pytest.raises(InputError, match="labels outside 0-9"):
        datamodule(fresh_data_dir)


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size", "val_size"])
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_must_be_positive(key, value):
    with pytest.raises(InputError, match=f"data.{key} must be a positive integer"):
        MNISTDataModule(**{key: value})


def test_val_size_must_leave_training_images(synthetic_dir):
    with pytest.raises(InputError, match=f"data.val_size={N_TRAIN} leaves no training images"):
        MNISTDataModule(data_dir=str(synthetic_dir), download=False, val_size=N_TRAIN, verify_checksums=False).setup(
            "fit"
        )


def test_unknown_dataset_is_refused():
    with pytest.raises(InputError, match="MNIST, FashionMNIST or KMNIST"):
        MNISTDataModule(dataset="CIFAR10")


@pytest.mark.parametrize("data", ["mnist", "fashion_mnist"])
def test_real_data_has_the_official_sizes_and_configured_statistics(data, real_data_dir, make_cfg):
    from hydra.utils import instantiate

    dm = instantiate(make_cfg(f"data={data}", f"data.data_dir={real_data_dir}", "data.download=false").data)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    x, _ = dm.on_after_batch_transfer([dm.train_set.images, dm.train_set.labels], 0)
    # Normalized with the config's mean and std, the training images have about mean 0 and std 1.
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


@pytest.fixture
def real_copy(real_data_dir, tmp_path) -> Path:
    """The real MNIST in a folder of one's own: links to the image files, copies of the labels."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (real_data_dir / "MNIST" / "raw").iterdir():
        if "labels" in source.name:
            (raw / source.name).write_bytes(source.read_bytes())
        else:
            (raw / source.name).symlink_to(source)
    return tmp_path


@pytest.mark.parametrize("dataset", ["MNIST", "FashionMNIST"])
def test_official_files_pass_their_checksums(dataset, real_data_dir):
    dm = MNISTDataModule(data_dir=str(real_data_dir), dataset=dataset, download=False)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) + len(dm.val_set) == 60_000 and len(dm.test_set) == 10_000


def test_a_changed_file_fails_its_checksum_and_the_override_accepts_it(real_copy):
    labels = real_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one label changed: still a valid IDX file
    labels.write_bytes(bytes(data))
    dm = MNISTDataModule(data_dir=str(real_copy), download=False)
    with pytest.raises(
        InputError,
        match=rf"{labels} is not the official MNIST file \(MD5 \w+, expected "
        r"27ae3e4e09519cfbb04c329615203637\).*data.verify_checksums=false",
    ):
        dm.setup("test")
    own = MNISTDataModule(data_dir=str(real_copy), download=False, verify_checksums=False)
    own.setup("test")
    assert own.test_set.labels[-1] == data[-1]


def damage(raw: Path, fault: str) -> str:
    """Spoil one test-split file of a data folder the way `fault` says; the error it must cause."""
    if fault == "magic":
        path = raw / "t10k-images-idx3-ubyte"
        path.write_bytes(struct.pack(">i", 0x0801) + path.read_bytes()[4:])
        return "t10k-images-idx3-ubyte is not an IDX image file"
    path = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    if fault == "label":
        data[-1] = 200
        path.write_bytes(bytes(data))
        return "t10k-labels-idx1-ubyte holds labels outside 0-9"
    data[-1] = (data[-1] + 1) % 10  # still a valid IDX file, but not the official one
    path.write_bytes(bytes(data))
    return "t10k-labels-idx1-ubyte is not the official MNIST file"


@pytest.mark.parametrize("fault", ["magic", "label", "checksum"])
def test_a_bad_test_file_is_found_before_the_first_step(fault, fresh_data_dir, request, make_cfg, tmp_path):
    from mnist_lab.recipe import run
    from tests.conftest import smoke_overrides

    data_dir = request.getfixturevalue("real_copy") if fault == "checksum" else fresh_data_dir
    message = damage(data_dir / "MNIST" / "raw", fault)
    overrides = smoke_overrides(data_dir, "model=softmax")
    if fault == "checksum":
        overrides.remove("data.verify_checksums=false")
    with pytest.raises(InputError, match=message):
        run(make_cfg(*overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # not one epoch trained


def test_an_unreadable_file_is_not_a_reason_to_delete_the_data(fresh_data_dir):
    labels = fresh_data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.unlink()
    labels.mkdir()  # unreadable as a file, as a permission problem would be (tests may run as root)
    with pytest.raises(InputError, match="cannot read .* make it readable") as refused:
        datamodule(fresh_data_dir)
    assert "delete" not in str(refused.value)


@pytest.mark.parametrize(
    "key, value",
    [("std", 0.0), ("std", float("nan")), ("mean", float("inf")), ("std", "abc"), ("mean", 1e40), ("std", 1e-40)],
)
def test_a_normalization_that_would_look_like_divergence_is_refused(key, value, synthetic_dir):
    with pytest.raises(InputError, match=f"data.mean and data.std are of pixels scaled to 0-1: .*got .*{key}="):
        MNISTDataModule(data_dir=str(synthetic_dir), **{key: value})


def test_a_process_decodes_a_split_once_until_its_files_change(synthetic_dir, tmp_path):
    shutil.copytree(synthetic_dir, tmp_path / "data")
    decode.cache_clear()
    first = datamodule(tmp_path / "data")
    second = datamodule(tmp_path / "data")  # a notebook's next run: nothing read again
    assert (decode.cache_info().misses, decode.cache_info().hits) == (2, 2)
    assert torch.equal(first.test_set.images, second.test_set.images)
    labels = tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new copy of the file
    datamodule(tmp_path / "data")
    assert (decode.cache_info().misses, decode.cache_info().hits) == (3, 3)
