"""What runs in each worker process of hydra/launcher=gpus, outside the jobs: its GPU and threads,
the watch on its parent, and the call of each job. A module whose name starts with an underscore,
which Hydra's plugin scan does not import: the scan, which runs in a worker's first job too,
executes the modules it finds again, and would reset the worker's state here mid-job."""

import os
import signal
import threading
import time

import cloudpickle

WATCH_S = 0.5  # how often a worker looks for its parent
STOP_GRACE_S = 60.0  # how long an orphaned worker's job has to save its checkpoint before the worker exits


_busy = threading.Event()  # in a worker: set while it runs a job


def pin(gpu: str | None, threads: int) -> None:
    """In a new worker, before anything starts CUDA: its one GPU, and its share of the cores, which
    torch (and NumPy's BLAS) read from OMP_NUM_THREADS when imported: the worker imports nothing
    that the app's jobs do not. Then the watch on its parent starts."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ["OMP_NUM_THREADS"] = str(threads)
    threading.Thread(target=watch_parent, args=(os.getppid(),), name="watch-parent", daemon=True).start()


def watch_parent(parent: int) -> None:
    """Once the sweep's process is gone (its pid is no longer this worker's parent: killed, even by
    SIGKILL), stop the running job as SIGTERM does, give it STOP_GRACE_S to save its checkpoint, and
    exit: an orphaned worker would train on, then wait forever for its next job."""
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    if _busy.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _busy.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(128 + signal.SIGTERM)


def call(payload: bytes) -> bytes:
    """fn(*args), both ways through cloudpickle: Hydra's config classes do not pickle by reference."""
    fn, args = cloudpickle.loads(payload)
    _busy.set()
    try:
        return cloudpickle.dumps(fn(*args))
    finally:
        _busy.clear()
