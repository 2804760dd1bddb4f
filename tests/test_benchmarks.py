import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_benchmark_runs_its_code_on_the_cpu(real_data_dir):
    """benchmarks/gpu.py is meant for a GPU machine; --device cpu runs the same code here, so
    that the script is known to work before anyone spends GPU time on it."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--epochs", "1",
         f"--data-dir={real_data_dir}", "callbacks.progress_bar=null", "+trainer.limit_train_batches=100"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
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
        [sys.executable, str(ROOT / "benchmarks" / "epoch_time.py"), "--epochs", "1", "--notebook-epochs", "0",
         f"--data-dir={real_data_dir}", "model=softmax", "callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
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
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mnist_lab adds " in out and "beyond Lightning's import" in out
    for phase in ("imports", "data: read and split", "sanity validation", "validation", "training (one batch)",
                  "checkpoints", "test loop", "test figures", "curves.png", "HPARAMS", "process exit"):
        assert phase in out, phase
