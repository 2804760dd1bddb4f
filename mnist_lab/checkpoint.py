"""Load a checkpoint that train.py wrote, unpickling nothing: the model and its data settings."""

from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_class

from mnist_lab.errors import InputError
from mnist_lab.models import ImageClassifier

HINT = "pass a .ckpt file from a run folder's checkpoints/, e.g. --ckpt outputs/runs/<date>/<time>_lenet/checkpoints/last.ckpt"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """(the model in eval mode, the data module's hyperparameters: dataset, mean, std, ...)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint file at {path}: {HINT}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)  # plain tensors and data only
    except Exception as e:  # not a torch file, truncated, or holding objects we refuse to unpickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} is not a checkpoint that loads safely ({reason[:200]}): {HINT}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= checkpoint.keys():
        raise InputError(f"{path} is a torch file but not a Lightning checkpoint of mnist_lab: {HINT}")
    cls = _model_class(path, checkpoint)
    try:
        model = cls(**checkpoint["hyper_parameters"])
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError, InputError) as e:  # arguments or weights that do not fit the class
        raise InputError(f"{path} does not fit {cls.__name__} ({str(e).splitlines()[0][:200]}): {HINT}") from None
    data = checkpoint.get("datamodule_hyper_parameters")
    return model.to(device).eval(), dict(data) if isinstance(data, dict) else {}


def _model_class(path: Path, checkpoint: dict[str, Any]) -> type[ImageClassifier]:
    ours = checkpoint.get("mnist_lab")
    target = ours.get("model_class") if isinstance(ours, dict) else None
    run_config = path.parent.parent / ".hydra" / "config.yaml"
    if target is None and run_config.is_file():  # written before checkpoints named their class
        target = (yaml.safe_load(run_config.read_text()).get("model") or {}).get("_target_")
    # Only our own model classes: importing a module named in a file would run its code.
    if not isinstance(target, str) or not target.startswith("mnist_lab.models."):
        raise InputError(f"{path} does not say which mnist_lab model it holds (got {target!r}): {HINT}")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, ImageClassifier)):
        raise InputError(f"{path} names {target}, which is not an mnist_lab model: {HINT}")
    return cls
