"""Train and test one model: python train.py model=lenet trainer.max_epochs=5 (add -m to sweep).

python train.py resume=<run folder> continues a run that was stopped or killed."""

import atexit
import gc
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import mnist_lab  # noqa: F401  registers the resolvers that conf/train.yaml uses


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # torch and Lightning take seconds to import: only now, so that --help and a mistyped option
    # (which Hydra answers before calling main) answer at once.
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import InstantiationException
    from hydra.types import RunMode

    from mnist_lab.errors import InputError
    from mnist_lab.report import SWEEP_FILE, record_failure, recorded_sweep_keys, write_report
    from mnist_lab.resume import CONFIG_FILE, LAST_CHECKPOINT, Interrupted
    from mnist_lab.train import check_multirun_strategy, run, threads_per_job

    hydra_cfg = HydraConfig.get()
    if threads := threads_per_job(hydra_cfg):
        torch.set_num_threads(threads)
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.resume:  # the run's own settings, as it was started
        cfg, overrides = OmegaConf.load(out_dir / CONFIG_FILE), list(OmegaConf.load(out_dir / CONFIG_FILE.parent / "overrides.yaml"))
    # A stopped run's folder, given again (resume=, or the same hydra.run.dir): it goes on.
    resume_from = out_dir / LAST_CHECKPOINT if (out_dir / LAST_CHECKPOINT).is_file() else None
    # In a sweep, the TensorBoard run is named by the swept values: lr=0.01,batch_size=64.
    swept = recorded_sweep_keys(hydra_cfg.sweep.dir) if multirun else []
    try:
        if multirun:  # again for each job: a swept trainer (trainer=cpu,ddp_cpu) is not in the sweep's config
            check_multirun_strategy(cfg, hydra_cfg.launcher.get("_target_"))
        metrics = run(cfg, out_dir, overrides, swept, resume_from)
    except Interrupted as e:
        if (out_dir / LAST_CHECKPOINT).is_file():
            print(f"Stopped by {e.signal_name}; a checkpoint is saved. Resume with:\n  python train.py resume={out_dir}", file=sys.stderr)
        else:
            print(f"Stopped by {e.signal_name} before the first checkpoint: start the run again", file=sys.stderr)
        sys.exit(e.exit_code)
    except (InputError, InstantiationException) as e:
        # Hydra wraps errors raised while building objects; bad input gets one line, not a traceback.
        cause = e if isinstance(e, InputError) else e.__cause__
        if not isinstance(cause, InputError) or multirun:
            raise  # Hydra marks the job failed (mnist_lab.report.SweepReport) and a sweep goes on
        record_failure(out_dir, cause)
        sys.exit(f"Error: {cause}")
    if resume_from and (out_dir.parent / SWEEP_FILE).is_file():
        write_report(out_dir.parent)  # a sweep job resumed on its own: the sweep's report catches up
    return metrics["val/acc"]


if __name__ == "__main__":
    # Python's last garbage collections, at exit, walk every object that torch and Lightning made:
    # 1.1 s on a 2-core CPU. Frozen, they are skipped; atexit handlers still flush and close files.
    atexit.register(gc.freeze)
    main()
