"""The one path from a checkpoint file to what it holds: read it without unpickling code or
allocating more than the file holds, rebuild its model, and set up its test data."""

import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_class
from omegaconf import OmegaConf

from mnist_lab.data import MNISTDataModule
from mnist_lab.defaults import MNIST_MEAN, MNIST_STD
from mnist_lab.errors import InputError, first_line
from mnist_lab.models import ImageClassifier
from mnist_lab.trust import is_trusted, targets

HINT = (
    "pass a .ckpt file from a run folder's checkpoints/, "
    "e.g. --ckpt outputs/runs/<date>/<time>_lenet/checkpoints/last.ckpt"
)
SLACK_BYTES = 1 << 20  # a model may hold this much beyond its weights (metric states, buffers not saved)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a checkpoint that train.py wrote, as plain tensors and data."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint file at {path}: {HINT}")
    # torch.save writes a zip of uncompressed entries: memory then stays within the file's size.
    # A compressed entry could inflate a small file to gigabytes, and the older format allocates
    # whatever size its header claims before reading.
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(
            f"{path} is not a checkpoint that loads safely (not the zip file torch.save writes: {e}): {HINT}"
        ) from None
    if packed:
        raise InputError(
            f"{path} holds compressed entries ({packed[0]}), which torch.save never writes: "
            f"refused, as it could unpack to far more memory than the file's size; {HINT}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and data only
    except Exception as e:  # truncated, or holding objects we refuse to unpickle
        reason = first_line(e)
        raise InputError(f"{path} is not a checkpoint that loads safely ({reason[:200]}): {HINT}") from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not isinstance(checkpoint.get("hyper_parameters"), dict)
    ):
        raise InputError(f"{path} is a torch file but not a Lightning checkpoint of mnist_lab: {HINT}")
    return checkpoint


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """(the model in eval mode, the data module's hyperparameters: dataset, mean, std, ...)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    cls = _model_class(path, checkpoint)
    # The loss is built with the model: a file may name only classes of mnist_lab's own config groups.
    if untrusted := [t for t in targets(OmegaConf.create(checkpoint["hyper_parameters"])) if not is_trusted(t)]:
        raise InputError(
            f"{path} names {untrusted[0]} in its hyperparameters, a class from a module that no config in "
            f"conf/ names: {HINT}"
        )
    weights = checkpoint["state_dict"]
    held = sum(
        s.nbytes()
        for s in {
            id(t.untyped_storage()): t.untyped_storage() for t in weights.values() if isinstance(t, torch.Tensor)
        }.values()
    )
    try:
        with torch.device("meta"):  # the model's size from its hyperparameters, allocating nothing
            needed = sum(
                t.numel() * t.element_size() for t in cls(**checkpoint["hyper_parameters"]).state_dict().values()
            )
        if needed > held + SLACK_BYTES:
            raise InputError(
                f"its hyperparameters describe a model of {needed / 1e6:,.0f} MB, but it holds "
                f"{held / 1e6:,.1f} MB of weights; refused rather than allocated"
            )
        model = cls(**checkpoint["hyper_parameters"])
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError, InputError) as e:  # arguments or weights that do not fit the class
        raise InputError(f"{path} does not fit {cls.__name__} ({first_line(e)[:200]}): {HINT}") from None
    data = checkpoint.get("datamodule_hyper_parameters")
    return model.to(device).eval(), dict(data) if isinstance(data, dict) else {}


def datamodule_for(data: dict[str, Any], data_dir: str | Path, dataset: str | None = None) -> MNISTDataModule:
    """A data module for a checkpoint's data settings `data`, its official test set of `dataset`
    (default: the checkpoint's own) ready in .test_set, normalized as the model was trained."""
    datamodule = MNISTDataModule(
        data_dir=str(data_dir),
        dataset=dataset or data.get("dataset", "MNIST"),
        mean=data.get("mean", MNIST_MEAN),
        std=data.get("std", MNIST_STD),
        download=data.get("download", True),
        verify_checksums=data.get("verify_checksums", True),
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule


def _model_class(path: Path, checkpoint: dict[str, Any]) -> type[ImageClassifier]:
    ours = checkpoint.get("mnist_lab")
    target = ours.get("model_class") if isinstance(ours, dict) else None
    run_config = path.parent.parent / ".hydra" / "config.yaml"
    if target is None and run_config.is_file():  # written before checkpoints named their class
        try:
            target = (yaml.safe_load(run_config.read_text()).get("model") or {}).get("_target_")
        except (OSError, yaml.YAMLError, AttributeError):
            target = None
    # Only our own model classes: importing a module named in a file would run its code.
    if not isinstance(target, str) or not target.startswith("mnist_lab.models.") or target.count(".") != 3:
        raise InputError(f"{path} does not say which mnist_lab model it holds (got {target!r}): {HINT}")
    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001  Hydra's ImportError or ValueError: one line either way
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ImageClassifier)):
        raise InputError(f"{path} names {target}, which is not an mnist_lab model: {HINT}")
    return cls
