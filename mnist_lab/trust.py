"""What mnist_lab trusts: a run folder, a sweep folder and a checkpoint are data that may come from
anyone, and the classes they may have built (their `_target_`s) are those of the modules that the
configs in conf/ name, read again whenever asked, or those that `trusted_targets=` names on the
command line. resume= (mnist_lab.resume) and checkpoint loading (mnist_lab.checkpoint) ask here."""

import importlib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mnist_lab.errors import InputError, first_line
from mnist_lab.run_folder import CONF_DIR


def targets(cfg: DictConfig) -> list[str]:
    """Every _target_ in a configuration, at any depth, as instantiate would read it."""
    try:
        return plain_targets(OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # noqa: BLE001  an interpolation that does not resolve
        raise InputError(f"the run's settings do not resolve: {first_line(e)}") from None


def plain_targets(node: Any, skip: str | None = None) -> list[str]:
    """Every _target_ in plain data (dicts and lists), at any depth, but under a key named `skip`."""
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for key, value in node.items() if key != skip for t in plain_targets(value, skip)]
    if isinstance(node, list):
        return [t for value in node for t in plain_targets(value, skip)]
    return []


def trusted_modules(conf_dir: Path = CONF_DIR) -> set[str]:
    """The modules of the classes that conf/ names as _target_ for a run (Hydra's settings aside): what a
    run folder, a sweep folder or a checkpoint may have built. Read again at every call, so a model
    added to conf/ is trusted at once, and what conf/ does not name needs `trusted_targets=`."""
    found: list[str] = []
    for path in sorted(conf_dir.rglob("*.yaml")):
        if "hydra" in path.relative_to(conf_dir).parts:
            continue
        try:
            found += plain_targets(yaml.safe_load(path.read_text()), skip="hydra")
        except (OSError, yaml.YAMLError) as e:  # a config of one's own that does not read
            raise InputError(f"{path} does not read as YAML ({first_line(e)}): mend it") from None
    return {target.rpartition(".")[0] for target in found}


def is_trusted(target: str, modules: set[str] | None = None) -> bool:
    """A class of one of `modules` (default: trusted_modules()), named directly (module.Class: no
    attribute of an attribute)."""
    module, _, name = target.rpartition(".")
    if modules is None:
        modules = trusted_modules()
    if module not in modules or not name.isidentifier() or name.startswith("_"):
        return False
    return isinstance(getattr(importlib.import_module(module), name, None), type)
