"""python -m mnist_lab ARGS: the same as python train.py ARGS, from any folder."""

import atexit
import gc

from mnist_lab.api import main

atexit.register(gc.freeze)  # skips Python's last collections at exit; files still close
main()
