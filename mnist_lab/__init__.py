"""mnist_lab: train, compare and sweep small vision models on MNIST-class data."""

from omegaconf import OmegaConf

# conf/train.yaml: resume=<folder> makes that folder the run's, and keeps its .hydra/ as it was.
# Registered here, so that the config composes wherever any part of mnist_lab is imported.
OmegaConf.register_new_resolver("mnist_lab.resume_or", lambda resume, new: resume or new)
OmegaConf.register_new_resolver("mnist_lab.unless_resume", lambda resume, value: None if resume else value)
