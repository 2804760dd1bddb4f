"""Runs that are stopped, killed, resumed, repeated, or run in two processes: real subprocesses
and real signals (issue: reliability)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lab.data import BatchIndices
from mnist_lab.errors import InputError
from mnist_lab.jobs import check_multirun_strategy
from mnist_lab.resume import check_resume_command
from mnist_lab.run_folder import claim
from tests.conftest import ROOT, run_train, smoke_overrides

BATCHES = 40  # training batches per epoch in the signal tests: about 2 s of the CNN per epoch


def real_overrides(data_dir: Path, *extra: str) -> list[str]:
    """The CNN with its augmentation and dropout (every random stream a resume must restore),
    on the real MNIST, with short epochs, a logged loss every 5 steps, 1,000 validation and
    2,000 test images, and no test figures."""
    return [
        f"data.data_dir={data_dir}",
        "data.download=false",
        "model=cnn",
        "trainer=cpu",
        "trainer.max_epochs=2",
        f"+trainer.limit_train_batches={BATCHES}",
        "trainer.log_every_n_steps=5",
        "data.val_size=1000",
        "+trainer.limit_test_batches=2",
        "callbacks.test_figures=null",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        *extra,
    ]


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag, as TensorBoard reads the run (purged steps dropped)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(real_data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(*real_overrides(real_data_dir), f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same test metrics, and the same training curve in one TensorBoard run: no step twice."""
    ours, theirs = metrics(run_dir), metrics(reference)
    assert ours["status"] == "ok" and ours["epochs"] == theirs["epochs"] == 2
    assert len(ours["epoch_train_time_s"]) == 2  # the stopped epoch's time carried over, not lost
    # the same best checkpoint tested, and no stale or second "last" file beside it
    assert ours["best_checkpoint"] == theirs["best_checkpoint"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == sorted(os.listdir(reference / "checkpoints"))
    assert (ours["test/acc"], ours["test/loss"]) == (theirs["test/acc"], theirs["test/loss"])
    assert scalars(run_dir, "train/loss") == scalars(reference, "train/loss")
    assert scalars(run_dir, "train/acc") == scalars(reference, "train/acc")  # the stopped epoch's counts carried over
    assert scalars(run_dir, "val/acc") == scalars(reference, "val/acc")
    assert scalars(run_dir, "train/loss_epoch") == scalars(reference, "train/loss_epoch")  # the epoch line's mean
    event_dirs = {path.parent for path in run_dir.rglob("events.out.tfevents.*")}
    assert event_dirs == {run_dir}  # one TensorBoard run, not a second one for the resumed part


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    signum, real_data_dir, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    proc = start(run_dir, real_overrides(real_data_dir))
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)  # epoch 0 is done: stop inside epoch 1
    time.sleep(0.5)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert f"python train.py resume={run_dir}" in stderr
    stopped = metrics(run_dir)
    assert stopped["status"] == "interrupted" and stopped["signal"] == signal.Signals(signum).name
    assert stopped["checkpoint"] == "checkpoints/last.ckpt"
    assert BATCHES < stopped["step"] < 2 * BATCHES  # mid-epoch: the checkpoint is from that batch
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped["step"]

    result = run_train(f"resume={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr
    assert metrics(run_dir)["resumed_from_step"] == stopped["step"]
    assert "dataloader is not resumable" not in result.stderr  # it is: mnist_lab's data module goes on mid-epoch
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_resumes_from_the_epoch_boundary(
    real_data_dir, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    proc = start(run_dir, real_overrides(real_data_dir))
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (run_dir / "metrics.json").exists()

    result = run_train(*real_overrides(real_data_dir), f"hydra.run.dir={run_dir}", timeout=300)  # the same command
    assert result.returncode == 0, result.stderr
    assert metrics(run_dir)["resumed_from_step"] == BATCHES  # the end of epoch 0
    # The steps the killed process logged after that checkpoint are dropped, then trained again.
    assert_same_run(run_dir, uninterrupted)


def test_the_stopped_epoch_keeps_its_time_before_the_stop(monkeypatch):
    """EpochTimer on a made-up clock: the epoch a run is stopped in counts its training time before
    the stop and after the resume; validation, the resumed run's sanity check included, does not."""
    from types import SimpleNamespace

    from mnist_lab.callbacks import EpochTimer

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("mnist_lab.callbacks.time", SimpleNamespace(perf_counter=lambda: clock.now))
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    module = SimpleNamespace(device=torch.device("cpu"))  # no captured step

    def at(t: float, timer: EpochTimer, *hooks: str) -> None:
        clock.now = t
        for hook in hooks:
            getattr(timer, hook)(trainer, module)

    first = EpochTimer()
    at(0, first, "on_fit_start", "on_train_epoch_start")
    at(10, first, "on_train_epoch_end", "on_train_epoch_start")
    at(12, first, "on_validation_start")
    at(13, first, "on_validation_end")
    clock.now = 15  # stopped: 4 s of epoch 1 trained
    saved = first.state_dict()
    assert saved["epoch_times"] == [10] and saved["epoch_time"] == 4 and saved["fit_time"] == 15

    resumed = EpochTimer()
    resumed.load_state_dict(saved)
    at(100, resumed, "on_fit_start", "on_validation_start")
    at(102, resumed, "on_validation_end")
    at(108, resumed, "on_train_epoch_end")
    assert resumed.epoch_times == [10, 10] and resumed.fit_time == 23
    assert resumed.state_dict()["epoch_time"] == 0  # a checkpoint at the end of an epoch


@pytest.fixture(scope="module")
def finished_run(synthetic_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_train(*smoke_overrides(synthetic_dir, "model=softmax"), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def single_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_resume_refuses_what_it_cannot_continue(finished_run, tmp_path):
    with pytest.raises(InputError, match="that run finished already"):
        check_resume_command(finished_run, [f"resume={finished_run}"])
    with pytest.raises(InputError, match="not a run folder"):
        check_resume_command(tmp_path / "nothing", [f"resume={tmp_path / 'nothing'}"])
    # A run killed before its first checkpoint: its .hydra/ and nothing else.
    started = tmp_path / "started"
    shutil.copytree(finished_run / ".hydra", started / ".hydra")
    with pytest.raises(InputError, match="the run has no checkpoint that loads.*start it again with: python train.py "):
        check_resume_command(started, [f"resume={started}"])
    with pytest.raises(InputError, match="optimizer.lr=0.5 would not apply"):
        check_resume_command(started, [f"resume={started}", "optimizer.lr=0.5"])
    failed = tmp_path / "failed"
    shutil.copytree(finished_run, failed, ignore=shutil.ignore_patterns(".lock"))
    # A run stopped by the machine (a full disk) goes on; one that diverged is final, and says how to start over.
    (failed / "metrics.json").write_text(
        json.dumps({"status": "failed", "error": "OSError: [Errno 27] File too large", "resumable": True})
    )
    assert check_resume_command(failed, [f"resume={failed}"]) == failed / "checkpoints" / "last.ckpt"
    (failed / "metrics.json").write_text(
        json.dumps({"status": "failed", "error": "Diverged: training diverged", "resumable": False})
    )
    with pytest.raises(InputError, match="that run cannot go on .*start over in a new folder with: python train.py "):
        check_resume_command(failed, [f"resume={failed}"])


@pytest.mark.slow
def test_train_py_resume_refuses_in_one_line(finished_run, tmp_path):
    assert "that run finished already" in single_error(run_train(f"resume={finished_run}"))
    assert not (finished_run / ".hydra" / "hydra.yaml").read_text().count("resume=")  # .hydra/ untouched


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten(finished_run, synthetic_dir):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file() and p.name != ".lock"}
    error = single_error(run_train(*smoke_overrides(synthetic_dir, "model=softmax"), f"hydra.run.dir={finished_run}"))
    assert f"{finished_run} already holds a finished run" in error
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_folder_in_use_is_refused(synthetic_dir, tmp_path):
    busy = tmp_path / "busy"
    claim(busy)  # this test process holds the folder, as a running train.py does
    error = single_error(run_train(*smoke_overrides(synthetic_dir), f"hydra.run.dir={busy}"))
    assert f"{busy} is in use by another run" in error
    assert not (busy / ".hydra").exists()


@pytest.mark.slow
def test_a_stopped_run_is_not_resumed_with_other_settings(finished_run, synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns(".lock", "metrics.json"))  # killed at its end
    error = single_error(
        run_train(*smoke_overrides(synthetic_dir, "model=softmax", "optimizer.lr=0.5"), f"hydra.run.dir={run_dir}")
    )
    assert "holds a stopped run with other settings (optimizer.lr=0.05->0.5" in error


@pytest.mark.slow
def test_sweeps_started_together_get_their_own_folders_and_a_used_one_is_refused(synthetic_dir, tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "-m", *smoke_overrides(synthetic_dir, "model=softmax"), "seed=1"]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    sweeps = list((tmp_path / "outputs" / "sweeps").glob("*/*"))
    assert len(sweeps) == 2
    assert all(len(list(sweep.glob("*/metrics.json"))) == 1 for sweep in sweeps)
    error = single_error(
        run_train("-m", *smoke_overrides(synthetic_dir, "model=softmax"), "seed=1,2", f"hydra.sweep.dir={sweeps[0]}")
    )
    assert f"{sweeps[0]} already holds another sweep" in error


@pytest.mark.slow
def test_divergence_stops_at_the_first_bad_step(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Logged every 100 steps, the loss is still checked at every step on the CPU.
    overrides = smoke_overrides(
        synthetic_dir, "model=lenet", "optimizer.lr=1e30", "scheduler=none", "trainer.log_every_n_steps=100"
    )
    error = single_error(run_train(*overrides, f"hydra.run.dir={run_dir}"))
    assert "training diverged: the loss is nan at step 1; lower the learning rate (optimizer.lr=1e+30)" in error
    assert metrics(run_dir)["status"] == "failed"


def test_batches_are_shared_out_between_processes_without_overlap():
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    whole = torch.cat(list(BatchIndices(1000, 64, generator())))
    shards = [list(BatchIndices(1000, 64, generator(), rank=r, world_size=3, even=True)) for r in range(3)]
    assert [len(s) for s in shards] == [5, 5, 5]  # 16 batches: 15 shared out evenly, the last left out
    taken = torch.cat([torch.cat(s) for s in shards])
    assert len(set(taken.tolist())) == len(taken) == 15 * 64
    assert set(taken.tolist()) <= set(whole.tolist())
    assert torch.equal(shards[1][0], whole[64:128])  # process 1 takes batches 1, 4, 7, ...


def test_skipped_batches_resume_the_same_permutation():
    full = list(BatchIndices(300, 32, torch.Generator().manual_seed(5)))
    resumed = list(BatchIndices(300, 32, torch.Generator().manual_seed(5), skip=4))
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed, strict=True))


@pytest.mark.slow
def test_ddp_inside_a_local_sweep_is_refused_before_any_job(synthetic_dir, tmp_path):
    sweep = tmp_path / "sweep"
    error = single_error(
        run_train("-m", *smoke_overrides(synthetic_dir, "trainer=ddp_cpu"), "seed=1,2", f"hydra.sweep.dir={sweep}")
    )
    assert "trainer.strategy=ddp cannot run inside -m here" in error
    assert not list(sweep.glob("*/metrics.json"))


def test_ddp_test_figures_show_the_most_confident_mistakes_of_every_process():
    from mnist_lab.callbacks import gather_mistakes

    def mistakes(predicted: list[int], confidence: list[float]):
        n = len(predicted)
        return torch.rand(n, 1, 28, 28), torch.tensor(predicted), torch.tensor(predicted) % 10, torch.tensor(confidence)

    ours = mistakes([10, 11], [0.9, 0.5])  # this process found 2 mistakes; the other 4 (its top 4)
    theirs = iter(mistakes([20, 21, 22, 23], [0.95, 0.7, 0.6, 0.1]))

    def all_gather(tensor):  # what torch.distributed gives this process: every process's tensor, stacked
        return torch.stack([tensor, next(theirs)])

    images, predicted, labels, confidence = gather_mistakes(ours, 4, all_gather)
    assert predicted.tolist() == [20, 10, 21, 22] and labels.tolist() == [0, 0, 1, 2]
    assert confidence.tolist() == pytest.approx([0.95, 0.9, 0.7, 0.6])
    assert torch.equal(images[1], ours[0][0])  # each image stays with its own prediction


@pytest.mark.slow
def test_ddp_cpu_trains_in_two_processes_within_0_3_points_of_one(real_checkpoint, real_data_dir, tmp_path):
    """One epoch of LeNet-5 in 2 processes of 32 images a batch (a global batch of 64, as in one
    process) against the one-process epoch of the real_checkpoint fixture."""
    run_dir = tmp_path / "run"
    result = run_train(
        f"data.data_dir={real_data_dir}",
        "model=lenet",
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "data.batch_size=32",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr
    assert "Starting with 2 processes" in result.stderr + result.stdout
    # 55,000 training images, 32 a batch: 1,719 batches, 859 for each process.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 859
    _, single = real_checkpoint
    assert abs(metrics(run_dir)["test/acc"] - single["test/acc"]) <= 0.003, (
        metrics(run_dir)["test/acc"],
        single["test/acc"],
    )


@pytest.mark.slow
def test_a_signal_stops_a_whole_sweep_and_its_job_resumes_alone(real_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"data.data_dir={real_data_dir}",
        "model=lenet",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=100",
        "data.val_size=1000",
        "+trainer.limit_test_batches=2",
        "callbacks.test_figures=null",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        "seed=1,2,3",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(sweep / "1" / "checkpoints" / "last.ckpt", proc)  # job 1 is in its second epoch
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert (
        f"Resume the sweep with:\n  python train.py resume={sweep}\nor this job alone with:\n  python train.py "
        f"resume={sweep / '1'}" in stderr
    )
    assert metrics(sweep / "1")["status"] == "interrupted" and not (sweep / "2").exists()

    result = run_train(f"resume={sweep / '1'}", timeout=300)
    assert result.returncode == 0, result.stderr
    assert metrics(sweep / "1")["status"] == "ok"
    assert {p.parent.name for p in (sweep / "1").rglob("events.out.tfevents.*")} == {"seed=2"}  # its TensorBoard run
    assert "2 jobs: 2 ok, 0 failed." in (sweep / "summary.md").read_text()  # the report caught up


def test_ddp_in_a_sweep_is_left_to_the_slurm_launcher(make_cfg):
    cfg = make_cfg("trainer=ddp")
    with pytest.raises(InputError, match="cannot run inside -m here"):
        check_multirun_strategy(cfg, "hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    check_multirun_strategy(cfg, "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    check_multirun_strategy(make_cfg("trainer=cpu"), None)
