"""Train and test one model: python train.py model=lenet (-m sweeps; resume=<run or sweep folder> goes on)."""

import atexit
import gc
import sys

import hydra
from omegaconf import DictConfig

from mnist_lab.errors import one_line_errors
from mnist_lab.run_folder import resumed_sweep_argv  # importing it registers the resolvers conf/train.yaml uses


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from mnist_lab.app import job  # torch and Lightning take seconds: --help and a typo answer before
    return job(cfg)


if __name__ == "__main__":
    atexit.register(gc.freeze)  # skips Python's last collections at exit, 1.1 s on 2 cores; files still close
    with one_line_errors():
        sys.argv[1:] = resumed_sweep_argv(sys.argv[1:])  # resume=<sweep folder>: that sweep's command, again
    main()
