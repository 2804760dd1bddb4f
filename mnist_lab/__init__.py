"""mnist_lab: train, compare and sweep small vision models on MNIST-class data."""

# Registers the resolvers that conf/train.yaml uses, so that the config composes wherever any part
# of mnist_lab is imported.
from mnist_lab import run_folder  # noqa: F401
