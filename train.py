"""Train and test one model: python train.py model=lenet trainer.max_epochs=5 (add -m to sweep)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from mnist_lab.errors import InputError
from mnist_lab.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)["val/acc"]
    except (InputError, InstantiationException) as e:
        # Hydra wraps errors raised while building objects; bad input gets one line, not a traceback.
        cause = e if isinstance(e, InputError) else e.__cause__
        if not isinstance(cause, InputError):
            raise
        sys.exit(f"Error: {cause}")


if __name__ == "__main__":
    main()
