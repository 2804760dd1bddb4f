"""Train and test one model: python train.py model=lenet (-m sweeps; resume=<run or sweep folder> goes on)."""

import atexit
import gc

from mnist_lab.api import main

if __name__ == "__main__":
    atexit.register(gc.freeze)  # skips Python's last collections at exit, 1.1 s on 2 cores; files still close
    main()
