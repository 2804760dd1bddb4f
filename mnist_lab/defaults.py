"""The values the code falls back on where none is given, in one place and free of heavy imports
(mnist_lab.api reads them before torch is loaded: `python train.py --help` stays quick)."""

import os
from pathlib import Path

# MNIST's pixel mean and standard deviation (of its training images, on a 0-1 scale): the defaults
# wherever a model's normalization is not recorded. conf/data/mnist.yaml gives the same (tested).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def default_data_dir() -> Path:
    """The data folder where none is given: $MNIST_LAB_DATA, else ./data, as conf/data/mnist.yaml's data_dir."""
    return Path(os.environ.get("MNIST_LAB_DATA", "data"))
