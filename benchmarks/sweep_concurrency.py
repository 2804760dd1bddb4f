"""Wall time of one sweep run one job at a time, and with several jobs at once on each GPU.

    python benchmarks/sweep_concurrency.py [--jobs-per-gpu 6 [12 ...]] [--repeats 1] [--data-dir DIR] [OVERRIDE ...]

The sweep is issue 12's 12 LeNet-5 jobs, 2 epochs each, data on the device:

    model=lenet optimizer.lr=0.01,0.02,0.05,0.1,0.2,0.4 data.batch_size=64,256 trainer.max_epochs=2
    data.on_device=true

with any OVERRIDE after them (a later value wins). Each repeat runs, in turns, each in a new sweep
folder and a new process, as a user would type them:

  sequential  python train.py -m <sweep>                        (Hydra's basic launcher: one job after another)
  N at once   python train.py -m hydra/launcher=gpus hydra.launcher.jobs_per_gpu=N <sweep>   (each N given)

Prints each one's wall time, its ratio to the sequential one, and every job's val/acc in each:
the jobs are seeded, so they agree up to the nondeterminism of GPU kernels (or, on a CPU, of
thread counts).
On this project's 2-core CPU machine, a proxy that runs in minutes:

    python benchmarks/sweep_concurrency.py --jobs-per-gpu 2 model=softmax trainer=cpu \\
        data.on_device=false optimizer.lr=0.05,0.1 data.batch_size=64,256 trainer.max_epochs=1
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [
    "model=lenet",
    "optimizer.lr=0.01,0.02,0.05,0.1,0.2,0.4",
    "data.batch_size=64,256",
    "trainer.max_epochs=2",
    "data.on_device=true",
]
QUIET = ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"]


def sweep(folder: Path, args: list[str]) -> tuple[float, dict[str, float], float | None]:
    """Wall time of `python train.py -m <args>` in `folder`, val/acc by job, and the GPUs' mean
    utilization meanwhile (percent, sampled by nvidia-smi every half second; None without it)."""
    sampler = gpu_sampler(folder.with_suffix(".gpu.csv"))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *args, f"hydra.sweep.dir={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    utilization = None
    if sampler is not None:
        sampler.terminate()
        sampler.wait()
        samples = [float(v) for v in folder.with_suffix(".gpu.csv").read_text().split() if v.strip()]
        utilization = statistics.mean(samples) if samples else None
    if result.returncode != 0:
        sys.exit(f"the sweep in {folder} failed:\n{result.stderr[-3000:]}")
    with open(folder / "summary.csv") as f:
        return seconds, {row["job"]: float(row["val/acc"]) for row in csv.DictReader(f)}, utilization


def write_figures(path: Path, times: dict[str, list[float]], utilization: dict[str, list[float]]) -> None:
    """Each arm run so far: its median wall time, its speed-up over the sequential one, the GPUs' busy time."""
    sequential = statistics.median(times["sequential"])
    figures = {
        arm: {
            "wall_s": statistics.median(t),
            "speed-up": sequential / statistics.median(t),
            "gpu_utilization_percent": statistics.median(utilization[arm]) if utilization[arm] else None,
        }
        for arm, t in times.items()
        if t
    }
    path.write_text(json.dumps(figures, indent=2) + "\n")


def gpu_sampler(path: Path) -> subprocess.Popen | None:
    """nvidia-smi writing every GPU's utilization (percent) to `path` twice a second; None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"]
    return subprocess.Popen(query, stdout=path.open("w"), stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-per-gpu", type=int, nargs="+", default=[6])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_LAB_DATA"))
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = [*SWEEP, *QUIET, *([f"data.data_dir={args.data_dir}"] if args.data_dir else []), *args.overrides]
    arms = {"sequential": common}
    for n in args.jobs_per_gpu:
        arms[f"{n} at once"] = ["hydra/launcher=gpus", f"hydra.launcher.jobs_per_gpu={n}", *common]
    print("sweep:", " ".join(common))
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    utilization: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            results = {}
            for i, (arm, arm_args) in enumerate(arms.items()):
                seconds, results[arm], busy = sweep(Path(tmp) / f"{repeat}-{i}", arm_args)
                times[arm].append(seconds)
                if busy is not None:
                    utilization[arm].append(busy)
                if args.json:  # after each arm: a sweep stopped at a time limit keeps the arms it ran
                    write_figures(args.json, times, utilization)
                print(
                    f"repeat {repeat + 1}: {arm:<12} {seconds:7.1f} s  ({len(results[arm])} jobs)"
                    + (f", GPU busy {busy:.0f}% of the time" if busy is not None else ""),
                    flush=True,
                )
            print("val/acc by job:", " / ".join(arms))
            for job, value in results["sequential"].items():
                others = [results[arm].get(job, float("nan")) for arm in list(arms)[1:]]
                print(
                    f"  job {job:>2}: "
                    + " / ".join(f"{v:.4f}" for v in [value, *others])
                    + f"  (largest difference {max(abs(v - value) for v in others):.4f})"
                )
    sequential = statistics.median(times["sequential"])
    print(
        f"median wall time: sequential {sequential:.1f} s"
        + "".join(
            f"; {arm} on each GPU {statistics.median(t):.1f} s, {sequential / statistics.median(t):.2f}x faster"
            for arm, t in times.items()
            if arm != "sequential"
        )
    )


if __name__ == "__main__":
    main()
