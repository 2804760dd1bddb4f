"""Sweep reports: one row per job of a multirun, the best job by val/acc, seeds as mean +- std.

    python -m mnist_lab.report <sweep folder>

writes summary.csv, summary.md and summary.png into the folder. The Hydra callback
`mnist_lab.jobs.SweepReport` (on in conf/train.yaml) writes the report after every job of a sweep,
so a sweep that stops early, or has failing jobs, still gets one.
"""

import argparse
import csv
import io
import math
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no backend, no global state

from mnist_lab.errors import InputError, one_line_errors
from mnist_lab.sweep_folder import METRICS, best_job, compact, load_jobs, recorded_sweep_keys


def swept_keys(jobs: list[dict[str, Any]], declared: list[str] = ()) -> list[str]:
    """The keys the sweep declared (sweep.json), then other override keys whose values differ
    between jobs, in command-line order. A search that drew one value twice still shows it."""
    keys = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    return list(
        dict.fromkeys(
            [
                *(k for k in declared if k in keys),
                *(k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1),
            ]
        )
    )


def by_configuration(jobs: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Successful jobs grouped by their values of `keys` (the swept keys other than seed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        if job.get("status") == "ok":
            groups.setdefault(tuple(job["overrides"].get(k) for k in keys), []).append(job)
    return groups


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def csv_text(jobs: list[dict[str, Any]], keys: list[str], best: dict | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["job", *keys, "status", *METRICS, "epochs", "fit_time_s", "best", "error", "pruned_at_epoch"])
    for job in jobs:
        writer.writerow(
            [
                job["job"],
                *(job["overrides"].get(k, "") for k in keys),
                job.get("status"),
                *(job.get(m, "") for m in METRICS),
                job.get("epochs", ""),
                job.get("fit_time_s", ""),
                job is best,
                job.get("error", ""),
                job.get("pruned_at_epoch", ""),
            ]
        )
    return out.getvalue()


def markdown(sweep_dir: Path, jobs: list[dict[str, Any]], keys: list[str], best: dict | None) -> str:
    fixed = {k: v for k, v in jobs[0]["overrides"].items() if k not in keys} if jobs else {}
    lines = [f"# Sweep {sweep_dir}", ""]
    if fixed:
        lines += ["Same in every job: " + " ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    lines += ["| job | " + " | ".join([*keys, "status", *METRICS, "epochs", "fit time (s)"]) + " |"]
    lines += ["|" + " --- |" * (len(keys) + len(METRICS) + 4)]
    for job in jobs:
        status = job.get("status", "")
        if status == "failed":
            status = f"failed: {job.get('error', '')}".replace("|", "\\|")
        elif status == "pruned":
            status = f"pruned at epoch {job.get('pruned_at_epoch', '?')}"
        marker = " **best**" if job is best else ""
        values = [compact(job["overrides"].get(k, "")) for k in keys] + [status]
        values += [f"{job[m]:.4f}" if m in job else "" for m in METRICS]
        values += [job.get("epochs", ""), f"{job['fit_time_s']:.1f}" if "fit_time_s" in job else ""]
        lines.append(f"| {job['job']}{marker} | " + " | ".join(map(str, values)) + " |")
    lines.append("")
    if best:
        setting = " ".join(f"{k}={compact(best['overrides'].get(k, ''))}" for k in keys)
        lines += [
            f"Best by val/acc: job {best['job']} ({setting}): val/acc {best['val/acc']:.4f}, "
            f"test/acc {best['test/acc']:.4f}. The test set is reported, never used to choose.",
            "",
        ]
    if "seed" in keys:
        others = [k for k in keys if k != "seed"]
        lines += [
            "## Over seeds (mean ± std)",
            "",
            "| " + " | ".join([*others, "runs", *METRICS]) + " |",
            "|" + " --- |" * (len(others) + 1 + len(METRICS)),
        ]
        for values, group in by_configuration(jobs, others).items():
            stats = [mean_std([job[m] for job in group]) for m in METRICS]
            lines.append("| " + " | ".join([*map(str, values), str(len(group)), *stats]) + " |")
        lines.append("")
    order = [
        s
        for s in dict.fromkeys(["ok", "pruned", "running", "interrupted", *(j.get("status") for j in jobs)])
        if s != "failed"
    ] + ["failed"]
    count = {status: sum(job.get("status") == status for job in jobs) for status in order}
    explained = {"pruned": " (stopped early by Optuna's pruner, not candidates for best)"}
    lines.append(
        f"{len(jobs)} jobs: "
        + ", ".join(
            f"{n} {status}{explained.get(status, '')}" for status, n in count.items() if n or status in ("ok", "failed")
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def plot(path: Path, jobs: list[dict[str, Any]], keys: list[str]) -> None:
    """val/acc as a heatmap over two swept parameters (seeds averaged), as a bar per configuration
    for one, and by job for more (a search such as sweep=optuna), with the best so far."""
    params = [k for k in keys if k != "seed"]
    groups = {
        values: statistics.mean(job["val/acc"] for job in group)
        for values, group in by_configuration(jobs, params).items()
    }
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    if len(params) == 2 and groups:
        rows, cols = (sorted({v[i] for v in groups}, key=_numeric_first) for i in (0, 1))
        grid = [[groups.get((r, c), float("nan")) for c in cols] for r in rows]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set(
            xticks=range(len(cols)),
            xticklabels=[compact(c) for c in cols],
            yticks=range(len(rows)),
            yticklabels=[compact(r) for r in rows],
            xlabel=params[1],
            ylabel=params[0],
            title="val/acc",
        )
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                failed = math.isnan(value)
                bright = not failed and image.norm(value) > 0.5  # dark text on the light end of viridis
                ax.text(
                    j,
                    i,
                    "failed" if failed else f"{value:.4f}",
                    ha="center",
                    va="center",
                    color="black" if bright else "white",
                )
        fig.colorbar(image, ax=ax)
    elif len(params) > 2:
        done = [job for job in jobs if job.get("status") == "ok"]
        numbers = [int(job["job"]) if job["job"].isdigit() else i for i, job in enumerate(done)]
        values = [job["val/acc"] for job in done]
        ax.plot(numbers, values, "o", label="job")
        ax.step(numbers, [max(values[: i + 1]) for i in range(len(values))], where="post", label="best so far")
        ax.set(xlabel="job (trial)", ylabel="val/acc", title="val/acc by job (failed jobs left out)")
        if values:
            ax.set_ylim(max(0.0, _lower_limit(values)), 1.0)
        ax.legend(loc="best")
    else:
        labels = [
            " ".join(f"{k}={compact(v)}" for k, v in zip(params, values, strict=True)) or "run" for values in groups
        ]
        ax.barh(labels, list(groups.values()))
        ax.set(xlabel="val/acc", title="val/acc by configuration (failed jobs left out)")
        if groups:
            ax.set_xlim(max(0.0, _lower_limit(list(groups.values()))), 1.0)
    fig.savefig(path, dpi=100)


def _lower_limit(values: list[float]) -> float:
    """An axis start a little below the lowest value, so that close accuracies look different."""
    low = min(values)
    return low - 0.05 * (1 - low) - 0.01


def _numeric_first(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def write_report(sweep_dir: str | Path) -> Path:
    """Write summary.csv, summary.md and summary.png for a sweep folder; return summary.md's path."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise InputError(f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml): is it a sweep folder?")
    keys = swept_keys(jobs, recorded_sweep_keys(sweep_dir))
    best = best_job(jobs)
    # Each file appears whole: jobs of a parallel launcher may rewrite the report at the same time.
    with _replaced(sweep_dir / "summary.csv") as tmp:
        tmp.write_text(csv_text(jobs, keys, best))
    with _replaced(sweep_dir / "summary.md") as tmp:
        tmp.write_text(markdown(sweep_dir, jobs, keys, best))
    with _replaced(sweep_dir / "summary.png") as tmp:
        plot(tmp, jobs, keys)
    return sweep_dir / "summary.md"


@contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) that replaces it once written."""
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    yield tmp
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description="Write summary.csv, summary.md and summary.png for a sweep folder.")
    parser.add_argument("sweep_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors():
        path = write_report(args.sweep_dir)
    print(path.read_text(), end="")


if __name__ == "__main__":
    main()
