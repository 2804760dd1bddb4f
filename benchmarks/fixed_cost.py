"""What a run costs besides training: a one-batch run of train.py, phase by phase, next to
`python -c "import pytorch_lightning"`, measured side by side in one run.

    python benchmarks/fixed_cost.py [--repeats 3] [--data-dir DIR] [OVERRIDE ...]

Each repeat starts four processes one after the other: `import pytorch_lightning` alone, the
same import with `gc.freeze()` at exit (as train.py ends: it skips the last garbage collections,
which walk every object torch and Lightning made), `python train.py --help`, and the one-batch run

    python train.py model=lenet trainer.max_epochs=1 +trainer.limit_train_batches=1 [OVERRIDE ...]

(every output written: metrics.json, curves.png, checkpoints, TensorBoard events). The run is
started through this script (--child), which times the run's phases from outside: it wraps a
few functions of Lightning and mnist_lab with timers that count each one's own time, less that
of the timed calls inside it, and leaves train.py and its config untouched. Prints the median
wall time of each process, what mnist_lab adds beyond Lightning's import (run - import), and
the median of each phase.

Then, in one process (--warm), a one-batch `mnist_lab.fit` twice: the second call is what a
notebook's cell pays once torch and Lightning are loaded. Prints its wall time, the time of its
training step, and what it costs beyond that (the target: at most 1.0 s on a 2-core CPU), with
its phases.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnist_lab.compat import phase_methods
from mnist_lab.defaults import default_data_dir

ROOT = Path(__file__).resolve().parents[1]
ONE_BATCH = ["model=lenet", "trainer.max_epochs=1", "+trainer.limit_train_batches=1"]

# Lightning's private loop methods, which tests/test_compat.py checks against the installed Lightning.
LIGHTNING = phase_methods()
# (module, attribute path, phase): the phase a call's own time counts to. Evaluation loops are
# told apart by the trainer's state when they run.
PROBES = [
    ("mnist_lab.data", "MNISTDataModule.prepare_data", "data: find, check and hash the files"),
    ("mnist_lab.data", "MNISTDataModule.setup", "data: read and split"),
    ("pytorch_lightning", "Trainer.__init__", "build the Trainer"),
    (*LIGHTNING["training epoch"], "training (one batch)"),
    (*LIGHTNING["evaluation"], None),
    ("pytorch_lightning", "Trainer.save_checkpoint", "checkpoints (best and last.ckpt)"),
    (*LIGHTNING["checkpoint load"], "load the best checkpoint for test"),
    ("mnist_lab.callbacks", "TestFigures.on_test_epoch_end", "test figures (TensorBoard images)"),
    ("mnist_lab.recipe", "log_hparams", "HPARAMS"),
    ("mnist_lab.recipe", "plot_curves", "curves.png"),
]


class Phases:
    """Exclusive time per phase: a timed call's time, less that of the timed calls it makes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[float] = []  # time spent in timed calls nested in each open call

    def wrap(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            label = phase or evaluation_phase(args[0])
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._stack.pop()
                self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - nested
                if self._stack:
                    self._stack[-1] += elapsed

        return timed

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds


def evaluation_phase(loop) -> str:
    trainer = loop.trainer
    if trainer.sanity_checking:
        return "sanity validation"
    return "test loop" if trainer.testing else "validation"


def child(overrides: list[str], report: Path) -> None:
    """Run train.py in this process with the probes in place; write the phases to `report`."""
    import importlib
    import runpy

    started = float(os.environ["FIXED_COST_T0"])
    phases = Phases()
    phases.add("python start", time.time() - started)
    mark = time.perf_counter()
    sys.argv = [str(ROOT / "train.py"), *overrides]
    sys.path.insert(0, str(ROOT))
    for module_name, path, phase in PROBES:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, phases.wrap(getattr(owner, name), phase))
    phases.add("imports (torch, Lightning, mnist_lab)", time.perf_counter() - mark)
    mark = time.perf_counter()
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    probed = sum(
        seconds
        for label, seconds in phases.seconds.items()
        if label not in ("python start",) and not label.startswith("imports")
    )
    phases.add("everything else (Hydra, config, Lightning's set-up, logging)", time.perf_counter() - mark - probed)
    report.write_text(json.dumps(phases.seconds))


def warm_child(overrides: list[str], report: Path) -> None:
    """Two one-batch mnist_lab.fit calls in this process; the second one's phases to `report`."""
    import importlib

    sys.path.insert(0, str(ROOT))
    import mnist_lab

    for i in range(2):
        phases = Phases()
        for module_name, path, phase in PROBES:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, name)
            setattr(owner, name, phases.wrap(getattr(original, "__wrapped__", original), phase))
        start = time.perf_counter()
        run = mnist_lab.fit(*ONE_BATCH, *overrides, out_dir=report.parent / f"warm{i}")
        wall = time.perf_counter() - start
        check_outputs(run.folder)
    probed = sum(phases.seconds.values())
    phases.add("everything else (Hydra, config, Lightning's set-up, logging)", wall - probed)
    report.write_text(json.dumps({"wall": wall, "phases": phases.seconds}))


def timed_process(args: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"Error: {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def check_outputs(run_dir: Path) -> None:
    """The run wrote everything a run writes; a cheaper run that skipped some would not count."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for path in (run_dir / metrics["best_checkpoint"], run_dir / "checkpoints" / "last.ckpt", run_dir / "curves.png"):
        if not path.is_file():
            raise SystemExit(f"Error: the run did not write {path}")
    if metrics["status"] != "ok" or not list(run_dir.rglob("events.out.tfevents.*")):
        raise SystemExit(f"Error: the run in {run_dir} did not finish with TensorBoard events")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the run, e.g. model=softmax")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--json", type=Path, help="also write the medians to this JSON file")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.overrides, args.child)
    if args.warm:
        return warm_child(args.overrides, args.warm)

    env = {**os.environ, "MNIST_LAB_DATA": args.data_dir}
    walls: dict[str, list[float]] = {
        "import pytorch_lightning": [],
        "the same, gc.freeze() at exit": [],
        "train.py --help": [],
        "one-batch run": [],
    }
    phases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            walls["import pytorch_lightning"].append(timed_process(["-c", "import pytorch_lightning"], env, ROOT))
            walls["the same, gc.freeze() at exit"].append(
                timed_process(
                    ["-c", "import atexit, gc; atexit.register(gc.freeze); import pytorch_lightning"], env, ROOT
                )
            )
            walls["train.py --help"].append(timed_process(["train.py", "--help"], env, ROOT))
            report = Path(tmp) / f"phases{i}.json"
            run_args = [__file__, f"--child={report}", *ONE_BATCH, f"hydra.run.dir={tmp}/run{i}", *args.overrides]
            walls["one-batch run"].append(timed_process(run_args, {**env, "FIXED_COST_T0": repr(time.time())}, ROOT))
            phases.append(json.loads(report.read_text()))
            phases[-1]["process exit"] = walls["one-batch run"][-1] - sum(phases[-1].values())
            check_outputs(Path(tmp) / f"run{i}")
        warm = []
        for i in range(args.repeats):
            report = Path(tmp) / f"warm{i}" / "phases.json"
            report.parent.mkdir()
            timed_process([__file__, f"--warm={report}", *args.overrides], env, ROOT)
            warm.append(json.loads(report.read_text()))
    median = {name: statistics.median(times) for name, times in walls.items()}

    import pytorch_lightning as pl
    import torch

    print(
        f"\n{' '.join(['train.py', *ONE_BATCH, *args.overrides])}: median of {args.repeats} repeats; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    for name, times in walls.items():
        print(f"  {name:<31} {median[name]:6.2f} s   {[round(t, 2) for t in times]}")
    print(
        f"mnist_lab adds {median['one-batch run'] - median['import pytorch_lightning']:.2f} s beyond Lightning's "
        f"import (one-batch run - import pytorch_lightning), "
        f"{median['one-batch run'] - median['the same, gc.freeze() at exit']:.2f} s beyond the import with gc.freeze()"
    )
    print("phases of the one-batch run (median seconds):")
    for label in phases[0]:
        print(f"  {statistics.median(p.get(label, 0.0) for p in phases):6.3f}  {label}")

    wall = statistics.median(w["wall"] for w in warm)
    step = statistics.median(w["phases"].get("training (one batch)", 0.0) for w in warm)
    beyond = statistics.median(w["wall"] - w["phases"].get("training (one batch)", 0.0) for w in warm)
    print(
        f"\na second one-batch mnist_lab.fit in a warm process: {wall:.2f} s, its training step {step:.3f} s: "
        f"{beyond:.2f} s beyond it (target <= 1.0 s)   {[round(w['wall'], 2) for w in warm]}"
    )
    print("its phases (median seconds):")
    for label in warm[0]["phases"]:
        print(f"  {statistics.median(w['phases'].get(label, 0.0) for w in warm):6.3f}  {label}")
    if args.json:
        figures = {"processes_s": median, "warm_fit_s": wall, "warm_fit_beyond_step_s": beyond}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
