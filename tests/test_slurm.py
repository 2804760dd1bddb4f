"""hydra/launcher=slurm against a real SLURM: a one-node cluster of Debian's slurm-wlm and munge,
started here for the test (as root; .ci/run installs both). Where they are missing the test is
skipped, except under MNIST_LAB_REQUIRE_SLURM=1 (CI), where it fails; a controller that will not
start always fails the test, with its log."""

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_train, smoke_overrides, stop
from tests.test_sweeps import rows_of

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path) -> str:
    """One node, this machine, with its CPUs and most of its memory; every file in `folder`."""
    node = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=mnistlab
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.sock
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={node} CPUs={os.cpu_count()} RealMemory={memory_mb - 1024} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """SLURM_CONF of a running one-node cluster, which is stopped afterwards."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        message = f"{', '.join(missing)} missing: install Debian's slurm-wlm and munge (.ci/run does)"
        if os.environ.get("MNIST_LAB_REQUIRE_SLURM"):
            pytest.fail(message)
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.fail("slurmd runs jobs as any user only as root: run this test as root (CI does)")
    folder = tmp_path_factory.mktemp("slurm")
    folder.chmod(0o700)  # munged refuses a key or socket in a folder that others may write to
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    (folder / "slurm.conf").write_text(slurm_conf(folder))
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run(["mungekey", "--create", f"--keyfile={folder}/munge.key"], check=True)
    daemons = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for command in (
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={folder}/munge.key",
                f"--socket={folder}/munge.sock",
                f"--pid-file={folder}/munged.pid",
                f"--log-file={folder}/munged.log",
                f"--seed-file={folder}/munged.seed",
            ],
            ["slurmctld", "-D", "-i"],
            ["slurmd", "-D"],
        )
    ]
    try:
        deadline, state = time.monotonic() + 60, ""
        while state not in ("idle", "mixed", "alloc"):
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(folder.glob("*.log")))
                pytest.fail(f"the one-node SLURM did not come up (node state {state!r}):\n{logs}")
            time.sleep(0.5)
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        yield {"SLURM_CONF": env["SLURM_CONF"]}
        # Jobs whose results are in are still ending their steps: let them, before the daemons go.
        deadline = time.monotonic() + 30
        while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                subprocess.run(["scancel", "--full", "--partition=debug"], env=env)
                break
            time.sleep(0.5)
    finally:
        for daemon in reversed(daemons):
            stop(daemon)


def slurm_sweep(synthetic_dir: Path, sweep: Path, lrs: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A sweep through hydra/launcher=slurm, sized for this one small node."""
    return run_train(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        *smoke_overrides(synthetic_dir, "model=softmax"),
        f"optimizer.lr={lrs}",
        f"hydra.sweep.dir={sweep}",
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs_and_a_failed_one_is_reported(slurm, synthetic_dir, tmp_path):
    result = slurm_sweep(synthetic_dir, tmp_path / "sweep", "0.05,0.1", slurm)
    assert result.returncode == 0, result.stderr
    table = rows_of(tmp_path / "sweep")
    assert [(r["job"], r["optimizer.lr"], r["status"]) for r in table] == [("0", "0.05", "ok"), ("1", "0.1", "ok")]
    assert all(0 <= float(r["val/acc"]) <= 1 and r["epochs"] == "2" for r in table)
    # Each ran as a SLURM job: submitit's folder per SLURM job id, with the job's own output.
    ran = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(ran) == 2 and all("Test accuracy" in log.read_text() for log in ran), ran

    failing = slurm_sweep(synthetic_dir, tmp_path / "failing", "0.05,-1", slurm)
    assert (
        failing.returncode == 1
        and "Error: 1 job(s) failed (job 1): their errors are in the report, summary.md" in failing.stderr
    )
    assert [(r["job"], r["status"]) for r in rows_of(tmp_path / "failing")] == [("0", "ok"), ("1", "failed")]
    assert "optimizer.lr must be > 0" in (tmp_path / "failing" / "summary.md").read_text()
