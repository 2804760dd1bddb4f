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
    assert any(line.startswith("a/b = ") for line in lines)
