"""The resolvers that conf/train.yaml's hydra.run.dir and hydra.output_subdir use. The modules that
compose or run the config register them (mnist_lab.api, whose Hydra app every run and sweep job
goes through, and the tests' compose helpers)."""

from omegaconf import OmegaConf


def register() -> None:
    """Register mnist_lab's resolvers with OmegaConf; again is harmless."""
    # resume=<folder> makes that folder the run's, and keeps its .hydra/ as it was started.
    OmegaConf.register_new_resolver("mnist_lab.resume_or", lambda resume, new: resume or new, replace=True)
    OmegaConf.register_new_resolver(
        "mnist_lab.unless_resume", lambda resume, value: None if resume else value, replace=True
    )
