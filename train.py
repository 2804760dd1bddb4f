"""Train and test one model: python train.py model=lenet trainer.max_epochs=5 (add -m to sweep)."""

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from mnist_lab.errors import InputError
from mnist_lab.report import record_failure, recorded_sweep_keys
from mnist_lab.train import run, threads_per_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    if threads := threads_per_job(hydra_cfg):
        torch.set_num_threads(threads)
    overrides = list(hydra_cfg.overrides.task)
    # In a sweep, the TensorBoard run is named by the swept values: lr=0.01,batch_size=64.
    swept = recorded_sweep_keys(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else []
    try:
        return run(cfg, hydra_cfg.runtime.output_dir, overrides, swept)["val/acc"]
    except (InputError, InstantiationException) as e:
        # Hydra wraps errors raised while building objects; bad input gets one line, not a traceback.
        cause = e if isinstance(e, InputError) else e.__cause__
        if not isinstance(cause, InputError) or hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra marks the job failed (mnist_lab.report.SweepReport) and a sweep goes on
        record_failure(Path(hydra_cfg.runtime.output_dir), cause)
        sys.exit(f"Error: {cause}")


if __name__ == "__main__":
    main()
