"""MNIST-family data: IDX file checks, a seeded validation hold-out and in-memory batches."""

import functools
import hashlib
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision.datasets
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from mnist_lab.compat import batches_done_in_epoch
from mnist_lab.defaults import MNIST_MEAN, MNIST_STD
from mnist_lab.errors import InputError, is_number, is_whole

# MD5 of the uncompressed IDX files of the official releases: torchvision checks only the
# downloaded archives, not files already on disk. The same values are in other projects that
# verify these files, and the copies here match them.
CHECKSUMS = {
    "MNIST": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime) hashed once per process

# torchvision's datasets in MNIST's IDX layout (train/t10k-images-idx3-ubyte, ...-labels-idx1-ubyte)
DATASETS = ("MNIST", "FashionMNIST", "KMNIST")
IMAGE_MAGIC = 0x0803  # IDX: unsigned bytes, 3 dimensions (N, 28, 28)
LABEL_MAGIC = 0x0801  # IDX: unsigned bytes, 1 dimension (N,)
MAX_WORKERS = 64  # data.num_workers


def _fix(folder: Path) -> str:
    return (
        f"download it again (delete {folder} and run with data.download=true), or point "
        "data.data_dir= or the MNIST_LAB_DATA environment variable at a folder holding a good copy"
    )


def dataset_name(name: str) -> str:
    """The torchvision class name of a dataset given by it or by its config name (conf/data):
    fashion_mnist -> FashionMNIST."""
    match = [n for n in DATASETS if n.lower() == name.replace("_", "").lower()]
    if not match:
        names = [re.sub(r"(?<=[a-z])(?=MNIST)", "_", n).lower() for n in DATASETS]  # FashionMNIST -> fashion_mnist
        raise InputError(f"unknown dataset {name!r}: use one of {', '.join(names)}")
    return match[0]


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Raw 0-255 images as the models see them: (x / 255 - mean) / std, as a new float tensor."""
    return (images.float() - 255 * mean) / (255 * std)


def verify_checksum(path: Path, dataset: str, expected: str) -> None:
    """Refuse a file whose MD5 is not the official one; each version of a file is hashed once per process."""
    key = _stamp(path)
    if key in _verified:
        return
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "md5").hexdigest()
    if digest != expected:
        raise InputError(
            f"{path} is not the official {dataset} file (MD5 {digest}, expected {expected}): it is damaged "
            "or another data set. Delete it to have it downloaded again, or, for IDX data of your own, "
            "pass data.verify_checksums=false"
        )
    _verified.add(key)


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)  # a data set's two splits, or two data sets'
def decode(
    dataset_cls: type, data_dir: str, train: bool, *stamps: tuple[str, int, int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N, 1, 28, 28) uint8 images, (N,) int64 labels and the class count of one split, decoded
    once per process while its files (`stamps`: path, size, mtime) stay the same: a notebook's
    second run reads nothing. Callers index or copy these tensors, never write into them."""
    ds = dataset_cls(data_dir, train=train, download=False)
    return ds.data.unsqueeze(1), ds.targets, len(ds.classes)


def check_idx(path: Path, magic: int) -> int:
    """Check an IDX file's magic number, dimensions and size against its header; return its count."""
    ndim = magic & 0xFF
    header_size = 4 * (1 + ndim)
    try:
        with open(path, "rb") as f:
            header = f.read(header_size)
        size = path.stat().st_size
    except OSError as e:  # permissions, a folder in its place: the file itself may be fine
        raise InputError(
            f"cannot read {path} ({e.strerror}): make it readable, or point data.data_dir= or the "
            "MNIST_LAB_DATA environment variable at a folder holding a readable copy"
        ) from None
    if len(header) < header_size:
        raise InputError(f"{path} is truncated ({size} bytes, shorter than its header): {_fix(path.parent)}")
    found, *dims = struct.unpack(f">{1 + ndim}i", header)
    if found != magic:
        raise InputError(
            f"{path} is not an IDX {'image' if ndim == 3 else 'label'} file "
            f"(magic number {found:#x}, expected {magic:#x}): {_fix(path.parent)}"
        )
    if ndim == 3 and dims[1:] != [28, 28]:
        raise InputError(f"{path} holds {dims[1]}x{dims[2]} images, expected 28x28: {_fix(path.parent)}")
    expected = header_size + dims[0] * (784 if ndim == 3 else 1)
    if size != expected:
        raise InputError(
            f"{path} is {size} bytes, but its header promises {dims[0]} items ({expected} bytes): "
            f"the file is truncated or corrupt; {_fix(path.parent)}"
        )
    return dims[0]


class InMemoryDataset(Dataset):
    """Images and labels held in memory and indexed a whole batch at a time: `dataset[index_tensor]`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select: several times faster than advanced indexing for a batch of rows.
        index = index.to(self.images.device, non_blocking=True)  # data.on_device: tensors on the GPU
        return self.images.index_select(0, index), self.labels.index_select(0, index)

    def to(self, device: torch.device) -> "InMemoryDataset":
        return InMemoryDataset(self.images.to(device), self.labels.to(device))


class BatchIndices(Sampler[torch.Tensor]):
    """One epoch's batches as index tensors: a fresh permutation from `generator` each epoch, or in order.

    With `world_size` > 1 (DDP), process `rank` takes every world_size-th batch. Training batches
    (`even=True`) are cut to the same count on every process, as DDP's gradient sync requires.
    `skip` batches are left out of the first epoch only: a run resumed mid-epoch goes on from there.
    `group` > 0 (the captured step's static shapes): full batches only, `group` of them at a time
    as one (group, batch_size) tensor; `skip` then counts groups.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        even: bool = False,
        skip: int = 0,
        group: int = 0,
    ) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.rank, self.world_size, self.even, self.skip, self.group = rank, world_size, even, skip, group
        self.epoch_start_state = generator.get_state() if generator is not None else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator, so the permutation is drawn at the first batch: DataLoader's worker
        # iterator calls iter() twice and drops the first, which must not consume a permutation.
        if self.generator is None:
            order = torch.arange(self.size)
        else:
            self.epoch_start_state = self.generator.get_state()  # what a mid-epoch checkpoint records
            order = torch.randperm(self.size, generator=self.generator)
        batches = order.split(self.batch_size)[self.rank :: self.world_size][: self._batches()]
        if self.group:
            batches = [torch.stack(batches[i : i + self.group]) for i in range(0, len(self) * self.group, self.group)]
        skip, self.skip = self.skip, 0
        yield from batches[skip:]

    def _batches(self) -> int:
        """Batches this process takes in an epoch."""
        batches = self.size // self.batch_size if self.group else math.ceil(self.size / self.batch_size)
        if self.even:
            return batches // self.world_size
        return len(range(self.rank, batches, self.world_size))

    def __len__(self) -> int:
        return self._batches() // self.group if self.group else self._batches()


class IndexBatches(Dataset):
    """The index tensors themselves, on `device`: the captured step gathers its batches there."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return index.to(self.device, non_blocking=True)


class MNISTDataModule(pl.LightningDataModule):
    """MNIST or a same-format dataset (FashionMNIST, KMNIST) held in memory as uint8 tensors.

    Batches are formed by indexing those tensors and normalized as a whole on the training device,
    so no per-sample transform runs in the hot path. Validation is a seeded hold-out of the training
    files; test is the official test file, never used for training or model selection.
    `captured_steps` > 0 (compile=true): training batches are full batches only, handed over as
    (captured_steps, batch_size) index tensors that the captured step gathers on the device itself.
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "MNIST",
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        batch_size: int = 64,
        eval_batch_size: int = 500,
        val_size: int = 5000,
        split_seed: int = 1,
        seed: int = 1,
        download: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        augment: dict | None = None,
        verify_checksums: bool = True,
        on_device: bool = False,
        captured_steps: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_size", val_size)):
            if not is_whole(value) or value < 1:
                raise InputError(f"data.{key} must be a positive integer, got {value!r}: pass e.g. data.{key}=64")
        for key, value in (("split_seed", split_seed), ("seed", seed), ("num_workers", num_workers)):
            if not is_whole(value) or not 0 <= value < 2**32:
                raise InputError(
                    f"data.{key} must be a whole number from 0 to 2**32-1, got {value!r}: pass e.g. data.{key}=1"
                )
        if num_workers > MAX_WORKERS:  # each a process with its own copy of torch
            raise InputError(f"data.num_workers={num_workers}: give at most {MAX_WORKERS}; 0, the default, is fastest")
        for key, value in (
            ("download", download),
            ("verify_checksums", verify_checksums),
            ("pin_memory", pin_memory),
            ("on_device", on_device),
        ):
            if not isinstance(value, bool):
                raise InputError(
                    f"data.{key} must be true or false, got {value!r}: pass data.{key}=true or data.{key}=false"
                )
        # Of pixels scaled to 0-1: outside that, normalized images overflow float32 or lose all contrast.
        if not all(is_number(v) and math.isfinite(v) for v in (mean, std)) or not (
            0 <= mean <= 1 and 0.001 <= std <= 1
        ):
            raise InputError(
                f"data.mean and data.std are of pixels scaled to 0-1: data.mean from 0 to 1 and data.std from 0.001 "
                f"to 1, got mean={mean}, std={std}: "
                f"pass e.g. data.mean={MNIST_MEAN} data.std={MNIST_STD} (MNIST's)"
            )
        dataset_cls = getattr(torchvision.datasets, dataset, None) if dataset in DATASETS else None
        if dataset_cls is None:
            raise InputError(
                f"data.dataset={dataset!r} is not an MNIST-format dataset of torchvision.datasets: "
                f"use {', '.join(DATASETS[:-1])} or {DATASETS[-1]}"
            )
        if captured_steps and augment:
            raise InputError("compile=true does not support data.augment yet: pass augment=none, or drop compile=true")
        if isinstance(augment, DictConfig):
            augment = OmegaConf.to_container(augment, resolve=True)
        if augment is not None and not isinstance(augment, dict):
            raise InputError(
                f"data.augment must be a config dict ({{'_target_': ...}}), got {type(augment).__name__}: "
                "build the data module with hydra.utils.instantiate(cfg.data, _recursive_=False)"
            )
        self.save_hyperparameters()
        # Plain data in the hyperparameters ({"_target_": ..., "degrees": 15, ...}), built here.
        self.augment = instantiate(augment) if augment else None
        self.dataset_cls = dataset_cls
        self.raw_dir = Path(data_dir) / dataset / "raw"
        self._resume_state: dict | None = None  # from a checkpoint, applied once the data is set up
        self._resume_at = 0  # training batches of the current epoch already done (mid-epoch resume)

    def _files(self, split: str) -> tuple[Path, Path]:
        return self.raw_dir / f"{split}-images-idx3-ubyte", self.raw_dir / f"{split}-labels-idx1-ubyte"

    def _missing(self) -> list[Path]:
        return [p for split in ("train", "t10k") for p in self._files(split) if not p.exists()]

    def prepare_data(self) -> None:
        if not self._missing() or not self.hparams.download:
            return
        try:
            for train in (True, False):
                self.dataset_cls(self.hparams.data_dir, train=train, download=True)
        except Exception as e:  # any network or archive failure: the fix is the same
            raise InputError(
                f"{self.hparams.dataset} is not in {self.raw_dir} and downloading it failed ({e}). Connect "
                "to the internet and retry, or point data.data_dir= or MNIST_LAB_DATA at a folder "
                f"holding {self.hparams.dataset}/raw/*-ubyte"
            ) from None

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one split into (N, 1, 28, 28) uint8 images and (N,) int64 labels, after checks."""
        if missing := self._missing():
            raise InputError(
                f"{self.hparams.dataset} files missing in {self.raw_dir}: {', '.join(p.name for p in missing)}. "
                "Run with data.download=true to download them, or point data.data_dir= or the "
                f"MNIST_LAB_DATA environment variable at a folder holding {self.hparams.dataset}/raw/*-ubyte"
            )
        image_file, label_file = self._files(split)
        n_images, n_labels = check_idx(image_file, IMAGE_MAGIC), check_idx(label_file, LABEL_MAGIC)
        if self.hparams.verify_checksums and (official := CHECKSUMS.get(self.hparams.dataset)):
            for path in (image_file, label_file):
                verify_checksum(path, self.hparams.dataset, official[path.name])
        if n_images != n_labels:
            raise InputError(
                f"{image_file} holds {n_images} images but {label_file} {n_labels} labels: {_fix(self.raw_dir)}"
            )
        images, labels, classes = decode(
            self.dataset_cls, self.hparams.data_dir, split == "train", _stamp(image_file), _stamp(label_file)
        )
        if labels.max() >= classes:
            raise InputError(f"{label_file} holds labels outside 0-{classes - 1}: {_fix(self.raw_dir)}")
        return images, labels

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and not hasattr(self, "train_set"):
            images, labels = self._load("train")
            val_size = self.hparams.val_size
            if val_size >= len(images):
                raise InputError(
                    f"data.val_size={val_size} leaves no training images ({len(images)} in all): "
                    "pass a smaller data.val_size, e.g. data.val_size=5000"
                )
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            val, train = order[:val_size], order[val_size:]
            steps, batch_size = self.hparams.captured_steps, self.hparams.batch_size
            if steps and len(train) < steps * batch_size:
                raise InputError(
                    f"compile=true trains on whole replays of steps_per_replay={steps} full batches of {batch_size}, "
                    f"{steps * batch_size} images, but there are {len(train)} training images: lower "
                    "steps_per_replay or data.batch_size"
                )
            self.train_set = InMemoryDataset(images[train], labels[train])
            self.val_set = InMemoryDataset(images[val], labels[val])
            # One generator for the whole fit: each epoch draws the next seeded permutation.
            self.shuffle_generator = torch.Generator().manual_seed(self.hparams.seed)
            if self._resume_state is not None:
                self._restore(self._resume_state)
        # At fit too: a bad test file must be found before the first step, not after the last epoch.
        if stage in ("fit", "test") and not hasattr(self, "test_set"):
            self.test_set = InMemoryDataset(*self._load("t10k"))
        if self.hparams.on_device and self.trainer is not None:
            # The whole data set on the training device (47 MB of uint8 for MNIST's training
            # images): each batch is then an index_select there, with no copy from the host.
            device = self.trainer.strategy.root_device
            for name in ("train_set", "val_set", "test_set"):
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name).to(device))

    def _loader(self, dataset: InMemoryDataset, batch_size: int, train: bool = False) -> DataLoader:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if train:
            skip, self._resume_at = self._resume_at, 0
            batches = BatchIndices(
                len(dataset),
                batch_size,
                self.shuffle_generator,
                rank,
                world_size,
                even=True,
                skip=skip,
                group=self.hparams.captured_steps,
            )
            self.train_batches = batches  # its epoch_start_state goes into checkpoints
            if self.hparams.captured_steps:
                dataset = IndexBatches(len(dataset), dataset.images.device)
        else:
            batches = BatchIndices(len(dataset), batch_size, rank=rank, world_size=world_size)
        # batch_size=None: each index tensor from the sampler fetches a whole batch, no collation.
        # A generator of its own: each iter() draws a worker seed, which must not come from the
        # global generator that dropout uses (a resumed run creates its iterators at other times).
        return DataLoader(
            dataset,
            sampler=batches,
            batch_size=None,
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Where the data stream stands, for checkpoints: the shuffling generator at the start of
        the current epoch, the batches of it already trained on, and the augmentation generator."""
        state: dict[str, Any] = {}
        if (batches := getattr(self, "train_batches", None)) is not None and self.trainer is not None:
            state["epoch_start_state"] = batches.epoch_start_state
            state["generator_state"] = self.shuffle_generator.get_state()
            state["batches_done"] = batches_done_in_epoch(self.trainer)
            state["batches_per_epoch"] = self.trainer.num_training_batches  # less with limit_train_batches
        if self.augment is not None and (augment_state := self.augment.state_dict()):
            state["augment"] = augment_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores this before setup(): keep it until the generator exists.
        self._resume_state = state_dict
        if hasattr(self, "shuffle_generator"):
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self._resume_state = None
        if self.augment is not None and "augment" in state:
            self.augment.load_state_dict(state["augment"])
        if "generator_state" not in state:
            return
        if 0 < state["batches_done"] < state["batches_per_epoch"]:
            # Stopped mid-epoch: draw that epoch's permutation again and skip what was done.
            self.shuffle_generator.set_state(state["epoch_start_state"])
            self._resume_at = state["batches_done"]
        else:
            self.shuffle_generator.set_state(state["generator_state"])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Raw 0-255 images as the model sees them."""
        return normalize(images, self.hparams.mean, self.hparams.std)

    def on_after_batch_transfer(
        self, batch: list[torch.Tensor] | torch.Tensor, dataloader_idx: int
    ) -> tuple[torch.Tensor, ...] | torch.Tensor:
        if isinstance(batch, torch.Tensor):  # the captured step's training indices: it gathers them itself
            return batch
        images, labels = batch
        images = images.float()
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            images = self.augment(images)  # training batches only, before normalizing: background 0
        # (x / 255 - mean) / std on the training device, in two in-place ops
        return images.sub_(255 * self.hparams.mean).div_(255 * self.hparams.std), labels
