"""Train and test one model: python train.py model=lenet (-m sweeps; resume=<run folder> goes on)."""

import atexit
import gc

import hydra
from omegaconf import DictConfig

import mnist_lab  # noqa: F401  registers the resolvers that conf/train.yaml uses


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from mnist_lab.app import job  # torch and Lightning take seconds: --help and a typo answer before
    return job(cfg)


if __name__ == "__main__":
    atexit.register(gc.freeze)  # skips Python's last collections at exit, 1.1 s on 2 cores; files still close
    main()
