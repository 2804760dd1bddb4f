"""mnist_lab: train, compare and sweep small vision models on MNIST-class data.

import mnist_lab
run = mnist_lab.fit("model=lenet", "trainer.max_epochs=5")
"""

from mnist_lab.api import Run, RunInterrupted, Sweep, fit, load, sweep
from mnist_lab.errors import InputError

__all__ = ["InputError", "Run", "RunInterrupted", "Sweep", "fit", "load", "sweep"]
