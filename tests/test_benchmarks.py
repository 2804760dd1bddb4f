import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_benchmark_runs_its_code_on_the_cpu(real_data_dir):
    """benchmarks/gpu.py is meant for a GPU machine; --device cpu runs the same code here, so
    that the script is known to work before anyone spends GPU time on it."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--device",
            "cpu",
            "--epochs",
            "1",
            f"--data-dir={real_data_dir}",
            "callbacks.progress_bar=null",
            "+trainer.limit_train_batches=100",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for label in ("(a) mnist_lab", "(b) plain PyTorch"):
        (line,) = [line for line in lines if line.startswith(label)]
        assert "images/s" in line
    accuracies = [line for line in lines if "test accuracy after each epoch" in line]
    assert len(accuracies) == 2 and all("training time to 99%" in line for line in accuracies)
    # The same batches in the same order in both arms (one sampler, on a CPU generator, on a GPU too).
    assert accuracies[0].split(";")[0] == accuracies[1].split(";")[0]
    assert any(line.startswith("a/b = ") for line in lines)


@pytest.mark.slow
def test_epoch_time_prints_the_cost_per_step_of_each_arm(real_data_dir):
    """The CPU proxy for the GPU's host-bound step: softmax regression, (a), (a0) and (b) taking turns."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "epoch_time.py"),
            "--epochs",
            "1",
            "--notebook-epochs",
            "0",
            f"--data-dir={real_data_dir}",
            "model=softmax",
            "callbacks.progress_bar=null",
            "+trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("a/b = ") for line in lines) and any(line.startswith("a0/b = ") for line in lines)
    (per_step,) = [line for line in lines if line.startswith("per training step:")]
    assert "(a) " in per_step and "(a0) " in per_step and "(b) " in per_step
    (excess,) = [line for line in lines if line.startswith("excess over (b) per step:")]
    assert "mnist_lab's excess / Lightning's = " in excess
    (accuracies,) = [line for line in lines if line.startswith("test accuracy after each epoch")]
    ours, plain = accuracies.split("(a) ")[1].split("  (b) ")
    assert ours == plain  # (a) and (b) train identically, with (a0) interleaved in the same thread


@pytest.mark.slow
def test_fixed_cost_times_the_phases_of_a_one_batch_run(real_data_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fixed_cost.py"), "--repeats", "1", f"--data-dir={real_data_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mnist_lab adds " in out and "beyond Lightning's import" in out
    for phase in (
        "imports",
        "data: read and split",
        "sanity validation",
        "validation",
        "training (one batch)",
        "checkpoints",
        "test loop",
        "test figures",
        "curves.png",
        "HPARAMS",
        "process exit",
    ):
        assert phase in out, phase
    warm = out.split("a second one-batch mnist_lab.fit in a warm process: ")[1]
    assert "beyond it (target <= 1.0 s)" in warm and "training (one batch)" in warm and "everything else" in warm


def smoke_data(data_dir) -> list[str]:
    """A couple of batches per epoch on synthetic data, for the sweep benchmarks."""
    return [
        f"--data-dir={data_dir}",
        "data.download=false",
        "data.verify_checksums=false",
        "data.val_size=100",
        "data.eval_batch_size=50",
        "trainer=cpu",
        "data.on_device=false",
        "+trainer.limit_train_batches=3",
    ]


@pytest.mark.slow
def test_sweep_concurrency_prints_both_wall_times_and_each_jobs_results(synthetic_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "sweep_concurrency.py"),
            "--jobs-per-gpu",
            "2",
            *smoke_data(synthetic_dir),
            "model=softmax",
            "optimizer.lr=0.05,0.1",
            "data.batch_size=32",
            "trainer.max_epochs=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[2] for line in lines if line.startswith("repeat 1:")] == ["sequential", "2"]
    assert len([line for line in lines if line.startswith("  job ")]) == 2
    assert any(line.startswith("median wall time: sequential") and "2 at once on each GPU" in line for line in lines)


@pytest.mark.slow
def test_optuna_pruning_prints_best_and_epochs_with_and_without_a_pruner(synthetic_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "optuna_pruning.py"),
            "--trials",
            "2",
            "--epochs",
            "2",
            *smoke_data(synthetic_dir),
            "model=softmax",
            "data.batch_size=32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "best val/acc" in line]
    assert [line.split(":")[0].strip() for line in lines] == ["no pruning", "median"]
    assert all("4 epochs over 2 trials (0 pruned, 0 failed)" in line for line in lines)  # too few trials to prune


@pytest.mark.slow
def test_demo_latency_prints_the_round_trip_and_server_times(real_checkpoint, real_data_dir):
    checkpoint, _ = real_checkpoint
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "demo_latency.py"),
            "--ckpt",
            str(checkpoint),
            "--requests",
            "5",
            f"--data-dir={real_data_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("5 drawings") and lines[0].endswith("answered 7")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["round trip", "server"]


def test_the_gpu_targets_table_reads_each_steps_figures(tmp_path):
    """benchmarks/gpu_targets.py, which ends each part of gpu_check.sh: every target, met or not,
    and those another part measures (or a failed step would have) read "not measured"."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_targets import table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    (tmp_path / "gpu-b64.json").write_text(json.dumps({"a/b": 1.1, "capture_time_s": None}))
    (tmp_path / "gpu-b512.json").write_text(json.dumps({"a/b": 1.3}))
    (tmp_path / "fast-seed1").mkdir()
    (tmp_path / "fast-seed1" / "metrics.json").write_text(
        json.dumps({"test/acc": 0.9912, "epoch_train_time_s": [0.3, 0.25, 0.25, 0.25]})
    )
    rows = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[1:] for row in table(tmp_path).splitlines()[2:]}
    assert rows["gpu.py, batch 64, eager: a/b <= 1.2"] == ["1.1", "yes |"]
    assert rows["gpu.py, batch 512, eager: a/b <= 1.25"] == ["1.3", "**no** |"]
    assert rows["experiment=fast seed=1: test/acc >= 0.99"] == ["0.991", "yes |"]
    assert rows["experiment=fast seed=1: training s <= 1"] == ["1.05", "**no** |"]
    assert rows["experiment=fast seed=2: test/acc >= 0.99"] == ["not measured", "|"]
    assert rows["12-job sweep, 6 at once: speed-up >= 3"] == ["not measured", "|"]
    assert len(rows) == 20
