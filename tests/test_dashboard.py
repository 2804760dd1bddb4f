"""TensorBoard's dashboards in a real browser: two tiny runs on the real MNIST, `tensorboard
--logdir` on a free port of 127.0.0.1, and Debian's headless Chromium driven by selenium through
Debian's chromedriver (no browser download). Screenshots go to test-artifacts/ (or
$MNIST_LAB_TEST_ARTIFACTS)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_train, stop

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("MNIST_LAB_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SCALAR_TAGS = (
    "train/loss",
    "train/loss_epoch",
    "train/acc",
    "train/lr",
    "val/loss",
    "val/acc",
    "val/acc_best",
    "test/loss",
    "test/acc",
)
RUNS = {"0": "model=softmax", "1": "model=lenet"}  # job folder -> TensorBoard run name in it


@pytest.fixture(scope="module")
def sweep(real_data_dir, tmp_path_factory) -> Path:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver (.ci/run does)"
        if os.environ.get("MNIST_LAB_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    sweep = tmp_path_factory.mktemp("dashboard") / "sweep"
    result = run_train(
        "-m",
        "model=softmax,lenet",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=20",
        "trainer.log_every_n_steps=5",
        "callbacks.progress_bar=null",
        f"data.data_dir={real_data_dir}",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return sweep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tensorboard(logdir: Path, expected_runs: int) -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1, stopped on the way out whatever happens."""
    url = f"http://127.0.0.1:{free_port()}"
    log = logdir.parent / "tensorboard.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                url.rsplit(":", 1)[1],
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"tensorboard exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                    if len(json.load(response)) >= expected_runs:
                        break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"tensorboard did not list {expected_runs} runs: {log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        stop(server, timeout=15)


@contextmanager
def chromium(profile: Path) -> Iterator["webdriver.Chrome"]:  # noqa: F821
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # no calls to Google's services: this machine's network is closed
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,2400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(sweep) -> Iterator[Callable[[str, str, Callable[[str], bool]], str]]:
    """open(fragment, screenshot name, done(text)): the page's visible text once done(text) holds."""
    with tensorboard(sweep, expected_runs=len(RUNS)) as url, chromium(sweep.parent / "chromium") as driver:

        def open_page(fragment: str, name: str, done: Callable[[str], bool]) -> str:
            driver.get(f"{url}/{fragment}")
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline:
                text = driver.find_element("tag name", "body").text
                if done(text):
                    break
                time.sleep(0.5)
            time.sleep(1)  # let the charts finish drawing for the screenshot
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / f"tensorboard_{name}.png"))
            return text

        yield open_page


def test_scalars_dashboard_shows_every_tag_for_both_runs(page, sweep):
    names = [f"{job}/{name}" for job, name in RUNS.items()]
    # tagFilter=.* puts every tag in one open section, named "tag: <tag>" under each chart
    expected = [f"tag: {tag}" for tag in SCALAR_TAGS] + names
    text = page("#scalars&tagFilter=.*", "scalars", lambda text: all(e in text for e in expected))
    assert [e for e in expected if e not in text] == [], text
    assert (ARTIFACTS / "tensorboard_scalars.png").stat().st_size > 10_000


def test_hparams_dashboard_lists_both_sessions_with_their_metrics(page, sweep):
    text = page("#hparams", "hparams", lambda text: "Number of matching session groups: 2" in text)
    assert "Number of matching session groups: 2" in text, text
    lines = text.splitlines()
    header = lines.index("Trial ID")
    columns = lines[header + 2 : lines.index(f"0/{RUNS['0']}", header)]  # after "Show Metrics"
    # the ticked hyperparameters (the swept model and the compared keys), by name; then the metrics
    assert columns[:-5] == ["data.batch_size", "loss", "model", "optimizer", "optimizer.lr"]
    assert columns[-5:] == ["val/acc", "test/acc", "test/loss", "val/acc_best", "val/loss"]
    for job, name in RUNS.items():
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        row = lines[lines.index(f"{job}/{name}", header) + 1 :][: len(columns)]
        shown = dict(zip(columns, row, strict=True))
        # TensorBoard prints five significant digits, trailing zeros kept: 0.84960
        for metric in ("val/acc", "test/acc", "test/loss"):
            assert shown[metric] == f"{metrics[metric]:#.5g}", (metric, shown)
        assert shown["model"] == {"softmax": "SoftmaxRegression", "lenet": "LeNet"}[name.split("=")[1]]
    assert (ARTIFACTS / "tensorboard_hparams.png").stat().st_size > 10_000
