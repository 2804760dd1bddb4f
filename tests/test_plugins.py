"""mnist_lab's Hydra plugins as any Hydra app uses them, found by Hydra's plugin scan with their
configs in its ConfigStore: Hydra's own launcher test suites (hydra.test_utils.launcher_common_tests,
which every official launcher runs) against hydra/launcher=gpus, with CPU workers; the Optuna
sweeper tested as hydra-optuna-sweeper tests its own."""

import subprocess
import sys

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from omegaconf import OmegaConf

ON_THE_CPU = ["hydra.launcher.gpus=[]", "hydra.launcher.jobs_per_gpu=2"]


# The suite expects each job to run in its own folder (Hydra 1.1's default): importing mnist_lab
# has set Hydra's version_base to 1.3, whose jobs stay in the launching folder.
@pytest.mark.parametrize("launcher_name, overrides", [("gpus", [*ON_THE_CPU, "hydra.job.chdir=True"])])
class TestGpuLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=gpus", *ON_THE_CPU])])
class TestGpuLauncherIntegration(IntegrationTestSuite):
    pass


def test_the_optuna_sweeper_asks_for_trials_in_batches_of_n_jobs(hydra_sweep_runner, tmp_path, monkeypatch):
    """As hydra-optuna-sweeper's own test_launch_jobs, on Hydra's test app, with the launches counted."""
    from hydra_plugins.mnist_lab_plugins._optuna import OptunaSearch

    batches = []
    launch = OptunaSearch._launch
    monkeypatch.setattr(
        OptunaSearch, "_launch", lambda self, trials, fixed: batches.append(len(trials)) or launch(self, trials, fixed)
    )
    sweep = hydra_sweep_runner(
        calling_file=None,
        calling_module="hydra.test_utils.a_module",
        config_path="configs",
        config_name="compose.yaml",
        task_function=lambda cfg: float(cfg.foo),
        temp_dir=tmp_path,
        overrides=[
            "hydra/sweeper=optuna",
            "hydra/launcher=basic",
            "hydra.sweeper.n_trials=8",
            "hydra.sweeper.n_jobs=3",
            "foo=range(1, 20)",
        ],
    )
    with sweep:  # the sweep's folder goes at the end of the block
        assert sweep.returns is None
        best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert batches == [3, 3, 2]
    assert best.name == "optuna" and best.best_value == best.best_params.foo  # the task's own return value


SPHERE = """
import hydra

@hydra.main(version_base="1.3", config_path=".", config_name="sphere")
def sphere(cfg) -> float:
    return cfg.x**2 + cfg.y**2

if __name__ == "__main__":
    sphere()
"""


@pytest.mark.parametrize("with_commandline", [True, False])
def test_the_optuna_sweeper_finds_the_best_of_another_apps_search(with_commandline, tmp_path):
    """hydra-optuna-sweeper's own example test (its sphere app), against this sweeper: a search
    space from the config or from the command line, fixed values left out of best_params."""
    (tmp_path / "sphere.py").write_text(SPHERE)
    space = "{x: 'range(-2, 3)', y: 'range(-2, 3)'}"
    (tmp_path / "sphere.yaml").write_text(f"x: 1\ny: 1\nhydra:\n  sweeper:\n    params: {space}\n")
    command = [
        sys.executable,
        "sphere.py",
        "-m",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/sweeper=optuna",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.n_trials=20",
        "hydra.sweeper.n_jobs=8",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=123",
        *(["x=choice(0, 1, 2)", "y=0", "hydra.sweeper.params={}"] if with_commandline else []),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best.name == "optuna" and best.best_value == 0 and best.best_params.x == 0
    assert ("y" not in best.best_params) if with_commandline else (best.best_params.y == 0)
