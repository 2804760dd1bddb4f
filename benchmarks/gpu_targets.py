"""Every GPU target beside what benchmarks/gpu_check.sh measured, as a Markdown table.

    python benchmarks/gpu_targets.py RESULTS_DIR

RESULTS_DIR is where gpu_check.sh has its steps write their figures: gpu.py's `--json` files
(gpu-b64.json, gpu-b64-compile.json, gpu-b512.json, gpu-b512-compile.json), the run folders of
`experiment=fast` (fast-seed1, 2, 3) and of README's command (readme, with its wall time in
readme.wall), fixed_cost.py's and sweep_concurrency.py's `--json` files (fixed_cost.json,
sweep.json). A target whose figures are not there (the other part's, or a step that failed)
reads "not measured".
"""

import json
import operator
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}
Reading = Callable[[Path], float | None]


def key(file: str, *path: str) -> Reading:
    """The number at `path` in the JSON file `file` of the results, or None where it is not there."""

    def read(results: Path) -> float | None:
        value: Any = load(results / file)
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        return value

    return read


def training_seconds(run: str) -> Reading:
    def read(results: Path) -> float | None:
        times = load(results / run / "metrics.json").get("epoch_train_time_s")
        return sum(times) if times else None

    return read


def wall_seconds(results: Path) -> float | None:
    path = results / "readme.wall"
    return float(path.read_text()) if path.is_file() else None


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# (what, how it is read, the comparison, the target; None: measured, with no target of its own)
TARGETS: list[tuple[str, Reading, str | None, float | None]] = [
    ("gpu.py, batch 64, eager: a/b", key("gpu-b64.json", "a/b"), "<=", 1.20),
    ("gpu.py, batch 512, eager: a/b", key("gpu-b512.json", "a/b"), "<=", 1.25),
    ("gpu.py, batch 64, compile=true: a/b", key("gpu-b64-compile.json", "a/b"), "<", 1.0),
    ("gpu.py, batch 512, compile=true: a/b", key("gpu-b512-compile.json", "a/b"), "<", 1.0),
    ("gpu.py, batch 64, compile=true: capture s", key("gpu-b64-compile.json", "capture_time_s"), None, None),
    ("gpu.py, batch 512, compile=true: capture s", key("gpu-b512-compile.json", "capture_time_s"), None, None),
    *(
        row
        for seed in (1, 2, 3)
        for row in (
            (f"experiment=fast seed={seed}: test/acc", key(f"fast-seed{seed}/metrics.json", "test/acc"), ">=", 0.99),
            (f"experiment=fast seed={seed}: training s", training_seconds(f"fast-seed{seed}"), "<=", 1.0),
        )
    ),
    ("README's command: the whole process, s", wall_seconds, None, None),
    ("README's command: test/acc", key("readme/metrics.json", "test/acc"), None, None),
    (
        "fixed_cost.py: warm second fit beyond its step, s (the CPU target)",
        key("fixed_cost.json", "warm_fit_beyond_step_s"),
        "<=",
        1.0,
    ),
    ("12-job sweep, sequential: s", key("sweep.json", "sequential", "wall_s"), None, None),
    *(
        row
        for n in (6, 12)
        for row in (
            (f"12-job sweep, {n} at once: speed-up", key("sweep.json", f"{n} at once", "speed-up"), ">=", 3.0),
            (
                f"12-job sweep, {n} at once: GPU busy %",
                key("sweep.json", f"{n} at once", "gpu_utilization_percent"),
                None,
                None,
            ),
        )
    ),
]


def table(results: Path) -> str:
    rows = ["| target | measured | met |", "| --- | --- | --- |"]
    for what, read, compare, target in TARGETS:
        value = read(results)
        goal = f" {compare} {target:g}" if compare else ""
        if value is None:
            rows.append(f"| {what}{goal} | not measured | |")
        else:
            met = ("yes" if COMPARE[compare](value, target) else "**no**") if compare else ""
            rows.append(f"| {what}{goal} | {value:.3g} | {met} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/gpu_targets.py RESULTS_DIR (a folder gpu_check.sh wrote)")
    print(table(Path(sys.argv[1])))
