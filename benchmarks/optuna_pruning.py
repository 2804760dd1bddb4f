"""What pruning saves in an Optuna search: the same seeded search with and without a pruner.

    python benchmarks/optuna_pruning.py [--trials 16] [--epochs 4] [--data-dir DIR] [OVERRIDE ...]

Runs, each in a new sweep folder and a new process, as a user would type them:

  no pruning   python train.py -m sweep=optuna model=lenet hydra.sweeper.n_trials=16 trainer.max_epochs=4
               hydra/sweeper/pruner=none
  median       the same with the default pruner (hydra/sweeper/pruner=median)

and prints for each: the best val/acc and its trial, the epochs trained over all trials, the
trials pruned, and the wall time. The TPE sampler is seeded (sweep=optuna: seed 1), so both draw
the same first trials; once trials are pruned, TPE learns from different results and the later
trials can differ.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"]


def search(folder: Path, args: list[str]) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *args, f"hydra.sweep.dir={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    if result.returncode != 0 or not rows:
        sys.exit(f"the search in {folder} failed:\n{result.stderr[-3000:]}")
    done = [r for r in rows if r["status"] in ("ok", "pruned")]
    (best,) = [r for r in rows if r["best"] == "True"]
    return {
        "seconds": seconds,
        "best": best,
        "epochs": sum(int(r["epochs"]) for r in done),
        "pruned": sum(r["status"] == "pruned" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "trials": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_LAB_DATA"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = [
        "sweep=optuna",
        "model=lenet",
        f"hydra.sweeper.n_trials={args.trials}",
        f"trainer.max_epochs={args.epochs}",
        *QUIET,
        *([f"data.data_dir={args.data_dir}"] if args.data_dir else []),
        *args.overrides,
    ]
    print("search:", " ".join(common), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, pruner in (("no pruning", "none"), ("median", "median")):
            r = search(Path(tmp) / pruner, [*common, f"hydra/sweeper/pruner={pruner}"])
            print(
                f"{name:<10}: best val/acc {float(r['best']['val/acc']):.4f} (trial {r['best']['job']}, test/acc "
                f"{float(r['best']['test/acc']):.4f}); {r['epochs']} epochs over {r['trials']} trials "
                f"({r['pruned']} pruned, {r['failed']} failed); {r['seconds']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
